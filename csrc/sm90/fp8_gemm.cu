// FP8 E4M3 W8A8 scaled GEMM (scaled_gemm.h) for sm_90a: CUTLASS 3.x TMA loads, warp-specialized cooperative
// wgmma (e4m3 x e4m3 -> f32), the same fused scale + bias epilogue as INT8. The non-"FastAccum" schedule:
// the mainloop adds the wgmma accumulators into fp32 registers every few K-blocks, because the tensor
// cores' own FP8 accumulation keeps fewer mantissa bits than fp32 (the op promises an fp32 sum). That
// second accumulator set is why this is the cooperative schedule (two consumer warpgroups share a 128-row
// tile, 64 + 64 fp32 registers each): with ping-pong (one warpgroup per tile) the kernel spills.
#include "sm90/run_gemm.hpp"

namespace dtq {

const char* fp8_gemm_sm90(const ScaledGemmParams& p, cudaStream_t stream) {
  // 128x128x128 tiles, clusters of 2 along M (the w tile is multicast to both CTAs).
  return sm90::run_scaled_gemm_any_out<cutlass::float_e4m3_t, float, cute::Shape<cute::_128, cute::_128, cute::_128>,
                                       cute::Shape<cute::_2, cute::_1, cute::_1>,
                                       cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                                       cutlass::epilogue::TmaWarpSpecializedCooperative>(p, stream);
}

}  // namespace dtq
