// Pieces the CUTLASS 2.x (sm80/) and 3.x (sm90/) scaled GEMMs share: the activation-scale node's arguments and
// its device-side table offset, the launch sequence, and the dispatch on the output dtype.
#pragma once
#include "cutlass/cutlass.h"
#include "cutlass/numeric_types.h"

#include "common.h"
#include "scaled_gemm.h"

namespace dtq {

// The activation scale per output row: a_scale[group + m] (per token) or a_scale[group] (per tensor), where
// group = clamp(*group_idx, 0, groups - 1) is read on the device, or 0 without group_idx. Both epilogue nodes
// (sm80/epilogue.hpp, sm90/epilogue.hpp) are CUTLASS's column broadcast with a runtime row stride (1 or 0)
// and this pointer offset.
struct ActScaleArguments {
  float const* ptr = nullptr;
  bool per_token = false;
  int32_t const* group_idx = nullptr;
  int groups = 1;
};

template <class BaseParams>
struct ActScaleParams {
  BaseParams base;  // the column broadcast's own parameters (pointer to the table's start, row stride)
  int32_t const* group_idx;
  int groups;
};

#ifdef __CUDACC__
// The table entry this launch starts from: one device read of the group index, clamped to the table.
CUTLASS_DEVICE float const* act_scale_start(float const* table, int32_t const* group_idx, int groups) {
  return group_idx == nullptr ? table : table + max(0, min(*group_idx, groups - 1));
}
#endif

// Runs a CUTLASS device-level GEMM (2.x or 3.x GemmUniversalAdapter) on `stream` without a workspace: nothing is
// allocated per call, so the launch can be captured in a CUDA graph.
template <class Gemm>
const char* run_without_workspace(typename Gemm::Arguments const& args, cudaStream_t stream) {
  Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return "CUTLASS can_implement rejected the problem";
  if (Gemm::get_workspace_size(args) != 0) return "the kernel unexpectedly needs a workspace";
  if (gemm.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) return "CUTLASS initialize failed";
  if (gemm.run(stream) != cutlass::Status::kSuccess) return "CUTLASS kernel launch failed";
  return nullptr;
}

// fn(ElementOut{}) for the CUTLASS element type of the output dtype code (common.h).
template <class Fn>
const char* with_out_element(int out_dtype, Fn&& fn) {
  switch (out_dtype) {
    case kFloat32: return fn(float{});
    case kFloat16: return fn(cutlass::half_t{});
    case kBFloat16: return fn(cutlass::bfloat16_t{});
    default: return "unsupported output dtype code";
  }
}

// fn(ElementAct{}, ElementOut{}) for a 16-bit activation dtype code and an output dtype code (the W4A16 kernels).
template <class Fn>
const char* with_16bit_act_and_out_elements(int act_dtype, int out_dtype, Fn&& fn) {
  return with_out_element(out_dtype, [&](auto out) -> const char* {
    switch (act_dtype) {
      case kBFloat16: return fn(cutlass::bfloat16_t{}, out);
      case kFloat16: return fn(cutlass::half_t{}, out);
      default: return "unsupported activation dtype code (fp16 or bf16)";
    }
  });
}

}  // namespace dtq
