// Shared pieces of the CPU norm + activation ops (batch_norm_act.cpp, pixel_norm_act.cpp): the
// activation codes (bias_act's first three), the input check, the channels-last test and the
// activation's slope.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "common.h"

namespace mtcore {
namespace norm_act {

enum Act : int64_t { kLinear = 0, kRelu = 1, kLrelu = 2 };

inline void check_float(const char* op, const at::Tensor& t, const char* name) {
  auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, op, ": ", name,
                   " must be float32, float64, bfloat16 or float16, got ", st);
}

// x (or dy): a float CPU tensor [N, C, ...]; act a known code, alpha >= 0 for lrelu, eps > 0.
inline void check_input(const char* op, const at::Tensor& x, const char* name, int64_t act, double alpha,
                        double eps) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": ", name, " must be a CPU tensor for the cpp backend, got one on ",
                    x.device());
  check_float(op, x, name);
  TORCH_CHECK_VALUE(x.dim() >= 2, op, ": ", name, " must be [N, C, ...], got shape ", x.sizes());
  TORCH_CHECK_VALUE(act >= kLinear && act <= kLrelu, op, ": act must be 0 (linear), 1 (relu) or 2 (lrelu), got ", act);
  TORCH_CHECK_VALUE(act != kLrelu || alpha >= 0, op, ": alpha must be >= 0 for lrelu, got ", alpha);
  TORCH_CHECK_VALUE(eps > 0, op, ": eps must be > 0, got ", eps);
}

// Whether x is channels-last (and not also NCHW-contiguous): walked as rows of C channels.
inline bool is_nhwc(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// act'(v) as a multiplier, selected and then multiplied (so GCC if-converts and vectorises it):
// 1 above zero, `neg` below.
template <typename A>
MT_AI A slope(A v, A neg) {
  return v > A(0) ? A(1) : neg;
}

// act' below zero: 1 for linear, 0 for relu, alpha for lrelu.
template <typename A>
A neg_slope(int64_t act, double alpha) {
  return act == kLinear ? A(1) : (act == kRelu ? A(0) : static_cast<A>(alpha));
}

}  // namespace norm_act
}  // namespace mtcore
