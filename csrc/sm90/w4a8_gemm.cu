// W4A8: the scaled GEMM of scaled_gemm.h with packed int4 weights, for sm_90a on CUTLASS's Hopper mixed-input
// GEMM (run_mixed_gemm.hpp): int4 -> int8 in registers (exact), s8 x s8 wgmma with int32 accumulation (exact),
// then the scaled GEMMs' epilogue (sm90/epilogue.hpp) over outᵀ: ((float(acc) * act_scale(m)) * w_scale[n]) +
// bias[n] in fp32, one rounding. The token m is a column of outᵀ, so the activation scale is a row broadcast
// (per token, per tensor, or the static table entry picked on the device by group_idx).
#include "sm90/run_mixed_gemm.hpp"
#include "scaled_gemm.h"

namespace dtq {
namespace {

template <class TileShape, class ElementOut>
using TransposedScaledEpilogue = sm90::ScaledEpilogue<TileShape, ElementOut, /*Transposed=*/true>;

}  // namespace

const char* int8_gemm_w4_sm90(const ScaledGemmParams& p, cudaStream_t stream) {
  return with_out_element(p.out_dtype, [&](auto out) {
    return sm90::run_mixed_input_gemm<int8_t, int32_t, decltype(out), TransposedScaledEpilogue>(p, p.w, p.a, p.out,
                                                                                                stream);
  });
}

}  // namespace dtq
