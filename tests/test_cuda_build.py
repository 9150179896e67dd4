"""The CUDA extension: built for sm_80/89/90a (+ compute_90 PTX), importable without a GPU, correct on one."""
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import dtq_kernels.ops as ops
from dtq_kernels.ops import cuda, reference

HAS_NVCC = shutil.which("nvcc") is not None or Path("/usr/local/cuda/bin/nvcc").exists()


def _so() -> Path:
    try:
        from dtq_kernels import _C
    except ImportError as e:
        pytest.fail(f"dtq_kernels._C was not built although nvcc is present ({e}): run `make install`")
    return Path(_C.__file__)


def _cuobjdump(*args: str) -> str:
    import triton
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return subprocess.run([str(tool), *args, str(_so())], capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(not HAS_NVCC, reason="nvcc is not installed on this machine, so _C is not built")
def test_extension_holds_sass_for_every_arch_and_ptx():
    elves = _cuobjdump("-lelf")
    for arch in ("sm_80", "sm_89", "sm_90"):
        assert f"{arch}.cubin" in elves, elves
    assert "sm_90.ptx" in _cuobjdump("-lptx")  # compute_90 PTX for the driver to JIT on newer GPUs
    for arch in ("sm_80", "sm_89", "sm_90a"):
        sass = _cuobjdump("-sass", "-arch", arch)
        assert "quantize_per_token_kernel" in sass, arch
        # the float -> int conversion with round-to-nearest-even that makes the codes
        assert "F2I" in sass or "FRND" in sass, arch


@pytest.mark.skipif(not HAS_NVCC, reason="nvcc is not installed on this machine, so _C is not built")
def test_extension_imports_without_gpu_and_reports_why():
    from dtq_kernels import _C
    assert set(_C.built_archs()) >= {"sm_80", "sm_89", "sm_90a"}
    if torch.cuda.is_available():
        assert cuda.available()
        return
    assert not cuda.available()
    reason = cuda.unavailable_reason()
    assert "driver" in reason.lower() or "device" in reason.lower(), reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_cuda_kernel_without_gpu_raises_clearly():
    with pytest.raises(RuntimeError, match="cuda backend"):
        cuda.quantize_per_token(torch.randn(4, 8), 8)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 77, 256, 1000])
@pytest.mark.parametrize("k", [72, 1152, 3072, 4608])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 6])
def test_cuda_quantize_per_token_is_bit_exact(m, k, dtype, bits):
    g = torch.Generator().manual_seed(m * k + bits)
    x = torch.randn(m, k, generator=g)
    x[:, k // 3] *= 1000.0  # one huge outlier channel
    if m > 1:
        x[1] = 0  # a zero row
    x = x.to(dtype)
    q_ref, s_ref = reference.quantize_per_token(x, bits)
    with ops.use_backend("cuda"):
        q, s = ops.quantize_per_token(x.cuda(), bits)
    assert ops.last_backend["quantize_per_token"] == "cuda"
    assert torch.equal(s.cpu(), s_ref)
    assert torch.equal(q.cpu(), q_ref)
