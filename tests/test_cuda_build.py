"""The CUDA extension: built for sm_80/89/90a (+ compute_90 PTX), importable without a GPU, correct on one."""
import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import dtq_kernels.ops as ops
from dtq_kernels.ops import cuda, reference


def _nvcc() -> str | None:
    """Where setup.py looks: $CUDACXX, $CUDA_HOME/bin/nvcc, PATH, /usr/local/cuda/bin/nvcc."""
    home = os.environ.get("CUDA_HOME")
    for c in (os.environ.get("CUDACXX"), home and os.path.join(home, "bin", "nvcc"), shutil.which("nvcc"),
              "/usr/local/cuda/bin/nvcc"):
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


needs_build = pytest.mark.skipif(
    _nvcc() is None or os.environ.get("DTQ_SKIP_CUDA") == "1",
    reason="nvcc is not installed on this machine (or DTQ_SKIP_CUDA=1), so dtq_kernels._C is not built")


def _so() -> Path:
    try:
        from dtq_kernels import _C
    except ImportError as e:
        pytest.fail(f"dtq_kernels._C was not built although nvcc is present ({e}): run "
                    "`pip install --no-build-isolation --no-deps -e .`")
    return Path(_C.__file__)


def _tool() -> str:
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def _cuobjdump(*args: str) -> str:
    return subprocess.run([_tool(), *args, str(_so())], capture_output=True, text=True, check=True).stdout


@functools.lru_cache(maxsize=1)
def _all_sass() -> dict[str, str]:
    """arch -> `cuobjdump -sass -arch arch` of the extension. Disassembling the CUTLASS kernels takes seconds per
    arch, so the three run at once, once per test session."""
    archs = ("sm_80", "sm_89", "sm_90a")
    procs = {a: subprocess.Popen([_tool(), "-sass", "-arch", a, str(_so())], stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, text=True) for a in archs}
    out = {a: p.communicate()[0] for a, p in procs.items()}
    for a, p in procs.items():
        assert p.returncode == 0, f"cuobjdump -sass -arch {a} failed ({p.returncode})"
    return out


