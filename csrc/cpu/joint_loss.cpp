// The default four-task objective (seg CE, cls CE, VAE, GAN generator loss) with fixed weights or
// homoscedastic-uncertainty weighting (Kendall et al. 2018), fused: every term and the gradient of
// the weighted total w.r.t. every input in one call, each input read once.
#include "common.h"

namespace mtcore {

using JointOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                            at::Tensor, at::Tensor, at::Tensor>;

static JointOut joint_loss_fwd_cpu(const at::Tensor& seg_logits, const at::Tensor& seg_target,
                                   const at::Tensor& cls_logits, const at::Tensor& cls_target,
                                   const at::Tensor& recon, const at::Tensor& image,
                                   const at::Tensor& mu, const at::Tensor& logvar,
                                   const at::Tensor& fake_logits, const at::Tensor& weights,
                                   int64_t mode, double beta, double label_smoothing,
                                   int64_t ignore_index, int64_t recon_kind, int64_t adv_kind,
                                   bool compute_grad) {
  const char* who = "joint_loss_fwd";
  float_check(weights, who, "weights");
  TORCH_CHECK_VALUE(weights.dim() == 1 && weights.size(0) == 4, who,
                    ": weights must have shape [4] (seg, cls, vae, gan), got ", weights.sizes());
  TORCH_CHECK_VALUE(mode == 0 || mode == 1, who, ": mode must be 0 (fixed) or 1 (uncertainty), got ",
                    mode);
  ce_check(seg_logits, seg_target, c10::nullopt, "joint_loss_fwd (seg)");
  ce_check(cls_logits, cls_target, c10::nullopt, "joint_loss_fwd (cls)");
  const at::Tensor wd = weights.to(at::kDouble).contiguous();
  const double* w = wd.data_ptr<double>();
  double c[4];  // d(total)/d(L_k)
  for (int k = 0; k < 4; ++k) c[k] = mode == 0 ? w[k] : std::exp(-w[k]);

  double seg_l = 0.0, cls_l = 0.0;
  auto seg_g = std::get<1>(ce_forward(seg_logits, seg_target, c10::nullopt, ignore_index, 0.0, 1,
                                      compute_grad, c[0], &seg_l));
  auto cls_g = std::get<1>(ce_forward(cls_logits, cls_target, c10::nullopt, ignore_index,
                                      label_smoothing, 1, compute_grad, c[1], &cls_l));
  VAEOut v = vae_forward(recon, image, mu, logvar, recon_kind, compute_grad, c[2], c[2] * beta, who);
  auto [gan, gan_g] = adv_forward(fake_logits, adv_kind, 2, compute_grad, c[3], who);

  const double L[4] = {seg_l, cls_l, v.rec + beta * v.kl, gan};
  double total = 0.0;
  at::Tensor gw = at::empty({4}, at::TensorOptions().dtype(at::kDouble));
  double* gwp = gw.data_ptr<double>();
  for (int k = 0; k < 4; ++k) {
    total += c[k] * L[k] + (mode == 1 ? w[k] : 0.0);
    gwp[k] = mode == 0 ? L[k] : 1.0 - c[k] * L[k];
  }
  at::Tensor terms = at::empty({4}, at::TensorOptions().dtype(at::kDouble));
  for (int k = 0; k < 4; ++k) terms.data_ptr<double>()[k] = L[k];
  const auto wopts = weights.options();
  at::Tensor grad_w = compute_grad ? gw.to(wopts) : at::empty({0}, wopts);
  return {terms.to(wopts), at::scalar_tensor(total, wopts), seg_g, cls_g, v.grad_recon,
          v.grad_mu, v.grad_logvar, gan_g, grad_w};
}

}  // namespace mtcore

TORCH_LIBRARY_FRAGMENT(mtcore, m) {
  m.def(
      "joint_loss_fwd(Tensor seg_logits, Tensor seg_target, Tensor cls_logits, Tensor cls_target, "
      "Tensor recon, Tensor image, Tensor mu, Tensor logvar, Tensor fake_logits, Tensor weights, "
      "int mode, float beta, float label_smoothing, int ignore_index, int recon_kind, "
      "int adv_kind, bool compute_grad) -> (Tensor terms, Tensor total, Tensor grad_seg, "
      "Tensor grad_cls, Tensor grad_recon, Tensor grad_mu, Tensor grad_logvar, Tensor grad_fake, "
      "Tensor grad_weights)");
}

TORCH_LIBRARY_IMPL(mtcore, CPU, m) { m.impl("joint_loss_fwd", &mtcore::joint_loss_fwd_cpu); }
