// Per-token symmetric activation quantization (DESIGN.md §2), bit-exact with the torch reference:
// fp32 absmax per row, scale = absmax / qmax with a correctly rounded division, codes =
// clamp(rint(x / scale)) (round half to even, correctly rounded division), zero row -> scale 0, codes 0.
#include "common.h"

namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads) quantize_per_token_kernel(const T* __restrict__ x,
                                                                      int8_t* __restrict__ q,
                                                                      float* __restrict__ scale, int64_t K,
                                                                      float qmax) {
  const T* xr = x + blockIdx.x * K;
  int8_t* qr = q + blockIdx.x * K;

  float amax = 0.f;
  for (int64_t k = threadIdx.x; k < K; k += kThreads) amax = fmaxf(amax, fabsf(dtq::to_float(xr[k])));
  __shared__ float partial[kThreads / 32];
  amax = dtq::warp_max(amax);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = amax;
  __syncthreads();
  if (threadIdx.x < 32) {
    float v = threadIdx.x < kThreads / 32 ? partial[threadIdx.x] : 0.f;
    v = dtq::warp_max(v);
    if (threadIdx.x == 0) partial[0] = v;
  }
  __syncthreads();

  const float s = __fdiv_rn(partial[0], qmax);
  if (threadIdx.x == 0) scale[blockIdx.x] = s;
  const float divisor = s == 0.f ? 1.f : s;  // a zero row has only zeros: codes 0
  for (int64_t k = threadIdx.x; k < K; k += kThreads) {
    const float v = rintf(__fdiv_rn(dtq::to_float(xr[k]), divisor));
    qr[k] = static_cast<int8_t>(fminf(fmaxf(v, -qmax), qmax));
  }
}

template <typename T>
cudaError_t launch(const void* x, int8_t* q, float* scale, int64_t M, int64_t K, float qmax, cudaStream_t stream) {
  quantize_per_token_kernel<T><<<static_cast<unsigned>(M), kThreads, 0, stream>>>(static_cast<const T*>(x), q,
                                                                                    scale, K, qmax);
  return cudaGetLastError();
}

}  // namespace

cudaError_t dtq_quantize_per_token(const void* x, int8_t* q, float* scale, int64_t M, int64_t K, int dtype,
                                   int bits, cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  const float qmax = static_cast<float>((1 << (bits - 1)) - 1);
  switch (dtype) {
    case dtq::kFloat32: return launch<float>(x, q, scale, M, K, qmax, stream);
    case dtq::kFloat16: return launch<__half>(x, q, scale, M, K, qmax, stream);
    case dtq::kBFloat16: return launch<__nv_bfloat16>(x, q, scale, M, K, qmax, stream);
    default: return cudaErrorInvalidValue;
  }
}
