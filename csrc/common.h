// Shared helpers for the dtq CUDA kernels (no torch headers: tensors arrive as raw pointers).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>

namespace dtq {

// Input dtype codes used across the bindings: must match dtq_kernels/ops/cuda.py.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

#ifdef __CUDACC__  // device helpers: only for nvcc, bindings.cpp is compiled by the host compiler
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}
#endif

}  // namespace dtq

cudaError_t dtq_quantize_per_token(const void* x, int8_t* q, float* scale, int64_t M, int64_t K, int dtype,
                                   int bits, cudaStream_t stream);
