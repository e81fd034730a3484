// Autograd of mtcore::vae_loss_fwd: the forward stored d(rec)/d(recon) and d(kl)/d(mu, logvar);
// the backward combines them with beta and the incoming gradients of (rec, kl, total):
// d/d(recon) = grad_recon (g_rec + g_total), d/d(mu, logvar) = grad_(mu, logvar) (g_kl + beta g_total).
// First derivatives only.

#pragma once

#include "autograd_utils.h"

namespace mtcore {
namespace autograd {
namespace vae_loss {
namespace {  // only register_autograd.cpp includes this header

using Sig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double, int64_t, bool);

class VAELoss : public torch::autograd::Function<VAELoss> {
 public:
  static variable_list forward(AutogradContext* ctx, const Variable& recon, const Variable& target, const Variable& mu,
                               const Variable& logvar, double beta, int64_t recon_kind, bool compute_grad) {
    static auto handle = op<Sig>("mtcore::vae_loss_fwd");
    ctx->set_materialize_grads(false);  // unused outputs get no zero-filled gradient
    at::Tensor rec, kl, total, g_recon, g_mu, g_logvar;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(rec, kl, total, g_recon, g_mu, g_logvar) =
          handle.call(recon, target, mu, logvar, beta, recon_kind, compute_grad);
    }
    ctx->saved_data["beta"] = beta;
    store_grads(ctx, compute_grad, {g_recon, g_mu, g_logvar});
    return {rec, kl, total, g_recon, g_mu, g_logvar};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &grad_recon = saved[0], &grad_mu = saved[1], &grad_logvar = saved[2];
    check_stored(ctx, "vae_loss_fwd");
    const double beta = ctx->saved_data["beta"].toDouble();
    const at::Tensor g_total = or_zero(grads[2], grad_recon);
    variable_list out(7);
    // Edges: recon 0, target 1, mu 2, logvar 3.
    if (ctx->needs_input_grad(0)) out[0] = scaled(grad_recon, or_zero(grads[0], grad_recon) + g_total);
    if (ctx->needs_input_grad(2) || ctx->needs_input_grad(3)) {
      const at::Tensor g_k = or_zero(grads[1], grad_recon) + beta * g_total;
      if (ctx->needs_input_grad(2)) out[2] = grad_mu * g_k;
      if (ctx->needs_input_grad(3)) out[3] = grad_logvar * g_k;
    }
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> vae_loss_fwd_autograd(
    const at::Tensor& recon, const at::Tensor& target, const at::Tensor& mu, const at::Tensor& logvar, double beta,
    int64_t recon_kind, bool compute_grad) {
  auto o = VAELoss::apply(recon, target, mu, logvar, beta, recon_kind, compute_grad);
  return {o[0], o[1], o[2], o[3], o[4], o[5]};
}

}  // namespace
}  // namespace vae_loss
}  // namespace autograd
}  // namespace mtcore
