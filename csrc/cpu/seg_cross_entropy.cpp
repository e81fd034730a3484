// Fused cross entropy (segmentation and classification): loss and d(loss)/d(logits) in one pass,
// with class weights, ignore_index and label smoothing; no softmax is kept for the backward.
#include "common.h"

namespace mtcore {

static std::tuple<at::Tensor, at::Tensor> seg_ce_fwd_cpu(const at::Tensor& logits,
                                                         const at::Tensor& target,
                                                         const c10::optional<at::Tensor>& weight,
                                                         int64_t ignore_index,
                                                         double label_smoothing, int64_t reduction,
                                                         bool compute_grad) {
  ce_check(logits, target, weight, "seg_ce_fwd");
  TORCH_CHECK_VALUE(logits.device().is_cpu(), "seg_ce_fwd (CPU kernel): logits must be on CPU, got ",
                    logits.device());
  return ce_forward(logits, target, weight, ignore_index, label_smoothing, reduction,
                    compute_grad);
}

}  // namespace mtcore

TORCH_LIBRARY_FRAGMENT(mtcore, m) {
  m.def(
      "seg_ce_fwd(Tensor logits, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, int reduction, bool compute_grad) -> (Tensor loss, Tensor grad_logits)");
}

TORCH_LIBRARY_IMPL(mtcore, CPU, m) { m.impl("seg_ce_fwd", &mtcore::seg_ce_fwd_cpu); }
