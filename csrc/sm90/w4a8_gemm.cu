// W4A8: the scaled GEMM of scaled_gemm.h with packed int4 weights, for sm_90a on CUTLASS's Hopper mixed-input
// GEMM (run_mixed_gemm.hpp): int4 -> int8 in registers (exact), s8 x s8 wgmma with int32 accumulation (exact),
// then ((float(acc) * act_scale(m)) * w_scale[n]) + bias[n] in fp32 in the epilogue, one rounding. The token m
// is a column of outᵀ, so the activation scale is a row broadcast: a_scale[m] per token or a_scale[0] per
// tensor (a runtime stride of 1 or 0). The static per-time-group index (group_idx) is not supported here.
#include "sm90/run_mixed_gemm.hpp"
#include "scaled_gemm.h"

namespace dtq {
namespace {

using namespace cute;

struct TokenChannelScaledEpilogue {
  template <class TileShape>
  using TokenScale = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, bool, _0>,
                                                                 /*Alignment=*/1, /*EnableNullptr=*/false>;
  template <class TileShape>
  using AccTimesAct = cutlass::epilogue::fusion::Sm90EVT<sm90::Compute<cutlass::multiplies, float>,
                                                         cutlass::epilogue::fusion::Sm90AccFetch, TokenScale<TileShape>>;
  template <class TileShape>
  using TimesW = cutlass::epilogue::fusion::Sm90EVT<sm90::Compute<cutlass::multiplies, float>, AccTimesAct<TileShape>,
                                                    sm90::ChannelVector<TileShape>>;
  template <class TileShape, class ElementOut>
  using Tree = cutlass::epilogue::fusion::Sm90EVT<sm90::Compute<cutlass::plus, ElementOut>, TimesW<TileShape>,
                                                  sm90::ChannelVector<TileShape>>;

  template <class TileShape, class ElementOut>
  static typename Tree<TileShape, ElementOut>::Arguments arguments(ScaledGemmParams const& p) {
    return {
        {                                                             // TimesW
            {                                                         // AccTimesAct
                {},                                                   //   acc
                {p.a_scale, 0.f, {_0{}, p.a_scale_per_token, _0{}}},  //   act scale
                {}},                                                  //   multiplies
            {p.w_scale, 0.f, {}},                                     //   w_scale
            {}},                                                      //   multiplies
        {p.bias, 0.f, {}},                                            // bias (nullptr: 0)
        {}};                                                          // plus, rounded to ElementOut
  }
};

}  // namespace

const char* int8_gemm_w4_sm90(const ScaledGemmParams& p, cudaStream_t stream) {
  if (p.group_idx != nullptr) return "the W4A8 kernel takes no group_idx (static per-time-group scales)";
  return with_out_element(p.out_dtype, [&](auto out) {
    return sm90::run_mixed_input_gemm<int8_t, int32_t, decltype(out), TokenChannelScaledEpilogue>(p, p.w, p.a, p.out,
                                                                                                  stream);
  });
}

}  // namespace dtq
