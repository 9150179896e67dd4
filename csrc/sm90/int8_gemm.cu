// W8A8 INT8 scaled GEMM (scaled_gemm.h) for sm_90a: CUTLASS 3.x TMA loads, warp-specialized ping-pong
// wgmma (s8 x s8 -> s32), fused scale + bias epilogue visitor tree stored through TMA.
#include "sm90/run_gemm.hpp"

namespace dtq {

const char* int8_gemm_sm90(const ScaledGemmParams& p, cudaStream_t stream) {
  // 128x128x128 tiles, clusters of 2 along M (the w tile is multicast to both CTAs).
  return sm90::run_scaled_gemm_any_out<int8_t, int32_t, cute::Shape<cute::_128, cute::_128, cute::_128>,
                                       cute::Shape<cute::_2, cute::_1, cute::_1>,
                                       cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                                       cutlass::epilogue::TmaWarpSpecialized>(p, stream);
}

}  // namespace dtq
