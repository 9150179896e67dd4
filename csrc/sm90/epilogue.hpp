// CUTLASS 3.x epilogue visitor tree (EVT) for the scaled GEMMs on sm_90a (scaled_gemm.h), over out or, for the
// mixed-input kernels (run_mixed_gemm.hpp), over outᵀ:
//   out = ((float(acc) * act_scale(m)) * w_scale[n]) + bias[n], rounded once to ElementOut.
// Multiplies and adds are separate nodes evaluated in the reference's order.
#pragma once
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"

#include "cutlass_glue.hpp"
#include "scaled_gemm.h"

namespace dtq::sm90 {

using namespace cute;

// ActScaleArguments (cutlass_glue.hpp) as an epilogue node on top of one of CUTLASS's vector broadcasts (Base),
// whose runtime stride (Traits::stride) is 1 per token or 0 per tensor and whose pointer (Traits::ptr) is offset
// to the table entry on the device.
template <class Base, class Traits>
struct Sm90ActScaleNode : Base {
  using Arguments = ActScaleArguments;
  using Params = ActScaleParams<typename Base::Params>;
  using SharedStorage = typename Base::SharedStorage;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args, void*) {
    typename Base::Params base{args.ptr, 0.f, Traits::stride(args.per_token)};
    return {base, args.group_idx, args.groups};
  }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const& args) {
    return args.ptr != nullptr && args.groups >= 1;
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&) { return 0; }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*, cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }

  CUTLASS_HOST_DEVICE Sm90ActScaleNode() {}
  CUTLASS_HOST_DEVICE Sm90ActScaleNode(Params const& params, SharedStorage const& shared_storage)
      : Base(params.base, shared_storage), table(Traits::ptr(params.base)), group_idx(params.group_idx),
        groups(params.groups) {}

  float const* table;
  int32_t const* group_idx;
  int groups;

  // Base reads its pointer from this->params when it builds the per-tile callbacks, so the offset pointer is
  // set there (from the table each time: persistent kernels call this once per output tile).
  template <bool ReferenceSrc, class... Args>
  CUTLASS_DEVICE auto get_consumer_store_callbacks(cutlass::epilogue::fusion::ConsumerStoreArgs<Args...> const& args) {
    Traits::ptr(this->params) = act_scale_start(table, group_idx, groups);
    return Base::template get_consumer_store_callbacks<ReferenceSrc>(args);
  }
};

// The token m is a row of out (the TN scaled GEMMs): a column broadcast.
struct ActScaleColTraits {
  static constexpr Stride<bool, _0, _0> stride(bool per_token) { return {per_token, _0{}, _0{}}; }
  template <class P>
  CUTLASS_HOST_DEVICE static auto& ptr(P& params) { return params.ptr_col; }
};
template <class TileShape>
using ActScaleColNode =
    Sm90ActScaleNode<cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, float, float, Stride<bool, _0, _0>,
                                                                 /*Alignment=*/1, /*EnableNullptr=*/false>,
                     ActScaleColTraits>;
template <class TileShape>
struct Sm90ActScale : ActScaleColNode<TileShape> {
  using Node = ActScaleColNode<TileShape>;
  using Node::Node;
};

// The token m is a column of outᵀ (the mixed-input kernels compute the transposed product): a row broadcast.
struct ActScaleRowTraits {
  static constexpr Stride<_0, bool, _0> stride(bool per_token) { return {_0{}, per_token, _0{}}; }
  template <class P>
  CUTLASS_HOST_DEVICE static auto& ptr(P& params) { return params.ptr_row; }
};
template <class TileShape>
using ActScaleRowNode =
    Sm90ActScaleNode<cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, bool, _0>,
                                                                 /*Alignment=*/1, /*EnableNullptr=*/false>,
                     ActScaleRowTraits>;
template <class TileShape>
struct Sm90ActScaleRow : ActScaleRowNode<TileShape> {
  using Node = ActScaleRowNode<TileShape>;
  using Node::Node;
};

// A per-output-channel fp32 vector [N] (w_scale, bias): a row broadcast over out, a column broadcast over outᵀ.
// 16-byte aligned (Python checks); nullptr reads as 0.
template <class TileShape, bool Transposed>
using ChannelVector = cute::conditional_t<
    Transposed, cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, float, float, Stride<_1, _0, _0>>,
    cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, _1, _0>>>;

template <template <class> class Fn, class Out>
using Compute = cutlass::epilogue::fusion::Sm90Compute<Fn, Out, float, cutlass::FloatRoundStyle::round_to_nearest>;

// Transposed: the tree runs over outᵀ (the mixed-input kernels), so the token and channel broadcasts swap.
template <class TileShape, class ElementOut, bool Transposed = false>
struct ScaledEpilogue {
  using Channel = ChannelVector<TileShape, Transposed>;  // w_scale and bias (nullptr: 0)
  using Acc = cutlass::epilogue::fusion::Sm90AccFetch;
  using ActScale = cute::conditional_t<Transposed, Sm90ActScaleRow<TileShape>, Sm90ActScale<TileShape>>;

  using AccTimesAct = cutlass::epilogue::fusion::Sm90EVT<Compute<cutlass::multiplies, float>, Acc, ActScale>;
  using TimesW = cutlass::epilogue::fusion::Sm90EVT<Compute<cutlass::multiplies, float>, AccTimesAct, Channel>;
  using Tree = cutlass::epilogue::fusion::Sm90EVT<Compute<cutlass::plus, ElementOut>, TimesW, Channel>;

  static typename Tree::Arguments arguments(ScaledGemmParams const& p) {
    return {
        {                                                                 // TimesW
            {                                                             // AccTimesAct
                {},                                                       //   acc
                {p.a_scale, p.a_scale_per_token, p.group_idx, p.groups},  //   act scale
                {}},                                                      //   multiplies
            {p.w_scale, 0.f, {}},                                         //   w_scale
            {}},                                                          //   multiplies
        {p.bias, 0.f, {}},                                                // bias (nullptr: 0)
        {}};                                                              // plus, rounded to ElementOut
  }
};

}  // namespace dtq::sm90
