"""Atomic file writes for results, caches and reports: a reader (or the next run) sees the old file or the
complete new one, never a torn one. Checkpoint directories have their own, stricter procedure
(checkpoint.new_checkpoint_dir); this is for single files."""
from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def replaced_atomically(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path to write `path`'s new content to; when the block ends normally it is
    fsynced and renamed over `path` (one atomic rename), when it raises it is deleted and `path` is left
    as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the suffix stays last: writers that pick the format from it (PIL, numpy) see the real one
    tmp = path.parent / f".{path.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}"
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_atomically(path: str | os.PathLike, data: str | bytes) -> None:
    """Write text (UTF-8) or bytes to `path` atomically (see replaced_atomically)."""
    with replaced_atomically(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
