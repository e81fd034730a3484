// Autograd of mtcore::mbstd_fwd and mtcore::mbstd_bwd (csrc/cpu/minibatch_stddev.cpp has the math).
//
// mbstd_fwd's backward is the op mbstd_bwd; mbstd_bwd's own backward (the R1 penalty's double
// backward) is the transpose of dx = go_x + S/(K G) * d/s, written with ATen ops: with x viewed as
// [G, M, F, C/F, H, W], d = x - mean_G(x), s = sqrt(mean_G(d^2) + eps), K = (C/F) H W and S the
// sum of grad_out's std maps over the group and the map.

#pragma once

#include "autograd_utils.h"

namespace mtcore {
namespace autograd {
namespace minibatch_stddev {
namespace {  // only register_autograd.cpp includes this header

constexpr double kEps = 1e-8;  // as in the kernels

using FwdSig = at::Tensor(const at::Tensor&, int64_t, int64_t);
using BwdSig = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t);

at::Tensor call_mbstd_bwd(const at::Tensor& grad_out, const at::Tensor& x, int64_t group_size, int64_t num_channels) {
  static auto handle = op<BwdSig>("mtcore::mbstd_bwd");
  return handle.call(grad_out, x, group_size, num_channels);
}

class MbstdBwd : public torch::autograd::Function<MbstdBwd> {
 public:
  static Variable forward(AutogradContext* ctx, const Variable& grad_out, const Variable& x, int64_t group_size,
                          int64_t num_channels) {
    ctx->saved_data["group_size"] = group_size;
    ctx->saved_data["num_channels"] = num_channels;
    ctx->save_for_backward({grad_out, x});
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_mbstd_bwd(grad_out, x, group_size, num_channels);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &grad_out = saved[0], &x = saved[1], &gg = grads[0];
    // Symbolic sizes (c10::SymInt), so torch.compile can trace this with dynamic shapes.
    const c10::SymInt f = ctx->saved_data["num_channels"].toInt();
    const c10::SymInt n = x.sym_size(0), c = x.sym_size(1), h = x.sym_size(2), w = x.sym_size(3);
    const c10::SymInt g = n.min(ctx->saved_data["group_size"].toInt()), m = n / g;
    const c10::Scalar kg = (c / f) * h * w * g;  // K G
    const at::Tensor xr = x.reshape_symint({g, m, f, c / f, h, w});
    const at::Tensor d = xr - xr.mean(0);
    const at::Tensor s = at::sqrt(d.square().mean(0) + kEps);
    const at::Tensor ggr = gg.reshape_symint({g, m, f, c / f, h, w});
    Variable d_go, d_x;
    if (ctx->needs_input_grad(0)) {
      const at::Tensor t = (ggr * d / s).sum({0, 3, 4, 5}).div(kg);  // [M, F]: d sigma along gg
      const at::Tensor maps =
          t.reshape_symint({1, m, f, 1, 1}).expand_symint({g, m, f, h, w}).reshape_symint({n, f, h, w});
      d_go = at::cat({gg, maps}, 1);
    }
    if (ctx->needs_input_grad(1)) {
      const at::Tensor big_s =
          grad_out.slice_symint(1, c).reshape_symint({g, m, f, h, w}).sum({0, 3, 4});  // [M, F]
      const at::Tensor a = big_s.div(kg).reshape_symint({1, m, f, 1, 1, 1});
      const at::Tensor p = (ggr * d).sum(0);
      d_x = (a * ((ggr - ggr.mean(0)) / s - p * d / (s.pow(3) * c10::Scalar(g)))).reshape_symint({n, c, h, w});
    }
    return {d_go, d_x, Variable(), Variable()};
  }
};

class MbstdFwd : public torch::autograd::Function<MbstdFwd> {
 public:
  static Variable forward(AutogradContext* ctx, const Variable& x, int64_t group_size, int64_t num_channels) {
    static auto handle = op<FwdSig>("mtcore::mbstd_fwd");
    ctx->saved_data["group_size"] = group_size;
    ctx->saved_data["num_channels"] = num_channels;
    ctx->save_for_backward({x});
    at::AutoDispatchBelowADInplaceOrView guard;
    return handle.call(x, group_size, num_channels);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor x = ctx->get_saved_variables()[0];
    return {call_mbstd_bwd(grads[0], x, ctx->saved_data["group_size"].toInt(),
                           ctx->saved_data["num_channels"].toInt()),
            Variable(), Variable()};
  }
};

at::Tensor mbstd_fwd_autograd(const at::Tensor& x, int64_t group_size, int64_t num_channels) {
  return MbstdFwd::apply(x, group_size, num_channels);
}

at::Tensor mbstd_bwd_autograd(const at::Tensor& grad_out, const at::Tensor& x, int64_t group_size,
                              int64_t num_channels) {
  return MbstdBwd::apply(grad_out, x, group_size, num_channels);
}

}  // namespace
}  // namespace minibatch_stddev
}  // namespace autograd
}  // namespace mtcore
