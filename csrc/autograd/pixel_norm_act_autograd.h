// Autograd of mtcore::pn_act_fwd (csrc/cpu/pixel_norm_act.cpp has the math).
//
// The forward keeps x; the backward is the op pn_act_bwd. Pixel norm sits in the GAN generator,
// which is never differentiated twice (the R1 penalty differentiates the discriminator), so a
// double backward through this op is an error that names it, not a silent zero.

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
    TORCH_CHECK(!(at::GradMode::is_enabled() && (dy.requires_grad() || x.requires_grad())),
                "mtcore::pixel_norm_act has no second derivative (create_graph=True reached it); use the "
                "reference kernels (kernels = \"reference\") for a double backward through pixel norm");
    at::AutoDispatchBelowADInplaceOrView guard;
    return {handle.call(dy, x, ctx->saved_data["eps"].toDouble(), ctx->saved_data["act"].toInt(),
                        ctx->saved_data["alpha"].toDouble()),
            Variable(), Variable(), Variable()};
  }
};

at::Tensor pn_act_fwd_autograd(const at::Tensor& x, double eps, int64_t act, double alpha) {
  return PnAct::apply(x, eps, act, alpha);
}

}  // namespace
}  // namespace pixel_norm_act
}  // namespace autograd
}  // namespace mtcore
