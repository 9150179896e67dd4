// CUTLASS 3.x epilogue visitor tree (EVT) for the scaled GEMMs on sm_90a (scaled_gemm.h):
//   out = ((float(acc) * act_scale(m)) * w_scale[n]) + bias[n], rounded once to ElementOut.
// Multiplies and adds are separate nodes evaluated in the reference's order.
#pragma once
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"

#include "cutlass_glue.hpp"
#include "scaled_gemm.h"

namespace dtq::sm90 {

using namespace cute;

// ActScaleArguments (cutlass_glue.hpp) as an epilogue node.
template <class TileShape>
struct Sm90ActScale : cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, float, float, Stride<bool, _0, _0>,
                                                                  /*Alignment=*/1, /*EnableNullptr=*/false> {
  using Base = cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, float, float, Stride<bool, _0, _0>, 1, false>;

  using Arguments = ActScaleArguments;
  using Params = ActScaleParams<typename Base::Params>;
  using SharedStorage = typename Base::SharedStorage;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args, void*) {
    typename Base::Params base{args.ptr, 0.f, {args.per_token, _0{}, _0{}}};
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

  CUTLASS_HOST_DEVICE Sm90ActScale() {}
  CUTLASS_HOST_DEVICE Sm90ActScale(Params const& params, SharedStorage const& shared_storage)
      : Base(params.base, shared_storage), table(params.base.ptr_col), group_idx(params.group_idx),
        groups(params.groups) {}

  float const* table;
  int32_t const* group_idx;
  int groups;

  // Base reads its pointer from this->params when it builds the per-tile callbacks, so the offset pointer is
  // set there (from the table each time: persistent kernels call this once per output tile).
  template <bool ReferenceSrc, class... Args>
  CUTLASS_DEVICE auto get_consumer_store_callbacks(cutlass::epilogue::fusion::ConsumerStoreArgs<Args...> const& args) {
    this->params.ptr_col = act_scale_start(table, group_idx, groups);
    return Base::template get_consumer_store_callbacks<ReferenceSrc>(args);
  }
};

template <class TileShape, class ElementOut>
struct ScaledEpilogue {
  static constexpr auto RN = cutlass::FloatRoundStyle::round_to_nearest;
  template <template <class> class Fn, class Out>
  using Compute = cutlass::epilogue::fusion::Sm90Compute<Fn, Out, float, RN>;
  // w_scale and bias: fp32 [N], 16-byte aligned (Python checks); bias nullptr reads as 0.
  using RowVector = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, _1, _0>>;
  using Acc = cutlass::epilogue::fusion::Sm90AccFetch;
  using ActScale = Sm90ActScale<TileShape>;

  using AccTimesAct = cutlass::epilogue::fusion::Sm90EVT<Compute<cutlass::multiplies, float>, Acc, ActScale>;
  using TimesW = cutlass::epilogue::fusion::Sm90EVT<Compute<cutlass::multiplies, float>, AccTimesAct, RowVector>;
  using Tree = cutlass::epilogue::fusion::Sm90EVT<Compute<cutlass::plus, ElementOut>, TimesW, RowVector>;

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
