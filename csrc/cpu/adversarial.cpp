// Fused GAN losses (non-saturating, hinge, least squares; each role) and their gradient.
#include "common.h"

namespace mtcore {

static std::tuple<at::Tensor, at::Tensor> adv_loss_fwd_cpu(const at::Tensor& logits, int64_t kind,
                                                           int64_t role, bool compute_grad) {
  auto [loss, grad] = adv_forward(logits, kind, role, compute_grad, 1.0, "adv_loss_fwd");
  return {at::scalar_tensor(loss, logits.options()), grad};
}

}  // namespace mtcore

TORCH_LIBRARY_FRAGMENT(mtcore, m) {
  m.def("adv_loss_fwd(Tensor logits, int kind, int role, bool compute_grad) -> (Tensor loss, Tensor grad)");
}

TORCH_LIBRARY_IMPL(mtcore, CPU, m) { m.impl("adv_loss_fwd", &mtcore::adv_loss_fwd_cpu); }
