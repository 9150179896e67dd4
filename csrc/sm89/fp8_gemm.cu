// FP8 E4M3 W8A8 scaled GEMM (scaled_gemm.h, fp32 accumulation) for sm_89: CUTLASS 2.x tensor-op
// mma.sync (m16n8k32 e4m3), multistage cp.async mainloop, the same fused scale + bias epilogue as INT8.
// OpMultiplyAdd (not FastAccum) keeps the sum in fp32: each mma accumulates into a fresh fragment that is
// then added to the fp32 accumulators. That doubles the accumulator registers, so the warps are 64x32
// (8 warps per 128x128 tile) where INT8 uses 64x64: with 64x64 warps this kernel spills.
#include "sm80/run_gemm.hpp"

namespace dtq {

const char* fp8_gemm_sm89(const ScaledGemmParams& p, cudaStream_t stream) {
  // 128x128x64 threadblock tile, 8 warps of 64x32, 4 stages (64 KiB of shared memory).
  return sm80::run_scaled_gemm_any_out<cutlass::arch::Sm89, cutlass::float_e4m3_t, float, cutlass::arch::OpMultiplyAdd,
                                       cutlass::gemm::GemmShape<128, 128, 64>, cutlass::gemm::GemmShape<64, 32, 64>,
                                       cutlass::gemm::GemmShape<16, 8, 32>, std::integral_constant<int, 4>>(p, stream);
}

}  // namespace dtq
