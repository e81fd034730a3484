// Shared glue of mtcore's C++ autograd kernels (csrc/autograd/<op>_autograd.h, all registered
// in register_autograd.cpp).
//
// Every op's derivative is a torch::autograd::Function registered for the Autograd dispatch key
// (all devices), as torchvision registers its ops'. In C++ a forward + backward costs ~10 us of
// overhead; through torch.library.register_autograd in Python it cost ~100 us, more than the
// kernels themselves at the default training step's sizes (docs/kernels.md, "Autograd").
#pragma once

#include <ATen/ATen.h>
#include <ATen/TensorSubclassLikeUtils.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

namespace mtcore {
namespace autograd {

using torch::autograd::AutogradContext;
using torch::autograd::Variable;
using torch::autograd::variable_list;

// The typed dispatcher handle of mtcore::<name> (looked up once per op and signature).
template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// True if `g` is a real (not traced, not fake) CPU scalar equal to 1: a backward may then hand
// back the gradient its forward stored, saving a pass. Never reads a CUDA tensor (no sync).
inline bool is_real_one(const at::Tensor& g) {
  return g.defined() && g.numel() == 1 && g.device().is_cpu() && !at::isTensorSubclassLike(g) &&
         g.item<double>() == 1.0;
}

// `g`, or a zero scalar like `like` where autograd passed an undefined gradient (an unused
// output: the ops turn off materialised gradients, which would cost a zero-filled tensor each).
inline at::Tensor or_zero(const at::Tensor& g, const at::Tensor& like) {
  return g.defined() ? g : at::zeros({}, like.options());
}

// The stored gradient `grad`, scaled by the incoming `g` (returned as is when g is a real 1).
inline at::Tensor scaled(const at::Tensor& grad, const at::Tensor& g) {
  return is_real_one(g) ? grad : grad * g;
}

// Keeps the gradients a loss op's forward computed (outputs, themselves not differentiable) for
// its backward, after `first` (e.g. the weights), and the compute_grad flag check_stored reads.
inline void store_grads(AutogradContext* ctx, bool compute_grad, const variable_list& grads,
                        const variable_list& first = {}) {
  ctx->mark_non_differentiable(grads);
  ctx->saved_data["compute_grad"] = compute_grad;
  variable_list saved(first);
  saved.insert(saved.end(), grads.begin(), grads.end());
  ctx->save_for_backward(saved);
}

// Fails a backward through a loss op whose forward ran with compute_grad=false (nothing stored).
inline void check_stored(AutogradContext* ctx, const char* op_name) {
  TORCH_CHECK(ctx->saved_data["compute_grad"].toBool(), "mtcore::", op_name,
              " was run with compute_grad=False; cannot backward");
}

// A backward's results for an op with no second derivative, as Python's @once_differentiable
// makes them: under create_graph (grad mode on) with an input that requires grad they come back
// attached to an error node, so a second differentiation through them raises `msg`, while a
// create_graph backward that never differentiates them again works. Otherwise returned as is.
inline variable_list once_differentiable(variable_list outputs, bool inputs_require_grad, const std::string& msg) {
  if (!at::GradMode::is_enabled() || !inputs_require_grad) return outputs;
  variable_list leaves;
  leaves.reserve(outputs.size());
  for (const auto& v : outputs) {
    Variable leaf = v.defined() ? v.detach() : Variable();
    if (leaf.defined()) leaf.set_requires_grad(true);
    leaves.push_back(leaf);
  }
  return torch::autograd::DelayedError(msg, static_cast<int64_t>(leaves.size())).apply(std::move(leaves));
}

}  // namespace autograd
}  // namespace mtcore
