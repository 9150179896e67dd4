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

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "dtq_kernels CUDA kernels (raw-pointer entry points; see dtq_kernels/ops/cuda.py)";
  m.def("cuda_status", &cuda_status, "'ok', or why CUDA cannot be used here");
  m.def("built_archs", &built_archs, "the SASS (sm_XX) and PTX (compute_XX) targets compiled in");
  m.def("quantize_per_token", &quantize_per_token, py::arg("x"), py::arg("q"), py::arg("scale"), py::arg("M"),
        py::arg("K"), py::arg("dtype"), py::arg("bits"), py::arg("stream"));
}
