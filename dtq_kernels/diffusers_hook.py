"""Put the dtq backend into diffusers' quantizer mappings the moment diffusers builds them.

diffusers has no public registration API: its `diffusers.quantizers.auto` module holds two dicts
(quant_method -> quantizer class, quant_method -> config class) that `from_pretrained` and
`PipelineQuantizationConfig` consult. `install()` (run by `import dtq_kernels`) adds the "dtq" entries
right away when diffusers already loaded that module, and otherwise waits for it with an import hook,
so importing dtq_kernels does not import diffusers (seconds) for users who never touch it.
The entries themselves are added by `dtq_kernels.diffusers_quantizer.register`, which raises a clear
error if a diffusers release moves the mappings (tests/test_diffusers_backend.py checks it).
"""
from __future__ import annotations

import importlib
import importlib.abc
import sys
import warnings

TARGET = "diffusers.quantizers.auto"
BACKEND_MODULE = "dtq_kernels.diffusers_quantizer"


def _load_backend() -> None:
    # importing the backend module registers it (at its end); while that module is itself importing
    # diffusers, import_module returns the partly built module and its own last line registers
    try:
        importlib.import_module(BACKEND_MODULE)
    except Exception as e:  # never break the user's diffusers import; say loudly what is missing
        warnings.warn(f"dtq_kernels could not register its diffusers quantization backend: {e}", RuntimeWarning,
                      stacklevel=2)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds TARGET with the other finders and wraps its loader so that registration runs right after
    the module has executed."""

    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader, hook = spec.loader, self
        run = loader.exec_module

        def exec_module(module):
            run(module)
            if hook in sys.meta_path:
                sys.meta_path.remove(hook)
            _load_backend()
        loader.exec_module = exec_module
        return spec


def install() -> None:
    if TARGET in sys.modules:
        _load_backend()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
