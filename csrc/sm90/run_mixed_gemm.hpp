// Launches CUTLASS 3.x's Hopper mixed-input GEMM (int4 weights converted in registers) on sm_90a, for the
// kernels in w4a16_gemm.cu and w4a8_gemm.cu. The int4 operand must be the collective's A, so the kernel
// computes the transposed product outᵀ [N, M] = codes [N, K] · aᵀ: the packed weights [N, K/2] are a K-major A,
// the row-major activations [M, K] a K-major B and the row-major out [M, N] a column-major D, all without
// copies. Without group scales: DirectConvert mode (the conversion of every int4 code is exact, per-channel scales
// go to the epilogue). With them (W4A16 per group): ConvertAndScale mode with fp32 scales, each code times its
// group's scale in fp32, rounded once to the 16-bit activation type before the MMA. TMA loads and stores,
// warp-specialized cooperative schedule, persistent tile scheduler without workspace.
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

// Per-group weight scales for ConvertAndScale: fp32, MN-major [K/G, N] (the collective's layout: the weight
// channel n is contiguous), G a multiple of the tile's K.
struct GroupScales {
  float const* ptr = nullptr;
  int group_size = 0;
};

// Epilogue<TileShape, ElementOut>: `Tree`, an Sm90EVT over outᵀ (the weight channel n is its row, the token m its
// column), and `static Tree::Arguments arguments(Params const&)`.
template <class ElementAct, class ElementAcc, class ElementOut, template <class, class> class Epilogue,
          bool kGroupScaled = false, class Params>
const char* run_mixed_input_gemm(Params const& p, void const* w, void const* act, void* out, cudaStream_t stream,
                                 GroupScales scales = {}) {
  using ElementW = cutlass::int4b_t;
  // A tuple (operand, scale) selects the collective's ConvertAndScale mode.
  using ElementWOperand = cute::conditional_t<kGroupScaled, cute::tuple<ElementW, float>, ElementW>;
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
      ElementWOperand, cutlass::layout::RowMajor, kAlignmentW, ElementAct, cutlass::layout::ColumnMajor, kAlignmentAct,
      ElementAcc, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  // Problem (N, M, K): codes [N, K] and activations [M, K] are K-major with row length K (in elements), outᵀ is
  // column-major with column length N; batch count 1.
  typename CollectiveMainloop::Arguments mainloop{};
  mainloop.ptr_A = static_cast<ElementW const*>(w);
  get<0>(mainloop.dA) = int64_t(p.K);
  mainloop.ptr_B = static_cast<ElementAct const*>(act);
  get<0>(mainloop.dB) = int64_t(p.K);
  if constexpr (kGroupScaled) {  // scales (n, g, batch) at n + g·N
    mainloop.ptr_S = scales.ptr;
    get<1>(mainloop.dS) = int64_t(p.N);
    get<2>(mainloop.dS) = int64_t(p.N) * (p.K / scales.group_size);
    mainloop.group_size = scales.group_size;
  }
  typename Kernel::StrideD stride_out{};
  get<1>(stride_out) = int64_t(p.N);
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {p.N, p.M, p.K, 1},
      mainloop,
      {Epilogue<TileShape, ElementOut>::arguments(p), nullptr, {}, static_cast<ElementOut*>(out), stride_out}};
  return run_without_workspace<Gemm>(args, stream);
}

}  // namespace dtq::sm90
