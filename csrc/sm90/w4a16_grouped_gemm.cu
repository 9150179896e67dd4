// W4A16 with per-group scales (w4a16_gemm.h) for sm_90a on CUTLASS's Hopper mixed-input GEMM in ConvertAndScale
// mode (run_mixed_gemm.hpp): each int4 code times its group's fp32 scale in fp32, rounded once to fp16/bf16 in
// registers, 16-bit wgmma with fp32 accumulation; the bias, per row of outᵀ, fused in the epilogue. A file of
// its own so that nvcc builds it beside the per-channel kernels in parallel.
#include "sm90/run_mixed_gemm.hpp"
#include "w4a16_gemm.h"

namespace dtq {
namespace {

using namespace cute;

// acc + bias[n] in fp32, rounded once to ElementOut (the scales were applied to the weights).
template <class TileShape, class ElementOut>
struct BiasEpilogue {
  using Channel = sm90::ChannelVector<TileShape, /*Transposed=*/true>;
  using Tree = cutlass::epilogue::fusion::Sm90EVT<sm90::Compute<cutlass::plus, ElementOut>,
                                                  cutlass::epilogue::fusion::Sm90AccFetch, Channel>;

  static typename Tree::Arguments arguments(W4A16GemmParams const& p) {
    return {
        {},                  // acc
        {p.bias, 0.f, {}},   // bias (nullptr: 0)
        {}};                 // plus, rounded to ElementOut
  }
};

template <class ElementAct, class ElementOut>
const char* run(W4A16GemmParams const& p, cudaStream_t stream) {
  return sm90::run_mixed_input_gemm<ElementAct, float, ElementOut, BiasEpilogue, /*kGroupScaled=*/true>(
      p, p.w, p.x, p.out, stream, {p.w_scale, p.group_size});
}

}  // namespace

const char* w4a16_gemm_grouped_sm90(const W4A16GemmParams& p, cudaStream_t stream) {
  if (p.group_size <= 0 || p.group_size % 64 || p.K % p.group_size)
    return "w4a16 per group: the group size must be a multiple of 64 that divides K";
  return with_16bit_act_and_out_elements(p.x_dtype, p.out_dtype, [&](auto act, auto out) {
    return run<decltype(act), decltype(out)>(p, stream);
  });
}

}  // namespace dtq
