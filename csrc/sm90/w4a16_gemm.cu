// W4A16 with per-channel scales (w4a16_gemm.h) for sm_90a on CUTLASS's Hopper mixed-input GEMM
// (run_mixed_gemm.hpp): int4 -> fp16/bf16 in registers (exact), 16-bit wgmma with fp32 accumulation; the
// per-channel scale and the bias, per row of outᵀ, fused in the epilogue. Per-group scales:
// w4a16_grouped_gemm.cu.
#include "sm90/run_mixed_gemm.hpp"
#include "w4a16_gemm.h"

namespace dtq {
namespace {

using namespace cute;

// (acc * w_scale[n]) + bias[n] in fp32, rounded once to ElementOut.
template <class TileShape, class ElementOut>
struct ChannelScaledEpilogue {
  using Channel = sm90::ChannelVector<TileShape, /*Transposed=*/true>;
  using TimesW = cutlass::epilogue::fusion::Sm90EVT<sm90::Compute<cutlass::multiplies, float>,
                                                    cutlass::epilogue::fusion::Sm90AccFetch, Channel>;
  using Tree = cutlass::epilogue::fusion::Sm90EVT<sm90::Compute<cutlass::plus, ElementOut>, TimesW, Channel>;

  static typename Tree::Arguments arguments(W4A16GemmParams const& p) {
    return {
        {                          // TimesW
            {},                    //   acc
            {p.w_scale, 0.f, {}},  //   w_scale
            {}},                   //   multiplies
        {p.bias, 0.f, {}},         // bias (nullptr: 0)
        {}};                       // plus, rounded to ElementOut
  }
};

template <class ElementAct, class ElementOut>
const char* run(W4A16GemmParams const& p, cudaStream_t stream) {
  return sm90::run_mixed_input_gemm<ElementAct, float, ElementOut, ChannelScaledEpilogue>(p, p.w, p.x, p.out, stream);
}

}  // namespace

const char* w4a16_gemm_sm90(const W4A16GemmParams& p, cudaStream_t stream) {
  if (p.group_size) return "w4a16: per-group scales run w4a16_gemm_grouped_sm90";
  return with_16bit_act_and_out_elements(p.x_dtype, p.out_dtype, [&](auto act, auto out) {
    return run<decltype(act), decltype(out)>(p, stream);
  });
}

}  // namespace dtq
