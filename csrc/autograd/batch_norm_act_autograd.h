// Autograd of mtcore::bn_act_fwd (csrc/cpu/batch_norm_act.cpp has the math).
//
// The forward keeps x and the statistics it normalised with (the batch's in training, the given
// running ones in eval); the backward is the op bn_act_bwd. BatchNorm sits in no discriminator,
// so no second derivative is needed (the R1 penalty differentiates only the discriminator twice):
// a create_graph backward through the op works, and differentiating its result again is an error
// that names the op, not a silent zero (once_differentiable).

#pragma once

#include "autograd_utils.h"

namespace mtcore {
namespace autograd {
namespace batch_norm_act {
namespace {  // only register_autograd.cpp includes this header

using Opt = std::optional<at::Tensor>;
using Out3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using FwdSig = Out3(const at::Tensor&, const Opt&, const Opt&, const Opt&, const Opt&, double, int64_t, double);
using BwdSig = Out3(const at::Tensor&, const at::Tensor&, const Opt&, const Opt&, const at::Tensor&,
                    const at::Tensor&, double, int64_t, double, bool);

bool given(const Opt& t) { return t.has_value() && t->defined(); }

class BnAct : public torch::autograd::Function<BnAct> {
 public:
  static variable_list forward(AutogradContext* ctx, const Variable& x, const Opt& weight, const Opt& bias,
                               const Opt& running_mean, const Opt& running_var, double eps, int64_t act,
                               double alpha) {
    static auto handle = op<FwdSig>("mtcore::bn_act_fwd");
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["act"] = act;
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["training"] = !given(running_mean);
    ctx->saved_data["has_w"] = given(weight);
    ctx->saved_data["has_b"] = given(bias);
    at::Tensor y, mean, var;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(y, mean, var) = handle.call(x, weight, bias, running_mean, running_var, eps, act, alpha);
    }
    ctx->mark_non_differentiable({mean, var});
    ctx->save_for_backward({x, given(weight) ? *weight : Variable(), given(bias) ? *bias : Variable(), mean, var});
    return {y, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto handle = op<BwdSig>("mtcore::bn_act_bwd");
    const auto saved = ctx->get_saved_variables();
    const Variable &x = saved[0], &w = saved[1], &b = saved[2], &mean = saved[3], &var = saved[4];
    const bool has_w = ctx->saved_data["has_w"].toBool(), has_b = ctx->saved_data["has_b"].toBool();
    const at::Tensor& dy = grads[0];
    at::Tensor dx, dw, db;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(dx, dw, db) =
          handle.call(dy.defined() ? dy : at::zeros_like(x), x, has_w ? Opt(w) : std::nullopt,
                      has_b ? Opt(b) : std::nullopt, mean, var, ctx->saved_data["eps"].toDouble(),
                      ctx->saved_data["act"].toInt(), ctx->saved_data["alpha"].toDouble(),
                      ctx->saved_data["training"].toBool());
    }
    const bool wants_second = dy.requires_grad() || x.requires_grad() || (has_w && w.requires_grad());
    variable_list g = once_differentiable({dx, has_w ? dw : Variable(), has_b ? db : Variable()}, wants_second,
                                          "mtcore::batch_norm_act has no second derivative; use the reference "
                                          "kernels (kernels = \"reference\") to differentiate through BatchNorm twice");
    // Edges: x, weight, bias, running_mean, running_var (statistics are never differentiated).
    return {g[0], g[1], g[2], Variable(), Variable(), Variable(), Variable(), Variable()};
  }
};

Out3 bn_act_fwd_autograd(const at::Tensor& x, const Opt& weight, const Opt& bias, const Opt& running_mean,
                         const Opt& running_var, double eps, int64_t act, double alpha) {
  const variable_list out = BnAct::apply(x, weight, bias, running_mean, running_var, eps, act, alpha);
  return {out[0], out[1], out[2]};
}

}  // namespace
}  // namespace batch_norm_act
}  // namespace autograd
}  // namespace mtcore
