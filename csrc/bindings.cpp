// pybind11 module dtq_kernels._C. Entry points take raw device pointers (tensor.data_ptr()) and a
// stream handle (torch.cuda.current_stream().cuda_stream) as Python ints, so no torch headers are
// needed and the module builds against any torch. Validation of shapes/dtypes happens in Python.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"
#include "scaled_gemm.h"
#include "w4a16_gemm.h"

namespace py = pybind11;

namespace {

std::string cuda_status() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
  if (count == 0) return "no CUDA device";
  return "ok";
}

#ifndef DTQ_BUILT_ARCHS
#error "DTQ_BUILT_ARCHS is set by CMakeLists.txt from the -gencode list"
#endif

std::vector<std::string> built_archs() {
  std::vector<std::string> archs;
  std::string all = DTQ_BUILT_ARCHS;
  for (size_t start = 0, end; start <= all.size(); start = end + 1) {
    end = all.find(',', start);
    if (end == std::string::npos) end = all.size();
    if (end > start) archs.push_back(all.substr(start, end - start));
  }
  return archs;
}

void require_cuda() {
  const std::string status = cuda_status();
  if (status != "ok") throw std::runtime_error("dtq_kernels._C cannot run here: " + status);
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("dtq_kernels._C.") + what + " failed: " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
}

void quantize_per_token(uintptr_t x, uintptr_t q, uintptr_t scale, int64_t M, int64_t K, int dtype, int bits,
                        uintptr_t stream) {
  require_cuda();
  if (bits < 2 || bits > 8) throw std::invalid_argument("bits must be in 2..8");
  if (dtype < dtq::kFloat32 || dtype > dtq::kBFloat16) throw std::invalid_argument("unsupported dtype code");
  if (M < 0 || K < 0 || M > 0x7fffffff) throw std::invalid_argument("bad shape");
  py::gil_scoped_release release;
  check(dtq_quantize_per_token(reinterpret_cast<const void*>(x), reinterpret_cast<int8_t*>(q),
                               reinterpret_cast<float*>(scale), M, K, dtype, bits,
                               reinterpret_cast<cudaStream_t>(stream)),
        "quantize_per_token");
}

// The compute capability of the current device, as 10 * major + minor (two attribute reads: no sync).
int current_compute_capability() {
  int device = 0, major = 0, minor = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "cudaDeviceGetAttribute");
  check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), "cudaDeviceGetAttribute");
  return 10 * major + minor;
}

// The scaled GEMM of scaled_gemm.h on the current device, with the kernel built for its architecture:
// sm_90 -> CUTLASS 3.x (sm_90a SASS); int8: sm_80..sm_89 -> CUTLASS 2.x (sm_80 / sm_89 SASS); fp8: sm_89 ->
// CUTLASS 2.x (sm_89 SASS); w4a8 (int8 activations, packed int4 weights [N, K/2]): sm_90 only (CUTLASS 3.x
// mixed-input GEMM).
void scaled_gemm(const std::string& kind, uintptr_t a, uintptr_t a_scale, bool a_scale_per_token,
                 uintptr_t group_idx, int groups, uintptr_t w, uintptr_t w_scale, uintptr_t bias, uintptr_t out,
                 int64_t M, int64_t N, int64_t K, int out_dtype, uintptr_t stream) {
  require_cuda();
  if (kind != "int8" && kind != "fp8" && kind != "w4a8")
    throw std::invalid_argument("scaled_gemm: unknown kind '" + kind + "' (expected 'int8', 'fp8' or 'w4a8')");
  if (kind == "w4a8" && K % 32) throw std::invalid_argument("scaled_gemm(w4a8): K must be a multiple of 32");
  if (out_dtype < dtq::kFloat32 || out_dtype > dtq::kBFloat16) throw std::invalid_argument("unsupported out_dtype code");
  if (M < 0 || N <= 0 || K <= 0 || M > 0x7fffffff || N > 0x7fffffff || K > 0x7fffffff || N % 16 || K % 16)
    throw std::invalid_argument("scaled_gemm: bad shape (need M >= 0, N and K positive multiples of 16)");
  if (groups < 1) throw std::invalid_argument("scaled_gemm: groups must be >= 1");
  if (M == 0) return;  // nothing to compute (an empty tensor may have a null data pointer)
  if (!a || !a_scale || !w || !w_scale || !out) throw std::invalid_argument("scaled_gemm: null operand pointer");
  dtq::ScaledGemmParams p;
  p.a = reinterpret_cast<const void*>(a);
  p.w = reinterpret_cast<const void*>(w);
  p.a_scale = reinterpret_cast<const float*>(a_scale);
  p.a_scale_per_token = a_scale_per_token;
  p.group_idx = reinterpret_cast<const int32_t*>(group_idx);
  p.groups = groups;
  p.w_scale = reinterpret_cast<const float*>(w_scale);
  p.bias = reinterpret_cast<const float*>(bias);
  p.out = reinterpret_cast<void*>(out);
  p.M = static_cast<int>(M);
  p.N = static_cast<int>(N);
  p.K = static_cast<int>(K);
  p.out_dtype = out_dtype;
  const int cc = current_compute_capability();
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  const char* error = nullptr;
  {
    py::gil_scoped_release release;
    if (kind == "int8") {
      if (cc == 90) error = dtq::int8_gemm_sm90(p, s);
      else if (cc >= 80 && cc < 90) error = dtq::int8_gemm_sm80(p, s);
      else error = "no INT8 kernel for this GPU";
    } else if (kind == "w4a8") {
      error = cc == 90 ? dtq::int8_gemm_w4_sm90(p, s) : "no W4A8 kernel for this GPU (sm_90a only)";
    } else {
      if (cc == 90) error = dtq::fp8_gemm_sm90(p, s);
      else if (cc == 89) error = dtq::fp8_gemm_sm89(p, s);
      else error = "no FP8 kernel for this GPU (FP8 tensor cores: sm_89, sm_90)";
    }
  }
  if (error)
    throw std::runtime_error("dtq_kernels._C.scaled_gemm(" + kind + ") on sm_" + std::to_string(cc) + ": " + error +
                             " (built for " DTQ_BUILT_ARCHS ")");
  check(cudaGetLastError(), "scaled_gemm launch");
}

