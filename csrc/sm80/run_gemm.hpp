// Launches a CUTLASS 2.x GEMM-with-visitor kernel for the scaled GEMMs (scaled_gemm.h) on sm_80/sm_89
// (mma.sync tensor cores: int8 from sm_80, FP8 E4M3 from sm_89).
#pragma once
#include "cutlass/cutlass.h"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/default_gemm_universal_with_visitor.h"

#include "cutlass_glue.hpp"
#include "scaled_gemm.h"
#include "sm80/epilogue.hpp"

namespace dtq::sm80 {

// One tile configuration per operand type: TN layout (a row-major [M, K], w row-major [N, K] = column-major
// [K, N]), 16-byte operand loads (K % 16 == 0), identity swizzle (no workspace, so CUDA-graph safe).
template <class ArchTag, class ElementAB, class ElementAcc, class Operator, class ThreadblockShape, class WarpShape,
          class InstructionShape, class Stages /* std::integral_constant<int, n> */, class ElementOut>
const char* run_scaled_gemm(ScaledGemmParams const& p, cudaStream_t stream) {
  using Epilogue = ScaledEpilogue<ThreadblockShape, WarpShape, ElementOut>;
  constexpr int kAlignmentAB = 128 / cutlass::sizeof_bits<ElementAB>::value;
  using Kernel = typename cutlass::gemm::kernel::DefaultGemmWithVisitor<
      ElementAB, cutlass::layout::RowMajor, cutlass::ComplexTransform::kNone, kAlignmentAB,
      ElementAB, cutlass::layout::ColumnMajor, cutlass::ComplexTransform::kNone, kAlignmentAB,
      float, cutlass::layout::RowMajor, Epilogue::kAlignmentOut,
      ElementAcc, float, cutlass::arch::OpClassTensorOp, ArchTag,
      ThreadblockShape, WarpShape, InstructionShape, typename Epilogue::Tree,
      cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, Stages::value, Operator, 1>::GemmKernel;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  typename Gemm::Arguments args(cutlass::gemm::GemmUniversalMode::kGemm, {p.M, p.N, p.K}, /*batch_count=*/1,
                                Epilogue::arguments(p), p.a, p.w, nullptr, nullptr,
                                /*batch strides A, B, C, D=*/0, 0, 0, 0,
                                /*lda=*/int64_t(p.K), /*ldb=*/int64_t(p.K), /*ldc=*/0, /*ldd=*/0);
  return run_without_workspace<Gemm>(args, stream);
}

// Dispatch on the output dtype code (common.h).
template <class... Config>  // run_scaled_gemm's parameters but the last (ElementOut)
const char* run_scaled_gemm_any_out(ScaledGemmParams const& p, cudaStream_t stream) {
  return with_out_element(p.out_dtype, [&](auto out) { return run_scaled_gemm<Config..., decltype(out)>(p, stream); });
}

}  // namespace dtq::sm80
