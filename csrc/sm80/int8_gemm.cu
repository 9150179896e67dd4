// W8A8 INT8 scaled GEMM (scaled_gemm.h) for sm_80 and sm_89: CUTLASS 2.x tensor-op IMMA (mma.sync
// m16n8k32 s8), multistage cp.async mainloop, fused scale + bias epilogue visitor.
#include "sm80/run_gemm.hpp"

namespace dtq {

const char* int8_gemm_sm80(const ScaledGemmParams& p, cudaStream_t stream) {
  // 128x128x64 threadblock tile, 4 warps of 64x64, 5 stages (80 KiB of shared memory).
  return sm80::run_scaled_gemm_any_out<cutlass::arch::Sm80, int8_t, int32_t, cutlass::arch::OpMultiplyAddSaturate,
                                       cutlass::gemm::GemmShape<128, 128, 64>, cutlass::gemm::GemmShape<64, 64, 64>,
                                       cutlass::gemm::GemmShape<16, 8, 32>, std::integral_constant<int, 5>>(p, stream);
}

}  // namespace dtq
