// Fused VAE loss (reconstruction + KL, per-sample mean over the batch) and its gradients.
#include "common.h"

namespace mtcore {

static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
vae_loss_fwd_cpu(const at::Tensor& recon, const at::Tensor& target, const at::Tensor& mu,
                 const at::Tensor& logvar, double beta, int64_t recon_kind, bool compute_grad) {
  VAEOut o = vae_forward(recon, target, mu, logvar, recon_kind, compute_grad, 1.0, 1.0,
                         "vae_loss_fwd");
  const auto opts = recon.options();
  return {at::scalar_tensor(o.rec, opts), at::scalar_tensor(o.kl, opts),
          at::scalar_tensor(o.rec + beta * o.kl, opts), o.grad_recon, o.grad_mu, o.grad_logvar};
}

}  // namespace mtcore

TORCH_LIBRARY_FRAGMENT(mtcore, m) {
  m.def(
      "vae_loss_fwd(Tensor recon, Tensor target, Tensor mu, Tensor logvar, float beta, "
      "int recon_kind, bool compute_grad) -> (Tensor rec, Tensor kl, Tensor total, "
      "Tensor grad_recon, Tensor grad_mu, Tensor grad_logvar)");
}

TORCH_LIBRARY_IMPL(mtcore, CPU, m) { m.impl("vae_loss_fwd", &mtcore::vae_loss_fwd_cpu); }
