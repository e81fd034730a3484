// Autograd of mtcore::adv_loss_fwd: the forward stored d(loss)/d(logits), the backward scales it.
// First derivatives only.

#pragma once

#include "autograd_utils.h"

namespace mtcore {
namespace autograd {
namespace adversarial {
namespace {  // only register_autograd.cpp includes this header

using Sig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t, int64_t, bool);

class AdversarialLoss : public torch::autograd::Function<AdversarialLoss> {
 public:
  static variable_list forward(AutogradContext* ctx, const Variable& logits, int64_t kind, int64_t role,
                               bool compute_grad) {
    static auto handle = op<Sig>("mtcore::adv_loss_fwd");
    ctx->set_materialize_grads(false);
    at::Tensor loss, grad;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(loss, grad) = handle.call(logits, kind, role, compute_grad);
    }
    store_grads(ctx, compute_grad, {grad});
    return {loss, grad};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor grad = ctx->get_saved_variables()[0];
    check_stored(ctx, "adv_loss_fwd");
    variable_list out(4);
    if (grads[0].defined() && ctx->needs_input_grad(0)) out[0] = scaled(grad, grads[0]);
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> adv_loss_fwd_autograd(const at::Tensor& logits, int64_t kind, int64_t role,
                                                         bool compute_grad) {
  auto out = AdversarialLoss::apply(logits, kind, role, compute_grad);
  return {out[0], out[1]};
}

}  // namespace
}  // namespace adversarial
}  // namespace autograd
}  // namespace mtcore
