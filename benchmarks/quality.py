"""The quality table: every recipe in dtq.recipes() (plus the TQ-DiT ablations) vs FP on the shipped
reference DiT -> benchmarks/results/quality.{md,json} and benchmarks/results/quality_grids/<model>.png.

    python benchmarks/quality.py                          # the whole table (one CPU thread by default)
    python benchmarks/quality.py --recipes tqdit-w6a6     # add or refresh rows, keep the others
    python benchmarks/quality.py --tiny                   # dry run: tiny random DiT, to /tmp

    # N = 1000 on a 2-core CPU: one single-thread shard per core, then the report (each step resumes)
    python benchmarks/quality.py --n-samples 1000 --fid-ref-n 10000 --threads 1 --shard 0/2 &
    python benchmarks/quality.py --n-samples 1000 --fid-ref-n 10000 --threads 1 --shard 1/2; wait
    python benchmarks/quality.py --n-samples 1000 --fid-ref-n 10000 --threads 1

    # the committed table: sampled on a GPU (GPU_CHECK_QUALITY=8 bash benchmarks/gpu_check.sh runs
    # ... --defer-fid --shard I/8 there), the FIDs and the report on the CPU from its progress files
    seq 0 7 | xargs -P 2 -I{} python benchmarks/quality.py --n-samples 1000 --fid-ref-n 10000 --sampled-on cuda --shard {}/8
    python benchmarks/quality.py --n-samples 1000 --fid-ref-n 10000 --sampled-on cuda

Same pipeline and arguments as `dtq eval` (dtq_kernels/eval/cli.py); only the defaults differ:
every recipe, results written under benchmarks/results.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dtq_kernels.eval.cli import add_arguments, cli_eval  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args()
    args.recipes = args.recipes or "all"
    args.out_dir = args.out_dir or ("/tmp/dtq_quality_tiny" if args.tiny else RESULTS)
    cli_eval(args)