def _functions(sass: str) -> dict[str, str]:
    """Mangled kernel name -> its SASS, from one `cuobjdump -sass` listing."""
    parts = re.split(r"^\s*Function : (\S+)\s*$", sass, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


@needs_build
def test_extension_holds_sass_for_every_arch_and_ptx():
    elves = _cuobjdump("-lelf")
    for arch in ("sm_80", "sm_89", "sm_90"):  # -lelf names the sm_90a cubin sm_90; its header says sm_90a
        assert f"{arch}.cubin" in elves, elves
    for arch in ("sm_80", "sm_89", "sm_90a"):
        sass = _all_sass()[arch]
        assert re.search(rf"^arch = {arch}$", sass, re.M), f"no {arch} cubin:\n{sass[:500]}"
        for dtype in ("If", "I6__half", "I13__nv_bfloat16"):  # every input dtype, vector and scalar variants
            assert len(re.findall(rf"Function : \S*quantize_per_token_kernel{dtype}Lb[01]E", sass)) == 2, \
                (arch, dtype)
        assert "FRND" in sass and "F2I" in sass, arch  # rintf (half to even), then float -> int8
        assert "LDG.E.128" in sass, arch               # the 16-byte vector loads
    ptx = _cuobjdump("-ptx")
    assert re.search(r"^arch = sm_90$", ptx, re.M) and re.search(r"^\.target sm_90$", ptx, re.M), \
        "no compute_90 PTX for newer GPUs to JIT"
    assert "quantize.sm_90.ptx" in _cuobjdump("-lptx")


# The CUTLASS scaled GEMMs (csrc/sm80, csrc/sm89, csrc/sm90): per arch, the kernels that carry our epilogue's
# activation-scale node (its mangled name), how many (one per output dtype: fp32, fp16, bf16) and the
# tensor-core instruction their main loop must use: IMMA (int8 mma.sync), QMMA (Ada FP8 mma.sync),
# IGMMA / QGMMA (Hopper warpgroup MMA on int8 / FP8).
GEMM_SASS = {
    "sm_80": [("int8", "15VisitorActScale", r"\bIMMA\.16832\.S8\.S8")],
    "sm_89": [("int8", "15VisitorActScale", r"\bIMMA\.16832\.S8\.S8"),
              ("fp8", "15VisitorActScale", r"\bQMMA\.16832\.F32\.E4M3\.E4M3")],
    "sm_90a": [("int8", "12Sm90ActScale", r"\bIGMMA\.64x128x32\.S8\.S8"),
               ("fp8", "12Sm90ActScale", r"\bQGMMA\.64x128x32\.F32\.E4M3\.E4M3")],
}
OPERAND_MANGLING = {"int8": "Ea", "fp8": "float_e4m3_t"}  # how each operand type shows in the kernel's name


@needs_build
@pytest.mark.parametrize("arch", sorted(GEMM_SASS))
def test_cutlass_gemms_use_the_tensor_core_instruction_of_their_arch(arch):
    kernels = _functions(_all_sass()[arch])
    for kind, node, mma in GEMM_SASS[arch]:
        mine = {name: sass for name, sass in kernels.items() if node in name}
        if kind == "fp8":
            mine = {name: sass for name, sass in mine.items() if OPERAND_MANGLING["fp8"] in name}
        else:
            mine = {name: sass for name, sass in mine.items() if OPERAND_MANGLING["fp8"] not in name}
        assert len(mine) == 3, (arch, kind, sorted(mine))
        for name, sass in mine.items():
            assert re.search(mma, sass), (arch, kind, name[:120], mma)
    if arch != "sm_89":  # FP8 mma.sync is an Ada instruction: no FP8 kernel in the sm_80 cubin
        assert not any(OPERAND_MANGLING["fp8"] in name and "15VisitorActScale" in name for name in kernels)


# The packed-int4 kernels on CUTLASS's mixed-input collective (csrc/sm90/w4a16_gemm.cu, w4a16_grouped_gemm.cu,
# w4a8_gemm.cu): sm_90a only, one per output dtype (fp32, fp16, bf16) and, for W4A16, activation dtype (bf16, fp16)
# and scale granularity (per channel; per group, where the collective multiplies each converted weight by its
# group's fp32 scale before the MMA). The int4 codes are converted in registers and fed to the warpgroup MMA with A
# from registers: HGMMA with fp32 accumulation (W4A16), IGMMA with int32 accumulation (W4A8). Keyed by the MMA
# atom's operand types in the kernel's name: operands -> (instruction, kernels per-channel, kernels per-group).
MIXED_INPUT = "MixedInput"
MIXED_MMA = {"F32BF16BF16": (r"\bHGMMA\.64x128x16\.F32\.BF16\b", 3, 3),
             "F32F16F16": (r"\bHGMMA\.64x128x16\.F32\s", 3, 3),
             "S32S8S8": (r"\bIGMMA\.64x128x32\.S8\.S8\b", 3, 0)}
INT4 = "integer_subbyteILi4ELb1E"  # signed int4 (cutlass::int4b_t) in a mangled name
GROUP_SCALED_INT4 = "integer_subbyteILi4ELb1EEEfE"  # int4b_t then float: the collective's tuple<int4b_t, float>


@needs_build
def test_int4_weight_kernels_use_warpgroup_mma_on_sm90a_only():
    kernels = {name: sass for name, sass in _functions(_all_sass()["sm_90a"]).items() if MIXED_INPUT in name}
    assert len(kernels) == sum(per_channel + per_group for _, per_channel, per_group in MIXED_MMA.values()), \
        sorted(kernels)
    for operands, (mma, per_channel, per_group) in MIXED_MMA.items():
        mine = {name: sass for name, sass in kernels.items() if f"_{operands}_RS" in name}
        grouped = [name for name in mine if GROUP_SCALED_INT4 in name]
        assert len(mine) == per_channel + per_group and len(grouped) == per_group, (operands, sorted(mine))
        assert all(INT4 in name for name in mine)
        for name, sass in mine.items():
            assert re.search(mma, sass), (operands, name[:120], mma)
    for arch in ("sm_80", "sm_89"):
        assert not any(MIXED_INPUT in name for name in _functions(_all_sass()[arch]))


@needs_build
def test_cutlass_gemms_do_not_spill():
    """ptxas's resource report per kernel: a stack frame or local memory in a GEMM means registers spilled."""
    usage = re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)",
                       _cuobjdump("-res-usage"))
    gemms = [(name, int(reg), int(stack), int(local)) for name, reg, stack, local in usage
             if "ActScale" in name or MIXED_INPUT in name]
    # (int8: sm_80, sm_89, sm_90a; fp8: sm_89, sm_90a) x 3 out dtypes; W4A16: 2 scale kinds x 2 activation x 3 out;
    # W4A8: 3 out
    assert len(gemms) == 15 + 12 + 3, len(gemms)
    spilled = [(name[:100], reg, stack, local) for name, reg, stack, local in gemms if stack or local]
    assert not spilled, spilled


