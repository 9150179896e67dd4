// Launches a CUTLASS 3.x warp-specialized TMA + wgmma GEMM with the scaled epilogue (scaled_gemm.h) on sm_90a.
#pragma once
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"

#include "cutlass_glue.hpp"
#include "scaled_gemm.h"
#include "sm90/epilogue.hpp"

namespace dtq::sm90 {

// TN layout (a row-major [M, K], w row-major [N, K] = column-major [K, N]), 16-byte TMA alignment, persistent
// tile scheduler without workspace (so nothing is allocated per call: CUDA-graph safe).
template <class ElementAB, class ElementAcc, class TileShape, class ClusterShape, class KernelSchedule,
          class EpilogueSchedule, class ElementOut>
const char* run_scaled_gemm(ScaledGemmParams const& p, cudaStream_t stream) {
  using Epilogue = ScaledEpilogue<TileShape, ElementOut>;
  constexpr int kAlignmentAB = 128 / cutlass::sizeof_bits<ElementAB>::value;
  constexpr int kAlignmentOut = 128 / cutlass::sizeof_bits<ElementOut>::value;
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, float,
      void, cutlass::layout::RowMajor, kAlignmentOut, ElementOut, cutlass::layout::RowMajor, kAlignmentOut,
      EpilogueSchedule, typename Epilogue::Tree>::CollectiveOp;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      ElementAB, cutlass::layout::RowMajor, kAlignmentAB, ElementAB, cutlass::layout::ColumnMajor, kAlignmentAB,
      ElementAcc, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  // Dense row-major strides (row length, 1, batch): a [M, K], w [N, K], out [M, N]; batch count 1.
  typename Kernel::StrideA stride_a{};
  typename Kernel::StrideB stride_b{};
  typename Kernel::StrideD stride_d{};
  get<0>(stride_a) = int64_t(p.K);
  get<0>(stride_b) = int64_t(p.K);
  get<0>(stride_d) = int64_t(p.N);
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {p.M, p.N, p.K, 1},
      {static_cast<ElementAB const*>(p.a), stride_a, static_cast<ElementAB const*>(p.w), stride_b},
      {Epilogue::arguments(p), nullptr, {}, static_cast<ElementOut*>(p.out), stride_d}};
  return run_without_workspace<Gemm>(args, stream);
}

template <class... Config>  // run_scaled_gemm's parameters but the last (ElementOut)
const char* run_scaled_gemm_any_out(ScaledGemmParams const& p, cudaStream_t stream) {
  return with_out_element(p.out_dtype, [&](auto out) { return run_scaled_gemm<Config..., decltype(out)>(p, stream); });
}

}  // namespace dtq::sm90
