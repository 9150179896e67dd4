// CUTLASS 2.x epilogue visitor tree (EVT) for the scaled GEMMs on sm_80/sm_89 (scaled_gemm.h):
//   out = ((float(acc) * act_scale(m)) * w_scale[n]) + bias[n], rounded once to ElementOut.
// Multiplies and adds are separate nodes evaluated in the reference's order.
#pragma once
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/threadblock/fusion/visitors.hpp"

#include "cutlass_glue.hpp"
#include "scaled_gemm.h"

namespace dtq::sm80 {

using namespace cute;

// ActScaleArguments (cutlass_glue.hpp) as an epilogue node.
template <class ThreadMap>
struct VisitorActScale : cutlass::epilogue::threadblock::VisitorColBroadcast<
                             ThreadMap, float, Stride<int64_t, _0, _0>, /*EnableNullptr=*/false> {
  using Base = cutlass::epilogue::threadblock::VisitorColBroadcast<ThreadMap, float, Stride<int64_t, _0, _0>, false>;

  using Arguments = ActScaleArguments;
  using Params = ActScaleParams<typename Base::Params>;
  using SharedStorage = typename Base::SharedStorage;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args, void*) {
    typename Base::Params base{args.ptr, 0.f, {int64_t(args.per_token ? 1 : 0), _0{}, _0{}}};
    return {base, args.group_idx, args.groups};
  }

  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&) { return 0; }

  CUTLASS_HOST_DEVICE VisitorActScale() {}
  CUTLASS_HOST_DEVICE VisitorActScale(Params const& params, SharedStorage const& shared_storage)
      : Base(params.base, shared_storage), params_ptr(&params) {}

  Params const* params_ptr;

  template <class ProblemShape>
  CUTLASS_DEVICE auto get_callbacks(cutlass::gemm::GemmCoord threadblock_tile_offset, int thread_idx,
                                    ProblemShape problem_shape) {
    float const* ptr = act_scale_start(params_ptr->base.ptr_col, params_ptr->group_idx, params_ptr->groups);
    // From here on as VisitorColBroadcast::get_callbacks, on the offset pointer.
    Tensor mCol = make_tensor(make_gmem_ptr(ptr), problem_shape, params_ptr->base.dCol);
    Tensor tC_gCol = group_modes<1, 4>(ThreadMap::partition(mCol, thread_idx, threadblock_tile_offset)(_0{}, _0{}, _, _, _, _));
    Tensor tC_rCol = make_tensor_like(tC_gCol);
    Tensor cCol = make_identity_tensor(mCol.shape());
    Tensor tC_cCol = group_modes<1, 4>(ThreadMap::partition(cCol, thread_idx, threadblock_tile_offset)(_0{}, _0{}, _, _, _, _));
    return typename Base::template Callbacks<decltype(tC_gCol), decltype(tC_rCol), decltype(tC_cCol), ProblemShape>(
        cute::move(tC_gCol), cute::move(tC_rCol), cute::move(tC_cCol), problem_shape, &params_ptr->base);
  }
};

// The whole epilogue for a threadblock/warp tiling, accumulator type and output type.
template <class ThreadblockShape, class WarpShape, class ElementOut>
struct ScaledEpilogue {
  static constexpr int kAlignmentOut = 4;  // 4 outputs per access: needs N % 4 == 0
  using OutputTileThreadMap =
      cutlass::epilogue::threadblock::OutputTileThreadLayout<ThreadblockShape, WarpShape, float, kAlignmentOut, 1>;
  template <template <class> class Fn, class Out>
  using Compute = cutlass::epilogue::threadblock::VisitorCompute<Fn, Out, float, cutlass::FloatRoundStyle::round_to_nearest>;
  using RowVector = cutlass::epilogue::threadblock::VisitorRowBroadcast<OutputTileThreadMap, float, Stride<_0, _1, _0>>;
  using Acc = cutlass::epilogue::threadblock::VisitorAccFetch;
  using ActScale = VisitorActScale<OutputTileThreadMap>;

  using AccTimesAct = cutlass::epilogue::threadblock::Sm80EVT<Compute<cutlass::multiplies, float>, Acc, ActScale>;
  using TimesW = cutlass::epilogue::threadblock::Sm80EVT<Compute<cutlass::multiplies, float>, AccTimesAct, RowVector>;
  using PlusBias = cutlass::epilogue::threadblock::Sm80EVT<Compute<cutlass::plus, ElementOut>, TimesW, RowVector>;
  using Store = cutlass::epilogue::threadblock::VisitorAuxStore<
      OutputTileThreadMap, ElementOut, cutlass::FloatRoundStyle::round_to_nearest, Stride<int64_t, _1, _0>>;
  using Tree = cutlass::epilogue::threadblock::Sm80EVT<Store, PlusBias>;

  static typename Tree::Arguments arguments(ScaledGemmParams const& p) {
    return {
        {                                                                      // PlusBias
            {                                                                  // TimesW
                {                                                              // AccTimesAct
                    {},                                                        //   acc
                    {p.a_scale, p.a_scale_per_token, p.group_idx, p.groups},   //   act scale
                    {}},                                                       //   multiplies
                {p.w_scale, 0.f, {_0{}, _1{}, _0{}}},                          //   w_scale
                {}},                                                           //   multiplies
            {p.bias, 0.f, {_0{}, _1{}, _0{}}},                                 //   bias (nullptr: 0)
            {}},                                                               //   plus
        {static_cast<ElementOut*>(p.out), {int64_t(p.N), _1{}, _0{}}}};        // store
  }
};

}  // namespace dtq::sm80
