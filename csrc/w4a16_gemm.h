// The weight-only int4 GEMM w4a16_gemm that the CUTLASS mixed-input kernel in sm90/ implements (semantics:
// docs/formats.md, reference: dtq_kernels/ops/reference.py w4a16_gemm). Per output channel (group_size 0):
//
//   out[m, n] = (acc[m, n] * w_scale[n]) + bias[n],   acc = x[m, :] · codes[n, :] summed in fp32
//
// The int4 codes convert exactly to the 16-bit activation type, so every product is exact in fp32; the
// epilogue runs in fp32 in this order, then one rounding to the output dtype. Per group of G along K:
//
//   out[m, n] = acc[m, n] + bias[n],   acc = x[m, :] · w16[n, :] summed in fp32,
//   w16[n, k] = code[n, k] * w_scale[k / G][n] in fp32, rounded once to x's 16-bit type
//
// (w_scale then MN-major [K/G, N], the layout CUTLASS's scaled mixed-input mainloop reads).
//
// Layouts: x [M, K] row-major fp16/bf16; w [N, K/2] bytes, two signed int4 codes per byte along K, the even k
// in the low nibble (dtq_kernels.formats.pack_int4, which is also CUTLASS's int4b_t order, so the packed
// tensor is passed as is); out [M, N] row-major. The Python side (dtq_kernels/ops/cuda.py) validates
// shapes, dtypes, alignment and devices first.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

namespace dtq {

struct W4A16GemmParams {
  const void* x = nullptr;          // [M, K] fp16 or bf16 (x_dtype)
  const void* w = nullptr;          // [N, K/2] packed int4
  const float* w_scale = nullptr;   // [N], or [K/G, N] with group_size G
  const float* bias = nullptr;      // [N] fp32, or nullptr
  void* out = nullptr;              // [M, N] in out_dtype
  int M = 0, N = 0, K = 0;
  int group_size = 0;               // 0: per-channel scales; else G, a multiple of 64 dividing K
  int x_dtype = 0;                  // dtq::DType (common.h): kFloat16 or kBFloat16
  int out_dtype = 0;                // dtq::DType
};

// nullptr on success, else a static message naming what failed (as the scaled GEMMs in scaled_gemm.h).
const char* w4a16_gemm_sm90(const W4A16GemmParams& p, cudaStream_t stream);  // sm_90a (TMA + wgmma, mixed input)
const char* w4a16_gemm_grouped_sm90(const W4A16GemmParams& p, cudaStream_t stream);  // the same, per-group scales

}  // namespace dtq