// The weight-only int4 GEMM of w4a16_gemm.h: sm_90 only (CUTLASS 3.x mixed-input collective, sm_90a SASS).
void w4a16_gemm(uintptr_t x, uintptr_t w, uintptr_t w_scale, uintptr_t bias, uintptr_t out, int64_t M, int64_t N,
                int64_t K, int64_t group_size, int x_dtype, int out_dtype, uintptr_t stream) {
  require_cuda();
  if (x_dtype != dtq::kFloat16 && x_dtype != dtq::kBFloat16)
    throw std::invalid_argument("w4a16_gemm: x must be fp16 or bf16");
  if (out_dtype < dtq::kFloat32 || out_dtype > dtq::kBFloat16) throw std::invalid_argument("unsupported out_dtype code");
  if (M < 0 || N <= 0 || K <= 0 || M > 0x7fffffff || N > 0x7fffffff || K > 0x7fffffff || N % 16 || K % 32)
    throw std::invalid_argument("w4a16_gemm: bad shape (need M >= 0, N a positive multiple of 16, K of 32)");
  if (group_size != 0 && (group_size < 0 || group_size % 64 || K % group_size))
    throw std::invalid_argument("w4a16_gemm: group_size must be 0 (per channel) or a multiple of 64 dividing K");
  if (M == 0) return;  // nothing to compute (an empty tensor may have a null data pointer)
  if (!x || !w || !w_scale || !out) throw std::invalid_argument("w4a16_gemm: null operand pointer");
  dtq::W4A16GemmParams p;
  p.x = reinterpret_cast<const void*>(x);
  p.w = reinterpret_cast<const void*>(w);
  p.w_scale = reinterpret_cast<const float*>(w_scale);
  p.bias = reinterpret_cast<const float*>(bias);
  p.out = reinterpret_cast<void*>(out);
  p.M = static_cast<int>(M);
  p.N = static_cast<int>(N);
  p.K = static_cast<int>(K);
  p.group_size = static_cast<int>(group_size);
  p.x_dtype = x_dtype;
  p.out_dtype = out_dtype;
  const int cc = current_compute_capability();
  const char* error = nullptr;
  {
    py::gil_scoped_release release;
    const auto s = reinterpret_cast<cudaStream_t>(stream);
    error = cc != 90 ? "no W4A16 kernel for this GPU (sm_90a only)"
            : group_size ? dtq::w4a16_gemm_grouped_sm90(p, s) : dtq::w4a16_gemm_sm90(p, s);
  }
  if (error)
    throw std::runtime_error("dtq_kernels._C.w4a16_gemm on sm_" + std::to_string(cc) + ": " + error +
                             " (built for " DTQ_BUILT_ARCHS ")");
  check(cudaGetLastError(), "w4a16_gemm launch");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "dtq_kernels CUDA kernels (raw-pointer entry points; see dtq_kernels/ops/cuda.py)";
  m.def("cuda_status", &cuda_status, "'ok', or why CUDA cannot be used here");
  m.def("built_archs", &built_archs, "the SASS (sm_XX) and PTX (compute_XX) targets compiled in");
  m.def("quantize_per_token", &quantize_per_token, py::arg("x"), py::arg("q"), py::arg("scale"), py::arg("M"),
        py::arg("K"), py::arg("dtype"), py::arg("bits"), py::arg("stream"));
  m.def("compute_capability", &current_compute_capability, "10 * major + minor of the current CUDA device");
  m.def("scaled_gemm", &scaled_gemm,
        "out = ((a . w^T) * act_scale * w_scale) + bias with CUTLASS (csrc/scaled_gemm.h); kind 'int8', 'fp8' or "
        "'w4a8' (packed int4 w)",
        py::arg("kind"), py::arg("a"), py::arg("a_scale"), py::arg("a_scale_per_token"), py::arg("group_idx"),
        py::arg("groups"), py::arg("w"), py::arg("w_scale"), py::arg("bias"), py::arg("out"), py::arg("M"),
        py::arg("N"), py::arg("K"), py::arg("out_dtype"), py::arg("stream"));
  m.def("w4a16_gemm", &w4a16_gemm,
        "out = x . (codes x w_scale)^T + bias, packed int4 weights, per-channel or per-group (MN-major [K/G, N]) "
        "scales, with CUTLASS on sm_90a (csrc/w4a16_gemm.h)",
        py::arg("x"), py::arg("w"), py::arg("w_scale"), py::arg("bias"), py::arg("out"), py::arg("M"), py::arg("N"),
        py::arg("K"), py::arg("group_size"), py::arg("x_dtype"), py::arg("out_dtype"), py::arg("stream"));
}
