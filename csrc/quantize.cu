// Per-token symmetric activation quantization (docs/formats.md), bit-exact with the torch reference
// (dtq_kernels/ops/reference.py): per row, absmax in fp32; scale = absmax / qmax with a correctly rounded
// division; codes = clamp(rint(x / scale), -qmax, qmax) (correctly rounded division, round half to even);
// scale 0 (a zero row) -> codes 0. NaN inputs are not part of the contract (fmaxf drops them).
//
// One block per row. When the row start is 16-byte aligned and K is a multiple of the vector width,
// both passes use 16-byte loads (4 fp32 or 8 fp16/bf16) and matching int8 stores; otherwise scalar.
// The second pass re-reads the row, which is still in L1/L2 for the row sizes of DiT activations.
#include "common.h"

namespace {

constexpr int kThreads = 256;

template <typename T>
struct alignas(16) Vec {  // 16 bytes of T
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

template <int N>
struct alignas(N) Codes {  // N int8 codes, stored in one N-byte transaction
  int8_t c[N];
};

__device__ __forceinline__ float block_max(float v) {
  __shared__ float partial[kThreads / 32];
  v = dtq::warp_max(v);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    float w = threadIdx.x < kThreads / 32 ? partial[threadIdx.x] : 0.f;
    w = dtq::warp_max(w);
    if (threadIdx.x == 0) partial[0] = w;
  }
  __syncthreads();
  return partial[0];
}

__device__ __forceinline__ int8_t code(float v, float s, float qmax) {
  if (s == 0.f) return 0;  // as the reference: a zero scale forces code 0
  return static_cast<int8_t>(fminf(fmaxf(rintf(__fdiv_rn(v, s)), -qmax), qmax));
}

template <typename T, bool kVector>
__global__ void __launch_bounds__(kThreads) quantize_per_token_kernel(const T* __restrict__ x,
                                                                      int8_t* __restrict__ q,
                                                                      float* __restrict__ scale, int64_t K,
                                                                      float qmax) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * K;
  int8_t* qr = q + row * K;
  constexpr int N = Vec<T>::N;

  float amax = 0.f;
  if constexpr (kVector) {
    const Vec<T>* xv = reinterpret_cast<const Vec<T>*>(xr);
    for (int64_t i = threadIdx.x; i < K / N; i += kThreads) {
      const Vec<T> v = xv[i];
#pragma unroll
      for (int j = 0; j < N; ++j) amax = fmaxf(amax, fabsf(dtq::to_float(v.v[j])));
    }
  } else {
    for (int64_t k = threadIdx.x; k < K; k += kThreads) amax = fmaxf(amax, fabsf(dtq::to_float(xr[k])));
  }
  amax = block_max(amax);

  const float s = __fdiv_rn(amax, qmax);
  if (threadIdx.x == 0) scale[row] = s;

  if constexpr (kVector) {
    const Vec<T>* xv = reinterpret_cast<const Vec<T>*>(xr);
    Codes<N>* qv = reinterpret_cast<Codes<N>*>(qr);
    for (int64_t i = threadIdx.x; i < K / N; i += kThreads) {
      const Vec<T> v = xv[i];
      Codes<N> c;
#pragma unroll
      for (int j = 0; j < N; ++j) c.c[j] = code(dtq::to_float(v.v[j]), s, qmax);
      qv[i] = c;
    }
  } else {
    for (int64_t k = threadIdx.x; k < K; k += kThreads) qr[k] = code(dtq::to_float(xr[k]), s, qmax);
  }
}

template <typename T>
cudaError_t launch(const void* x, int8_t* q, float* scale, int64_t M, int64_t K, float qmax, cudaStream_t stream) {
  constexpr int N = Vec<T>::N;
  // Every row start is aligned when the base pointers are and K is a multiple of the vector width.
  const bool vector = K % N == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(q) % N == 0;
  const T* xt = static_cast<const T*>(x);
  const dim3 grid(static_cast<unsigned>(M));
  if (vector)
    quantize_per_token_kernel<T, true><<<grid, kThreads, 0, stream>>>(xt, q, scale, K, qmax);
  else
    quantize_per_token_kernel<T, false><<<grid, kThreads, 0, stream>>>(xt, q, scale, K, qmax);
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
