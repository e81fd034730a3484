// Autograd of mtcore::joint_loss_fwd. The forward stored the gradient of the weighted total w.r.t.
// every input, i.e. c_k dL_k/dx with c_k = w_k ("fixed") or exp(-s_k) ("uncertainty"). An output
// gradient (g_terms, g_total) reaches input x of task k as dL_k/dx (g_total c_k + g_terms[k]), so
// the stored gradient is scaled by s_k = g_total + g_terms[k] / c_k (0 where c_k = 0: the stored
// gradient is 0 there too). The weights' stored gradient is d(total)/dw. First derivatives only.

#pragma once

#include "autograd_utils.h"

namespace mtcore {
namespace autograd {
namespace joint_loss {
namespace {  // only register_autograd.cpp includes this header

using T = at::Tensor;
using Out = std::tuple<T, T, T, T, T, T, T, T, T>;
using Sig = Out(const T&, const T&, const T&, const T&, const T&, const T&, const T&, const T&, const T&, const T&,
                int64_t, double, double, int64_t, int64_t, int64_t, bool);

class JointLoss : public torch::autograd::Function<JointLoss> {
 public:
  static variable_list forward(AutogradContext* ctx, const Variable& seg_logits, const Variable& seg_target,
                               const Variable& cls_logits, const Variable& cls_target, const Variable& recon,
                               const Variable& image, const Variable& mu, const Variable& logvar,
                               const Variable& fake_logits, const Variable& weights, int64_t mode, double beta,
                               double label_smoothing, int64_t ignore_index, int64_t recon_kind, int64_t adv_kind,
                               bool compute_grad) {
    static auto handle = op<Sig>("mtcore::joint_loss_fwd");
    ctx->set_materialize_grads(false);  // unused outputs get no zero-filled gradient
    Out o;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      o = handle.call(seg_logits, seg_target, cls_logits, cls_target, recon, image, mu, logvar, fake_logits, weights,
                      mode, beta, label_smoothing, ignore_index, recon_kind, adv_kind, compute_grad);
    }
    auto& [terms, total, g_seg, g_cls, g_rec, g_mu, g_lv, g_fake, g_w] = o;
    ctx->saved_data["mode"] = mode;
    store_grads(ctx, compute_grad, {g_seg, g_cls, g_rec, g_mu, g_lv, g_fake, g_w}, {weights});
    return {terms, total, g_seg, g_cls, g_rec, g_mu, g_lv, g_fake, g_w};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto sv = ctx->get_saved_variables();
    const T &weights = sv[0], &g_w = sv[7];
    check_stored(ctx, "joint_loss_fwd");
    const T& g_terms = grads[0];
    const T g_total = or_zero(grads[1], weights);
    variable_list out(17);
    // Edges and the task (index into s) of each differentiable input: seg, cls, recon, mu,
    // logvar (the VAE term), fake logits (the GAN term); sv[1 + i] holds input i's gradient.
    constexpr int64_t edge[6] = {0, 2, 4, 6, 7, 8};
    constexpr int64_t task[6] = {0, 1, 2, 2, 2, 3};
    const bool as_stored = !g_terms.defined() && is_real_one(g_total);  // loss.backward() on total
    T s;
    if (!as_stored) {
      s = g_total.expand({4});
      if (g_terms.defined()) {
        const T c = ctx->saved_data["mode"].toInt() == 0 ? weights : at::exp(-weights);
        const T nonzero = c != 0;
        s = s + at::where(nonzero, g_terms / at::where(nonzero, c, at::ones_like(c)), at::zeros_like(c));
      }
    }
    for (int i = 0; i < 6; ++i)
      if (ctx->needs_input_grad(edge[i])) out[edge[i]] = as_stored ? sv[1 + i] : sv[1 + i] * s[task[i]];
    if (ctx->needs_input_grad(9)) out[9] = as_stored ? g_w : g_w * g_total;
    return out;
  }
};

Out joint_loss_fwd_autograd(const T& seg_logits, const T& seg_target, const T& cls_logits, const T& cls_target,
                            const T& recon, const T& image, const T& mu, const T& logvar, const T& fake_logits,
                            const T& weights, int64_t mode, double beta, double label_smoothing, int64_t ignore_index,
                            int64_t recon_kind, int64_t adv_kind, bool compute_grad) {
  auto o = JointLoss::apply(seg_logits, seg_target, cls_logits, cls_target, recon, image, mu, logvar, fake_logits,
                            weights, mode, beta, label_smoothing, ignore_index, recon_kind, adv_kind, compute_grad);
  return {o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7], o[8]};
}

}  // namespace
}  // namespace joint_loss
}  // namespace autograd
}  // namespace mtcore
