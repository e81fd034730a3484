// Autograd of mtcore::bias_act and mtcore::bias_act_grad (csrc/cpu/bias_act.cpp has the math).
//
// bias_act's backward is the op bias_act_grad, itself differentiable, so the R1 penalty can
// differentiate the discriminator twice: w.r.t. dy, bias_act_grad is linear (its transpose is
// bias_act_grad again); w.r.t. x and b it needs act'' (zero for linear/relu/lrelu, so nothing is
// recomputed there; tanh/sigmoid/silu use ATen ops). The forward keeps only what the backward
// reads: y for relu/lrelu (the mask is y's sign) or linear with clamp, x (+ b) for the others.

#pragma once

#include "autograd_utils.h"

namespace mtcore {
namespace autograd {
namespace bias_act {
namespace {  // only register_autograd.cpp includes this header

enum Act : int64_t { kLinear = 0, kRelu = 1, kLrelu = 2, kTanh = 3, kSigmoid = 4, kSilu = 5 };

bool uses_x(int64_t act) { return act == kTanh || act == kSigmoid || act == kSilu; }
bool uses_y(int64_t act, double clamp) { return act == kRelu || act == kLrelu || (act == kLinear && clamp >= 0); }

using FwdSig = at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, int64_t, int64_t, double, double,
                          double);
using GradSig = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                           int64_t, int64_t, double, double, double);

at::Tensor call_bias_act(const at::Tensor& x, const std::optional<at::Tensor>& b, int64_t dim, int64_t act,
                         double alpha, double gain, double clamp) {
  static auto handle = op<FwdSig>("mtcore::bias_act");
  return handle.call(x, b, dim, act, alpha, gain, clamp);
}

at::Tensor call_bias_act_grad(const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& b,
                              const at::Tensor& y, int64_t dim, int64_t act, double alpha, double gain,
                              double clamp) {
  static auto handle = op<GradSig>("mtcore::bias_act_grad");
  return handle.call(dy, x, b, y, dim, act, alpha, gain, clamp);
}

// db: dx summed over every dimension but `dim`.
at::Tensor bias_grad(const at::Tensor& dx, int64_t dim) {
  std::vector<int64_t> dims;
  const int64_t d = at::maybe_wrap_dim(dim, dx.dim());
  for (int64_t i = 0; i < dx.dim(); ++i)
    if (i != d) dims.push_back(i);
  return dims.empty() ? dx : dx.sum(dims);
}

std::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

void save_params(AutogradContext* ctx, int64_t dim, int64_t act, double alpha, double gain, double clamp) {
  ctx->saved_data["dim"] = dim;
  ctx->saved_data["act"] = act;
  ctx->saved_data["alpha"] = alpha;
  ctx->saved_data["gain"] = gain;
  ctx->saved_data["clamp"] = clamp;
}

struct Params {
  int64_t dim, act;
  double alpha, gain, clamp;
};

Params load_params(AutogradContext* ctx) {
  return {ctx->saved_data["dim"].toInt(), ctx->saved_data["act"].toInt(), ctx->saved_data["alpha"].toDouble(),
          ctx->saved_data["gain"].toDouble(), ctx->saved_data["clamp"].toDouble()};
}

class BiasActGrad : public torch::autograd::Function<BiasActGrad> {
 public:
  static Variable forward(AutogradContext* ctx, const Variable& dy, const Variable& x,
                          const std::optional<Variable>& b, const Variable& y, int64_t dim, int64_t act, double alpha,
                          double gain, double clamp) {
    save_params(ctx, dim, act, alpha, gain, clamp);
    ctx->saved_data["has_b"] = b.has_value() && b->defined();
    ctx->save_for_backward({dy, x, b.has_value() ? *b : Variable(), y});
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_bias_act_grad(dy, x, b, y, dim, act, alpha, gain, clamp);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Variable &dy = saved[0], &x = saved[1], &b = saved[2], &y = saved[3];
    const Params p = load_params(ctx);
    const bool has_b = ctx->saved_data["has_b"].toBool();
    const Variable& g = grads[0];
    // Edges: dy 0, x 1, b 2 (if given), y last; y is a saved reference, never differentiated.
    const bool want_dy = ctx->needs_input_grad(0), want_x = ctx->needs_input_grad(1);
    const bool want_b = has_b && ctx->needs_input_grad(2);
    Variable d_dy, d_x, d_b;
    if (want_dy) d_dy = call_bias_act_grad(g, x, opt(b), y, p.dim, p.act, p.alpha, p.gain, p.clamp);
    if (uses_x(p.act) && (want_x || want_b)) {
      at::Tensor z = x;
      if (has_b) {
        std::vector<int64_t> shape(x.dim(), 1);
        shape[at::maybe_wrap_dim(p.dim, x.dim())] = -1;
        z = x + b.reshape(shape);
      }
      at::Tensor v, f2;  // act(z) and act''(z)
      if (p.act == kTanh) {
        v = at::tanh(z);
        f2 = -2.0 * v * (1.0 - v * v);
      } else {
        const at::Tensor s = at::sigmoid(z);
        if (p.act == kSigmoid) {
          v = s;
          f2 = s * (1.0 - s) * (1.0 - 2.0 * s);
        } else {  // silu
          v = z * s;
          f2 = s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s));
        }
      }
      at::Tensor dx2 = g * dy * (p.gain * f2);
      if (p.clamp >= 0) dx2 = dx2 * ((v * p.gain).abs() < p.clamp);  // the kernel's mask, recomputed
      if (want_b) d_b = bias_grad(dx2, p.dim);
      if (want_x) d_x = dx2;
    }
    return {d_dy, d_x, d_b, Variable(), Variable(), Variable(), Variable(), Variable(), Variable()};
  }
};

