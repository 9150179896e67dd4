// W4A16 (w4a16_gemm.h) for sm_90a: CUTLASS 3.x's Hopper mixed-input collective. The int4 operand must be the
// collective's A (it passes through registers, where it is converted to 16 bits before the wgmma), so the
// kernel computes the transposed product outᵀ [N, M] = codes [N, K] · xᵀ: the packed weights are a K-major
// A, the row-major activations a K-major B and the row-major out a column-major D, all without copies.
// DirectConvert mode (int4 -> fp16/bf16, exact), fp32 accumulation; the per-channel scale and the bias are
// per row of outᵀ, fused in the epilogue. TMA loads and stores, warp-specialized cooperative schedule.
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"

#include "cutlass_glue.hpp"
#include "w4a16_gemm.h"

namespace dtq {
namespace {

using namespace cute;

// 128 weight rows x 128 tokens x 64 k per tile (the mixed-input example's shape for 16-bit MMA: the converted
// A fragment lives in registers, so the K tile stays at 128 bytes of 16-bit values).
using TileShape = Shape<_128, _128, _64>;
using ClusterShape = Shape<_1, _1, _1>;

// (acc * w_scale[n]) + bias[n] in fp32, rounded once to ElementOut; n is the row of outᵀ.
template <class ElementOut>
struct ChannelScaledEpilogue {
  static constexpr auto RN = cutlass::FloatRoundStyle::round_to_nearest;
  template <template <class> class Fn, class Out>
  using Compute = cutlass::epilogue::fusion::Sm90Compute<Fn, Out, float, RN>;
  // w_scale and bias: fp32 [N], 16-byte aligned (Python checks); bias nullptr reads as 0.
  using ColVector = cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, float, float, Stride<_1, _0, _0>>;
  using Acc = cutlass::epilogue::fusion::Sm90AccFetch;
  using TimesW = cutlass::epilogue::fusion::Sm90EVT<Compute<cutlass::multiplies, float>, Acc, ColVector>;
  using Tree = cutlass::epilogue::fusion::Sm90EVT<Compute<cutlass::plus, ElementOut>, TimesW, ColVector>;

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
const char* run_w4a16(W4A16GemmParams const& p, cudaStream_t stream) {
  using ElementW = cutlass::int4b_t;
  using Epilogue = ChannelScaledEpilogue<ElementOut>;
  constexpr int kAlignmentW = 128 / cutlass::sizeof_bits<ElementW>::value;      // 32 codes = 16 bytes
  constexpr int kAlignmentAct = 128 / cutlass::sizeof_bits<ElementAct>::value;  // 8 values = 16 bytes
  constexpr int kAlignmentOut = 128 / cutlass::sizeof_bits<ElementOut>::value;
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, cutlass::layout::ColumnMajor, kAlignmentOut, ElementOut, cutlass::layout::ColumnMajor, kAlignmentOut,
      cutlass::epilogue::TmaWarpSpecializedCooperative, typename Epilogue::Tree>::CollectiveOp;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      ElementW, cutlass::layout::RowMajor, kAlignmentW, ElementAct, cutlass::layout::ColumnMajor, kAlignmentAct,
      float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename CollectiveEpilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  // Problem (N, M, K): codes [N, K] and x [M, K] are K-major with row length K (in elements), outᵀ is
  // column-major with column length N; batch count 1.
  typename Kernel::StrideA stride_w{};
  typename Kernel::StrideB stride_x{};
  typename Kernel::StrideD stride_out{};
  get<0>(stride_w) = int64_t(p.K);
  get<0>(stride_x) = int64_t(p.K);
  get<1>(stride_out) = int64_t(p.N);
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {p.N, p.M, p.K, 1},
      {static_cast<ElementW const*>(p.w), stride_w, static_cast<ElementAct const*>(p.x), stride_x},
      {Epilogue::arguments(p), nullptr, {}, static_cast<ElementOut*>(p.out), stride_out}};
  return run_without_workspace<Gemm>(args, stream);
}

}  // namespace

const char* w4a16_gemm_sm90(const W4A16GemmParams& p, cudaStream_t stream) {
  return with_out_element(p.out_dtype, [&](auto out) -> const char* {
    using ElementOut = decltype(out);
    switch (p.x_dtype) {
      case kBFloat16: return run_w4a16<cutlass::bfloat16_t, ElementOut>(p, stream);
      case kFloat16: return run_w4a16<cutlass::half_t, ElementOut>(p, stream);
      default: return "w4a16: unsupported activation dtype code (fp16 or bf16)";
    }
  });
}

}  // namespace dtq
