"""Compile the Triton kernels for GPUs we don't have (sm_80/89/90) and check their PTX.

Run as `python -m dtq_kernels.ops.triton.aot [--arch 80 89 90]`: it must run with TRITON_INTERPRET=0
(under the interpreter @triton.jit makes interpreted functions that cannot be compiled), so the test
suite, which interprets, calls it in a subprocess. Prints one JSON object:
{spec name: {arch: {"missing": [expected PTX fragments not found], "shared": bytes, "regs": n,
"spill_bytes": n}}}, for every arch asked for, or those of them a spec names in its "archs" (FP8 MMA
exists on sm_89/90 only).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def _ptxas() -> Path:
    import triton
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def _resources(ptx: str, arch: int) -> dict:
    """Registers and spills per ptxas -v (the cubin triton made does not carry them in metadata)."""
    sm = "sm_90a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run([str(_ptxas()), "-v", f"-arch={sm}", str(src), "-o", str(Path(d) / "k.cubin")],
                             capture_output=True, text=True)
    text = res.stdout + res.stderr
    regs = re.findall(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill stores", text)
    return {"regs": max(map(int, regs)) if regs else None,
            "spill_bytes": max(map(int, spills)) if spills else 0}


def compile_spec(spec: dict, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    # Arguments the launcher would specialize as multiples of 16 (torch's 16-byte-aligned pointers,
    # strides like K=1152): the JIT does this at run time, and it decides vectorized/async loads.
    attrs = {(spec["fn"].arg_names.index(n),): [["tt.divisibility", 16]] for n in spec.get("divisible_by_16", ())}
    src = ASTSource(fn=spec["fn"], signature={**spec["signature"], **{k: "constexpr" for k in spec["constexprs"]}},
                    constexprs=spec["constexprs"], attrs=attrs)
    # launch options the kernel really runs with (warps and pipeline stages change registers and smem)
    options = {k: spec[k] for k in ("num_warps", "num_stages") if k in spec}
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    ptx = kernel.asm["ptx"]
    missing = [frag for frag in spec.get("expect", {}).get(arch, []) if frag not in ptx]
    return {"missing": missing, "shared": kernel.metadata.shared, **_resources(ptx, arch)}


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("aot: run with TRITON_INTERPRET=0", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 89, 90])
    parser.add_argument("--only", help="compile only specs whose name contains this")
    args = parser.parse_args(argv)
    from . import KERNEL_MODULES
    report = {}
    for module in KERNEL_MODULES:
        for spec in module.AOT_SPECS:
            if args.only and args.only not in spec["name"]:
                continue
            # a spec may name the archs it exists for (FP8 MMA: sm_89/90 only)
            report[spec["name"]] = {str(a): compile_spec(spec, a) for a in args.arch if a in spec.get("archs", (a,))}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