class BiasAct : public torch::autograd::Function<BiasAct> {
 public:
  static Variable forward(AutogradContext* ctx, const Variable& x, const std::optional<Variable>& b, int64_t dim,
                          int64_t act, double alpha, double gain, double clamp) {
    save_params(ctx, dim, act, alpha, gain, clamp);
    const bool has_b = b.has_value() && b->defined();
    ctx->saved_data["has_b"] = has_b;
    at::Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      y = call_bias_act(x, b, dim, act, alpha, gain, clamp);
    }
    const bool need_x = uses_x(act);
    ctx->save_for_backward({need_x ? x : Variable(), need_x && has_b ? *b : Variable(),
                            uses_y(act, clamp) ? y : Variable()});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Params p = load_params(ctx);
    const bool has_b = ctx->saved_data["has_b"].toBool();
    const Variable& dy = grads[0];
    // An input bias_act_grad does not read travels as an empty tensor (not kept alive).
    const at::Tensor empty = at::empty({0}, dy.options());
    const at::Tensor x = saved[0].defined() ? saved[0] : empty;
    const at::Tensor y = saved[2].defined() ? saved[2] : empty;
    const std::optional<at::Tensor> b = saved[1].defined() ? opt(saved[1]) : std::nullopt;
    const at::Tensor dx = call_bias_act_grad(dy, x, b, y, p.dim, p.act, p.alpha, p.gain, p.clamp);
    Variable db;
    if (has_b && ctx->needs_input_grad(1)) db = bias_grad(dx, p.dim);
    return {ctx->needs_input_grad(0) ? dx : Variable(), db, Variable(), Variable(), Variable(), Variable(),
            Variable()};
  }
};

at::Tensor bias_act_autograd(const at::Tensor& x, const std::optional<at::Tensor>& b, int64_t dim, int64_t act,
                             double alpha, double gain, double clamp) {
  return BiasAct::apply(x, b, dim, act, alpha, gain, clamp);
}

at::Tensor bias_act_grad_autograd(const at::Tensor& dy, const at::Tensor& x, const std::optional<at::Tensor>& b,
                                  const at::Tensor& y, int64_t dim, int64_t act, double alpha, double gain,
                                  double clamp) {
  return BiasActGrad::apply(dy, x, b, y, dim, act, alpha, gain, clamp);
}

}  // namespace
}  // namespace bias_act
}  // namespace autograd
}  // namespace mtcore
