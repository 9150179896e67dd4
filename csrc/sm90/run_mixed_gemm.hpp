// Launches CUTLASS 3.x's Hopper mixed-input GEMM (int4 weights converted in registers) on sm_90a, for the
// kernels in w4a16_gemm.cu and w4a8_gemm.cu. The int4 operand must be the collective's A, so the kernel
// computes the transposed product outᵀ [N, M] = codes [N, K] · aᵀ: the packed weights [N, K/2] are a K-major A,
// the row-major activations [M, K] a K-major B and the row-major out [M, N] a column-major D, all without
// copies. DirectConvert mode (no scales in the mainloop: the conversion of every int4 code is exact), TMA loads
// and stores, warp-specialized cooperative schedule, persistent tile scheduler without workspace.
#pragma once
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"

#include "cutlass_glue.hpp"
#include "sm90/epilogue.hpp"

namespace dtq::sm90 {

using namespace cute;

// 128 weight rows x 128 tokens x 128 bytes of activations along K per tile (CUTLASS's mixed-input examples:
// the converted A fragment lives in registers, so the K tile stays at 128 bytes).
template <class ElementAct>
using MixedTileShape = Shape<_128, _128, Int<128 * 8 / cutlass::sizeof_bits<ElementAct>::value>>;

// Epilogue<TileShape, ElementOut>: `Tree`, an Sm90EVT over outᵀ (the weight channel n is its row, the token m its
// column), and `static Tree::Arguments arguments(Params const&)`.
template <class ElementAct, class ElementAcc, class ElementOut, template <class, class> class Epilogue, class Params>
const char* run_mixed_input_gemm(Params const& p, void const* w, void const* act, void* out, cudaStream_t stream) {
  using ElementW = cutlass::int4b_t;
  using TileShape = MixedTileShape<ElementAct>;
  using ClusterShape = Shape<_1, _1, _1>;
  using Tree = typename Epilogue<TileShape, ElementOut>::Tree;
  constexpr int kAlignmentW = 128 / cutlass::sizeof_bits<ElementW>::value;      // 32 codes = 16 bytes
  constexpr int kAlignmentAct = 128 / cutlass::sizeof_bits<ElementAct>::value;  // 16 bytes
  constexpr int kAlignmentOut = 128 / cutlass::sizeof_bits<ElementOut>::value;
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, float,
      void, cutlass::layout::ColumnMajor, kAlignmentOut, ElementOut, cutlass::layout::ColumnMajor, kAlignmentOut,
      cutlass::epilogue::TmaWarpSpecializedCooperative, Tree>::CollectiveOp;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      ElementW, cutlass::layout::RowMajor, kAlignmentW, ElementAct, cutlass::layout::ColumnMajor, kAlignmentAct,
      ElementAcc, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  // Problem (N, M, K): codes [N, K] and activations [M, K] are K-major with row length K (in elements), outᵀ is
  // column-major with column length N; batch count 1.
  typename Kernel::StrideA stride_w{};
  typename Kernel::StrideB stride_act{};
  typename Kernel::StrideD stride_out{};
  get<0>(stride_w) = int64_t(p.K);
  get<0>(stride_act) = int64_t(p.K);
  get<1>(stride_out) = int64_t(p.N);
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {p.N, p.M, p.K, 1},
      {static_cast<ElementW const*>(w), stride_w, static_cast<ElementAct const*>(act), stride_act},
      {Epilogue<TileShape, ElementOut>::arguments(p), nullptr, {}, static_cast<ElementOut*>(out), stride_out}};
  return run_without_workspace<Gemm>(args, stream);
}

}  // namespace dtq::sm90
