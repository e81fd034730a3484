// Autograd of mtcore::seg_ce_fwd: the forward stored d(loss)/d(logits) (csrc/cpu/common.h), so the
// backward only scales it by the incoming gradient. First derivatives only.

#pragma once

#include "autograd_utils.h"

namespace mtcore {
namespace autograd {
namespace seg_cross_entropy {
namespace {  // only register_autograd.cpp includes this header

using Sig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                               int64_t, double, int64_t, bool);

class SegCrossEntropy : public torch::autograd::Function<SegCrossEntropy> {
 public:
  static variable_list forward(AutogradContext* ctx, const Variable& logits, const Variable& target,
                               const std::optional<Variable>& weight, int64_t ignore_index, double label_smoothing,
                               int64_t reduction, bool compute_grad) {
    static auto handle = op<Sig>("mtcore::seg_ce_fwd");
    ctx->set_materialize_grads(false);
    at::Tensor loss, grad;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(loss, grad) = handle.call(logits, target, weight, ignore_index, label_smoothing, reduction,
                                         compute_grad);
    }
    ctx->saved_data["reduction"] = reduction;
    store_grads(ctx, compute_grad, {grad});
    return {loss, grad};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor grad = ctx->get_saved_variables()[0];
    check_stored(ctx, "seg_ce_fwd");
    const at::Tensor& g = grads[0];
    variable_list out(7);
    if (!g.defined() || !ctx->needs_input_grad(0)) return out;
    // reduction "none": one loss per target, broadcast over the class dim
    out[0] = ctx->saved_data["reduction"].toInt() == 0 ? grad * g.unsqueeze(1) : scaled(grad, g);
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> seg_ce_fwd_autograd(const at::Tensor& logits, const at::Tensor& target,
                                                       const std::optional<at::Tensor>& weight, int64_t ignore_index,
                                                       double label_smoothing, int64_t reduction, bool compute_grad) {
  auto out = SegCrossEntropy::apply(logits, target, weight, ignore_index, label_smoothing, reduction, compute_grad);
  return {out[0], out[1]};
}

}  // namespace
}  // namespace seg_cross_entropy
}  // namespace autograd
}  // namespace mtcore
