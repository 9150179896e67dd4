// The scaled GEMM that the CUTLASS kernels in sm80/ and sm90/ implement (semantics: docs/formats.md,
// reference: dtq_kernels/ops/reference.py int8_gemm / int8_gemm_static):
//
//   out[m, n] = ((float(acc[m, n]) * act_scale(m)) * w_scale[n]) + bias[n],   acc = a[m, :] · w[n, :]
//
// with acc exact in int32 (INT8 codes) or an fp32 sum (FP8 E4M3 codes: each product is exact in fp32), the
// epilogue in fp32 (this order), then one rounding to the output dtype.
// act_scale(m) = a_scale[group + (a_scale_per_token ? m : 0)], where group = clamp(*group_idx, 0, groups - 1)
// is read on the device when group_idx is given (static per-time-group scales: no host sync, so the call can
// be captured in a CUDA graph and replayed with a new index) and 0 otherwise.
//
// Layouts: a [M, K] and w [N, K] row-major (the "TN" GEMM), out [M, N] row-major; all dense.
// The Python side (dtq_kernels/ops/cuda.py) validates shapes, dtypes, alignment and devices first.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

namespace dtq {

struct ScaledGemmParams {
  const void* a = nullptr;            // [M, K] int8 or float8_e4m3 codes
  const void* w = nullptr;            // [N, K] codes of the same type
  const float* a_scale = nullptr;     // [M] per token, or a table of `groups` per-tensor scales
  bool a_scale_per_token = false;
  const int32_t* group_idx = nullptr; // device pointer to one index into a_scale, or nullptr
  int groups = 1;
  const float* w_scale = nullptr;     // [N]
  const float* bias = nullptr;        // [N] fp32, or nullptr
  void* out = nullptr;                // [M, N] in out_dtype
  int M = 0, N = 0, K = 0;
  int out_dtype = 0;                  // dtq::DType (common.h)
};

// Each returns nullptr on success, else a static message naming what failed. Launch-time CUDA errors are
// reported by the next CUDA call, as for any kernel launch.
const char* int8_gemm_sm80(const ScaledGemmParams& p, cudaStream_t stream);  // sm_80 / sm_89 (mma.sync IMMA)
const char* int8_gemm_sm90(const ScaledGemmParams& p, cudaStream_t stream);  // sm_90a (TMA + wgmma)
const char* fp8_gemm_sm89(const ScaledGemmParams& p, cudaStream_t stream);   // sm_89 (mma.sync e4m3)
const char* fp8_gemm_sm90(const ScaledGemmParams& p, cudaStream_t stream);   // sm_90a (TMA + wgmma)
// W4A8: w holds packed int4 codes [N, K/2] (dtq_kernels.formats.pack_int4: the even k in the low nibble, which is
// CUTLASS's int4b_t order), K a multiple of 32; the same activation scales as above.
const char* int8_gemm_w4_sm90(const ScaledGemmParams& p, cudaStream_t stream);  // sm_90a (mixed-input wgmma)

}  // namespace dtq