@needs_build
def test_extension_imports_without_gpu_and_reports_why():
    from dtq_kernels import _C
    assert _C.built_archs() == ["sm_80", "sm_89", "sm_90a", "compute_90"]
    status = _C.cuda_status()
    if torch.cuda.is_available():
        assert status == "ok" and cuda.available() and cuda.unavailable_reason() is None
        return
    assert status != "ok"
    assert not cuda.available()
    reason = cuda.unavailable_reason()
    assert "driver" in reason.lower() or "device" in reason.lower(), reason
    # the raw entry point refuses before touching the (null) pointers, with the same reason
    with pytest.raises(RuntimeError, match="cannot run here: " + re.escape(status)):
        _C.quantize_per_token(0, 0, 0, 1, 8, 0, 8, 0)
    with pytest.raises(RuntimeError, match="cannot run here: " + re.escape(status)):
        _C.scaled_gemm("int8", 0, 0, True, 0, 1, 0, 0, 0, 0, 16, 16, 16, 0, 0)
    with pytest.raises(RuntimeError, match="cannot run here: " + re.escape(status)):
        _C.w4a16_gemm(0, 0, 0, 0, 0, 16, 16, 32, 0, 2, 2, 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_cuda_kernel_without_gpu_raises_clearly():
    with pytest.raises(RuntimeError, match="dtq cuda backend: .*(driver|device|not built)"):
        cuda.quantize_per_token(torch.randn(4, 8), 8)


@pytest.mark.gpu
def test_cuda_kernel_rejects_cpu_tensors():
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        cuda.quantize_per_token(torch.randn(4, 8), 8)


def _activations(m: int, k: int, dtype: torch.dtype, bits: int) -> torch.Tensor:
    """Random rows with an outlier channel, plus the edge rows: one huge outlier, all zero, exact .5 ties."""
    qmax = 2 ** (bits - 1) - 1
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m * k + bits))
    x[:, k // 3] *= 50.0          # an outlier channel
    x[0, k - 1] = 3.0e4           # one huge outlier in row 0 (fits fp16)
    if m > 1:
        x[1] = 0.0                # a zero row: scale 0, codes 0
    if m > 2:                     # scale exactly 0.25, codes n + 0.5: round half to even decides
        x[2] = ((torch.arange(k) % (2 * qmax)) - qmax + 0.5) * 0.25
        x[2, 0] = qmax * 0.25
    return x.to(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 77, 256, 1000])
@pytest.mark.parametrize("k", [72, 77, 1152, 3072, 4608])  # 77: the scalar (unvectorized) path
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 6])
def test_cuda_quantize_per_token_is_bit_exact(m, k, dtype, bits):
    x = _activations(m, k, dtype, bits)
    q_ref, s_ref = reference.quantize_per_token(x, bits)
    with ops.use_backend("cuda"):
        q, s = ops.quantize_per_token(x.cuda(), bits)
    assert ops.last_backend["quantize_per_token"] == "cuda"
    assert s.dtype == torch.float32 and q.dtype == torch.int8
    assert torch.equal(s.cpu(), s_ref)
    assert torch.equal(q.cpu(), q_ref)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_cuda_quantize_per_token_misaligned_input(dtype, bits):
    """A contiguous view that starts off a 16-byte boundary takes the scalar path, same answer."""
    x = _activations(33, 1152, dtype, bits)
    buf = torch.empty(x.numel() + 1, dtype=dtype, device="cuda")
    xg = buf[1:].view(33, 1152)
    xg.copy_(x)
    assert xg.is_contiguous() and xg.data_ptr() % 16 != 0
    q, s = cuda.quantize_per_token(xg, bits)
    q_ref, s_ref = reference.quantize_per_token(x, bits)
    assert torch.equal(s.cpu(), s_ref) and torch.equal(q.cpu(), q_ref)
