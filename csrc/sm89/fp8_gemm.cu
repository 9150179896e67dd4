// FP8 E4M3 W8A8 scaled GEMM (scaled_gemm.h, fp32 accumulation) for sm_89: CUTLASS 2.x tensor-op
// mma.sync (m16n8k32 e4m3), multistage cp.async mainloop, the same fused scale + bias epilogue as INT8.
#include "sm80/run_gemm.hpp"

namespace dtq {

const char* fp8_gemm_sm89(const ScaledGemmParams& p, cudaStream_t stream) {
  // 128x128x64 threadblock tile, 4 warps of 64x64, 5 stages (80 KiB of shared memory), as for INT8.
  return sm80::run_scaled_gemm_any_out<cutlass::arch::Sm89, cutlass::float_e4m3_t, float, cutlass::arch::OpMultiplyAdd,
                                       cutlass::gemm::GemmShape<128, 128, 64>, cutlass::gemm::GemmShape<64, 64, 64>,
                                       cutlass::gemm::GemmShape<16, 8, 32>, std::integral_constant<int, 5>>(p, stream);
}

}  // namespace dtq
