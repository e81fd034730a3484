// Autograd of mtcore::upsample_fold and mtcore::upsample_fold_backward (csrc/cpu/upsample_fold.cpp).
//
// Both are linear maps and each other's transpose, so each one's backward is the other: the fold
// is differentiable any number of times.

#pragma once

#include "autograd_utils.h"

namespace mtcore {
namespace autograd {
namespace upsample_fold {
namespace {  // only register_autograd.cpp includes this header

using Sig = at::Tensor(const at::Tensor&);

at::Tensor call_fold(bool forward, const at::Tensor& t) {
  static auto fold = op<Sig>("mtcore::upsample_fold");
  static auto unfold = op<Sig>("mtcore::upsample_fold_backward");
  return (forward ? fold : unfold).call(t);
}

template <bool FORWARD>
class Fold : public torch::autograd::Function<Fold<FORWARD>> {
 public:
  static Variable forward(AutogradContext*, const Variable& t) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_fold(FORWARD, t);
  }

  static variable_list backward(AutogradContext*, variable_list grads) {
    return {Fold<!FORWARD>::apply(grads[0])};
  }
};

at::Tensor upsample_fold_autograd(const at::Tensor& w) { return Fold<true>::apply(w); }
at::Tensor upsample_fold_backward_autograd(const at::Tensor& g) { return Fold<false>::apply(g); }

}  // namespace
}  // namespace upsample_fold
}  // namespace autograd
}  // namespace mtcore
