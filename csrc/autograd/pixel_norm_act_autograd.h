// Autograd of mtcore::pn_act_fwd (csrc/cpu/pixel_norm_act.cpp has the math).
//
// The forward keeps x; the backward is the op pn_act_bwd. Pixel norm sits in the GAN generator,
// which is never differentiated twice (the R1 penalty differentiates the discriminator): a
// create_graph backward through the op works, and differentiating its result again is an error
// that names the op, not a silent zero (once_differentiable).

#pragma once

#include "autograd_utils.h"

namespace mtcore {
namespace autograd {
namespace pixel_norm_act {
namespace {  // only register_autograd.cpp includes this header

using FwdSig = at::Tensor(const at::Tensor&, double, int64_t, double);
using BwdSig = at::Tensor(const at::Tensor&, const at::Tensor&, double, int64_t, double);

class PnAct : public torch::autograd::Function<PnAct> {
 public:
  static Variable forward(AutogradContext* ctx, const Variable& x, double eps, int64_t act, double alpha) {
    static auto handle = op<FwdSig>("mtcore::pn_act_fwd");
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["act"] = act;
    ctx->saved_data["alpha"] = alpha;
    ctx->save_for_backward({x});
    at::AutoDispatchBelowADInplaceOrView guard;
    return handle.call(x, eps, act, alpha);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto handle = op<BwdSig>("mtcore::pn_act_bwd");
    const Variable x = ctx->get_saved_variables()[0];
    const at::Tensor& dy = grads[0];
    at::Tensor dx;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      dx = handle.call(dy, x, ctx->saved_data["eps"].toDouble(), ctx->saved_data["act"].toInt(),
                       ctx->saved_data["alpha"].toDouble());
    }
    const variable_list g = once_differentiable(
        {dx}, dy.requires_grad() || x.requires_grad(),
        "mtcore::pixel_norm_act has no second derivative; use the reference kernels (kernels = \"reference\") "
        "to differentiate through pixel norm twice");
    return {g[0], Variable(), Variable(), Variable()};
  }
};

at::Tensor pn_act_fwd_autograd(const at::Tensor& x, double eps, int64_t act, double alpha) {
  return PnAct::apply(x, eps, act, alpha);
}

}  // namespace
}  // namespace pixel_norm_act
}  // namespace autograd
}  // namespace mtcore
