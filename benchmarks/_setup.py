"""Start-up shared by the bench_*.py scripts, run before they import torch or triton: the common
arguments, the Triton interpreter for --dry-run (it must be chosen before triton is imported), and the
import paths (the repository for dtq_kernels, this folder for common)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_args(description: str, dry_run_help: str, sweep: bool = False, full: str | None = None,
               argv=None, extra=None) -> argparse.Namespace:
    """The common arguments (`full`: help text of a --full flag); `extra(parser)` adds a script's own."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", help="results folder (default: $OUT, else benchmarks/results/)")
    p.add_argument("--dry-run", action="store_true", help=dry_run_help)
    p.add_argument("--rep", type=int, default=50, help="do_bench repetition time per measurement, ms")
    if sweep:
        p.add_argument("--sweep", action="store_true", help="also time every candidate tile config of the dtq kernel")
    if full:
        p.add_argument("--full", action="store_true", help=full)
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, str(HERE.parent))
    sys.path.insert(0, str(HERE))
    return args
