"""argparse types for the `dtq` commands: every value is checked while the command line is parsed, so a
bad one ends in argparse's one-line error and exit status 2 before any model is loaded."""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def int_at_least(minimum: int):
    """An argparse type: an integer >= minimum."""
    def parse(text: str) -> int:
        value = _int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


def finite_float(text: str) -> float:
    """An argparse type: a finite float (no nan, inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _creatable(path: Path) -> None:
    """Raise ArgumentTypeError unless `path` can be created: its nearest existing ancestor is a
    writable directory (no plain file on the way)."""
    parent = path.parent
    while not parent.exists():
        if parent.is_symlink():
            raise argparse.ArgumentTypeError(f"{path}: {parent} is a dangling symbolic link")
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{path}: no permission to write in {parent}")


def output_dir(text: str) -> Path:
    """An argparse type: a directory to write: existing, or creatable; never an existing file."""
    if not text:
        raise argparse.ArgumentTypeError("must be a directory path, got ''")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} exists and is not a directory")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise argparse.ArgumentTypeError(f"no permission to write in {path}")
    else:
        _creatable(path)
    return path


def existing_dir(text: str) -> Path:
    """An argparse type: an existing directory (a checkpoint or plan to read)."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is not an existing directory" if not path.exists()
                                         else f"{path} is a file, not a checkpoint directory")
    return path


def _image_extensions() -> set[str]:
    from PIL import Image
    Image.init()
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}


def image_file(text: str) -> Path:
    """An argparse type: an image file to write: a known image extension (.png, .jpg, ...), not an
    existing directory, in a directory that exists or can be created."""
    path = Path(text)
    exts = _image_extensions()
    if path.suffix.lower() not in exts:
        raise argparse.ArgumentTypeError(f"{text!r} needs an image extension ({', '.join(sorted(e for e in exts if e in ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.tif')))}, ...)")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a directory")
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"no permission to overwrite {path}")
    if not path.exists():
        _creatable(path)
    return path


def device_spec(text: str) -> str:
    """An argparse type: a cpu or cuda[:N] device name, which this machine need not have (e.g. where another
    machine's results were made)."""
    import torch
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r} (cpu or cuda[:N])")
    return text


def torch_device(text: str) -> str:
    """An argparse type: a torch device this machine has (cpu, cuda, cuda:N)."""
    import torch
    dev = torch.device(device_spec(text))
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    return text
