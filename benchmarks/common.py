"""Shared benchmark helpers: timing, L2-cold inputs, environment header, results as markdown + JSON.

Method (docs/gpu.md): median of many runs timed with CUDA events (triton.testing.do_bench, which
also clears L2 before every run), warm-up first, random data, every comparison in the same process.
`Rotating` additionally cycles through enough copies of the inputs that consecutive calls never find
their operands in L2 (do_bench's cache clear is a memset of its own buffer; rotating makes the
inputs cold by construction too, and keeps working with timers that do not clear). On CPU (the
`--dry-run` modes that prove a script runs), times come from time.perf_counter and mean nothing
about performance: the header says so.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import signal
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from dtq_kernels.fileio import write_atomically

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def env_header(device: torch.device | str = "cuda", note: str = "") -> dict[str, Any]:
    """GPU name, capability, library versions and the UTC date, for the top of every result file."""
    import triton
    device = torch.device(device)
    head: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        head.update(gpu=props.name, capability=f"sm_{props.major}{props.minor}", sms=props.multi_processor_count,
                    l2_mib=round(props.L2_cache_size / 2 ** 20, 1), memory_gib=round(props.total_memory / 2 ** 30, 1))
    else:
        head.update(gpu=None, cpu=platform.processor() or platform.machine(),
                    warning="CPU dry run: timings prove the script runs, they are not performance numbers")
    if note:
        head["note"] = note
    return head


def time_ms(fn: Callable[[], Any], device: torch.device | str = "cuda", warmup_ms: int = 10,
            rep_ms: int = 50) -> float:
    """Median time of one call in milliseconds. On CPU (dry runs, where Triton runs in its interpreter
    and the time means nothing) the call runs once: a dry run proves the script works, nothing more."""
    if torch.device(device).type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def l2_bytes(device: torch.device | str = "cuda") -> int:
    device = torch.device(device)
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device).L2_cache_size


class Rotating:
    """Calls fn(*inputs[i]) with i cycling over copies of the inputs whose total size is at least
    twice the L2 cache, so each call reads operands that are not in L2 (at most max_copies copies)."""

    def __init__(self, fn: Callable[..., Any], make_inputs: Callable[[], Sequence[Any]],
                 device: torch.device | str = "cuda", max_copies: int = 32):
        first = tuple(make_inputs())
        size = sum(t.numel() * t.element_size() for t in first if isinstance(t, torch.Tensor))
        copies = max(1, min(max_copies, math.ceil(2 * l2_bytes(device) / max(size, 1))))
        self.sets = [first] + [tuple(make_inputs()) for _ in range(copies - 1)]
        self.fn = fn
        self.i = 0

    def __call__(self) -> Any:
        args = self.sets[self.i]
        self.i = (self.i + 1) % len(self.sets)
        return self.fn(*args)


def tops(flops: float, ms: float) -> float:
    """Tera-operations per second for `flops` operations in `ms` milliseconds."""
    return flops / (ms * 1e-3) / 1e12


def results_dir(cli_out: str | None = None) -> Path:
    """--out when given, else $OUT when set, else benchmarks/results/."""
    out = Path(cli_out or os.environ.get("OUT") or RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    return out


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return "" if v is None else str(v)


def to_markdown(rows: list[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    columns = list(columns or (rows[0].keys() if rows else []))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, header: dict[str, Any], rows: list[dict[str, Any]], out_dir: Path,
                  columns: Sequence[str] | None = None, notes: Sequence[str] = ()) -> tuple[Path, Path]:
    """Write <out_dir>/<name>.md (header, notes, table) and <name>.json (header + rows)."""
    md = [f"# {name}", ""] + [f"- {k}: {fmt(v)}" for k, v in header.items()] + [""]
    md += [f"{n}" for n in notes] + ([""] if notes else [])
    md.append(to_markdown(rows, columns))
    md_path, json_path = out_dir / f"{name}.md", out_dir / f"{name}.json"
    write_atomically(md_path, "\n".join(md) + "\n")
    write_atomically(json_path, json.dumps({"header": header, "notes": list(notes), "rows": rows}, indent=1))
    return md_path, json_path


class _TimeUp(BaseException):
    pass


class TimeLimit:
    """`with common.TimeLimit() as limit:` around a benchmark's measuring loop. gpu_check.sh stops a benchmark
    that outruns its share of the device time with SIGTERM; inside the block that ends the loop instead of
    the process, so the rows measured so far are still written, and `limit.notes` says the table is cut."""

    def __enter__(self) -> "TimeLimit":
        self.hit = False
        self._previous = signal.signal(signal.SIGTERM, self._stop)
        return self

    @staticmethod
    def _stop(*_):
        raise _TimeUp

    def __exit__(self, exc_type, exc, tb) -> bool:
        signal.signal(signal.SIGTERM, self._previous)
        if exc_type is _TimeUp:
            self.hit = True
            print("time limit reached: writing the rows measured so far", flush=True)
            return True
        return False

    @property
    def notes(self) -> list[str]:
        return (["**Cut short by the time limit**: shapes and contenders after the last row were not measured."]
                if self.hit else [])


class Skip(Exception):
    """A provider that cannot run here; the reason goes into the results."""
