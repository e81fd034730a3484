// Fused bias + activation + gain + clamp (StyleGAN2's bias_act, Karras et al. 2020) on CPU.
//
//   y  = clamp(act(x + b[c]) * gain, -clamp, clamp)       (b broadcast along `dim`; clamp < 0: none)
//   dx = dy * gain * act'(x + b[c]) * [|y| < clamp]        (db = dx summed over all dims but `dim`)
//
// The backward reads only what it needs: y for linear/relu/lrelu (the mask is y's sign, which the
// gain's sign flips; the clamp mask is |y| < clamp), x (+ b) for tanh/sigmoid/silu (their clamp
// mask is recomputed exactly). An input it does not need may be passed as an empty tensor, so the
// autograd glue need not keep it alive. With bf16/fp16 y, an output that rounds to +-clamp counts
// as clamped.
// Layout: the output takes the strides of its reference input (x, or y/x/dy for the gradient), so
// channels_last stays channels_last; a dense tensor is walked as [outer, C, inner] in memory order.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/WrapDimUtils.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace mtcore {
namespace {

enum Act : int64_t { kLinear = 0, kRelu = 1, kLrelu = 2, kTanh = 3, kSigmoid = 4, kSilu = 5 };

constexpr int64_t kGrain = 32768;  // elements per parallel task

bool uses_x(int64_t act) { return act == kTanh || act == kSigmoid || act == kSilu; }
bool uses_y(int64_t act, double clamp) { return act == kRelu || act == kLrelu || (act == kLinear && clamp >= 0); }

const char* act_name(int64_t act) {
  static const char* names[] = {"linear", "relu", "lrelu", "tanh", "sigmoid", "silu"};
  return (act >= 0 && act <= 5) ? names[act] : "?";
}

void check_common(const char* op, const at::Tensor& t, const char* name, int64_t act, double alpha) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor for the cpp backend, got one on ",
                    t.device());
  auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, op, ": ",
                   name, " must be float32, float64, bfloat16 or float16, got ", st);
  TORCH_CHECK_VALUE(act >= 0 && act <= 5, op, ": act must be 0..5 (linear, relu, lrelu, tanh, sigmoid, silu), got ",
                    act);
  TORCH_CHECK_VALUE(act != kLrelu || alpha >= 0, op, ": alpha must be >= 0 for lrelu, got ", alpha);
}

void check_bias(const char* op, const c10::optional<at::Tensor>& b, const at::Tensor& x, int64_t dim) {
  if (!b.has_value() || !b->defined()) return;
  TORCH_CHECK_VALUE(x.dim() > 0, op, ": x is 0-d, so it has no dimension to add the bias along");
  TORCH_CHECK_TYPE(b->scalar_type() == x.scalar_type(), op, ": b has dtype ", b->scalar_type(),
                   " but x has dtype ", x.scalar_type(), "; they must match");
  TORCH_CHECK_VALUE(b->device() == x.device(), op, ": b is on ", b->device(), " but x is on ", x.device());
  int64_t d = at::maybe_wrap_dim(dim, x.dim());
  TORCH_CHECK_VALUE(b->dim() == 1 && b->size(0) == x.size(d), op, ": b must have shape [x.size(dim)] = [", x.size(d),
                    "] (x of shape ", x.sizes(), ", dim=", dim, "), got b of shape ", b->sizes());
}

// `t` with exactly `like`'s sizes and strides (a copy when they differ), so both share one walk.
at::Tensor match_layout(const at::Tensor& t, const at::Tensor& like) {
  if (t.sizes() == like.sizes() && t.strides() == like.strides()) return t;
  at::Tensor out = at::empty_strided(like.sizes(), like.strides(), t.options());
  out.copy_(t);
  return out;
}

// A fresh output of several MB: ask Linux for transparent huge pages before its first touch. A new
// large buffer is a fresh mmap whose 4 KiB page faults cost more than the kernel's arithmetic; this is
// what PyTorch's THP_MEM_ALLOC_ENABLE=1 does for every allocation, here only for our own outputs.
// Best effort: a failure (or THP set to "never") just leaves ordinary pages.
void advise_huge_pages(const at::Tensor& fresh) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t bytes = fresh.nbytes();
  if (bytes < 4 * kHuge) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(fresh.data_ptr());
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (begin + bytes) & ~(kHuge - 1);
  if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)fresh;
#endif
}

// A dense tensor walked in memory order as [outer, channels, inner] around dimension `dim`.
struct Geometry {
  int64_t outer = 1, channels = 1, inner = 1;
};

Geometry geometry(const at::Tensor& dense, int64_t dim, bool has_bias) {
  Geometry g;
  const int64_t n = dense.numel();
  if (!has_bias || n == 0 || dense.size(dim) == 1) {
    g.inner = n;  // one channel (or none): the bias is a scalar
    return g;
  }
  g.channels = dense.size(dim);
  g.inner = dense.stride(dim);
  g.outer = n / (g.channels * g.inner);
  TORCH_INTERNAL_ASSERT(g.outer * g.channels * g.inner == n, "bias_act: unexpected layout");
  return g;
}

// ---------------------------------------------------------------- elementwise math (acc_t = float/double)

// act(z) for the activations with a transcendental function.
template <int64_t ACT, typename acc_t>
inline acc_t act_fwd(acc_t z) {
  if constexpr (ACT == kTanh) {
    return std::tanh(z);
  } else if constexpr (ACT == kSigmoid) {
    return acc_t(1) / (acc_t(1) + std::exp(-z));
  } else {
    static_assert(ACT == kSilu, "act_fwd: tanh, sigmoid or silu");
    return z / (acc_t(1) + std::exp(-z));
  }
}

// act'(z) for the activations computed from x (+ b); also sets v = act(z), for the clamp mask.
template <int64_t ACT, typename acc_t>
inline acc_t act_deriv_x(acc_t z, acc_t& v) {
  if constexpr (ACT == kTanh) {
    acc_t t = std::tanh(z);
    v = t;
    return acc_t(1) - t * t;
  } else if constexpr (ACT == kSigmoid) {
    acc_t s = acc_t(1) / (acc_t(1) + std::exp(-z));
    v = s;
    return s * (acc_t(1) - s);
  } else {  // silu: d/dz z*s(z) = s * (1 + z * (1 - s))
    acc_t s = acc_t(1) / (acc_t(1) + std::exp(-z));
    v = z * s;
    return s * (acc_t(1) + z * (acc_t(1) - s));
  }
}

template <typename acc_t>
struct Params {
  acc_t gain, gain_neg, clamp, gain_sign;  // gain_neg = gain * alpha (lrelu), 0 (relu)
};

template <typename acc_t>
Params<acc_t> make_params(int64_t act, double alpha, double gain, double clamp) {
  const double slope = act == kLrelu ? alpha : 0.0;
  return Params<acc_t>{static_cast<acc_t>(gain), static_cast<acc_t>(gain * slope), static_cast<acc_t>(clamp),
                       gain < 0 ? acc_t(-1) : acc_t(1)};
}

// The loops below select a multiplier and then multiply, rather than selecting between computed
// values: without -fno-trapping-math GCC only if-converts (and so vectorises) that form.

// act(z) * gain, clamped.
template <int64_t ACT, bool CLAMP, typename acc_t>
inline acc_t fwd_value(acc_t z, const Params<acc_t>& p) {
  acc_t v;
  if constexpr (ACT == kLinear) {
    v = z * p.gain;
  } else if constexpr (ACT == kRelu) {
    v = std::max(z, acc_t(0)) * p.gain;
  } else if constexpr (ACT == kLrelu) {
    const acc_t m = z > acc_t(0) ? p.gain : p.gain_neg;
    v = z * m;
  } else {
    v = act_fwd<ACT, acc_t>(z) * p.gain;
  }
  if constexpr (CLAMP) v = std::min(std::max(v, -p.clamp), p.clamp);
  return v;
}

// Forward over a run of n elements; `bias` is either a scalar (bstride 0) or one per element.
template <int64_t ACT, bool CLAMP, typename scalar_t, typename acc_t>
inline void fwd_run(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t n, const acc_t* bias,
                    int64_t bstride, const Params<acc_t>& p) {
  const Params<acc_t> q = p;
  if (bstride == 0) {
    const acc_t b = *bias;
    for (int64_t i = 0; i < n; ++i) {
      y[i] = static_cast<scalar_t>(fwd_value<ACT, CLAMP, acc_t>(static_cast<acc_t>(x[i]) + b, q));
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      y[i] = static_cast<scalar_t>(fwd_value<ACT, CLAMP, acc_t>(static_cast<acc_t>(x[i]) + bias[i], q));
    }
  }
}

// Backward over a run of n elements (same bias convention as fwd_run).
template <int64_t ACT, bool CLAMP, typename scalar_t, typename acc_t>
inline void bwd_run(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                    const scalar_t* __restrict__ y, scalar_t* __restrict__ dx, int64_t n, const acc_t* bias,
                    int64_t bstride, const Params<acc_t>& p) {
  const acc_t gain = p.gain, gain_neg = p.gain_neg, clamp = p.clamp, gs = p.gain_sign;
  for (int64_t i = 0; i < n; ++i) {
    acc_t m;  // d y / d x
    if constexpr (ACT == kRelu || ACT == kLrelu) {
      const acc_t u = static_cast<acc_t>(y[i]) * gs;  // y's sign is z's, flipped by a negative gain
      m = u > acc_t(0) ? gain : gain_neg;
    } else if constexpr (ACT == kLinear) {
      m = gain;
    } else {
      acc_t v;
      m = gain * act_deriv_x<ACT, acc_t>(static_cast<acc_t>(x[i]) + bias[i * bstride], v);
      // The mask from the recomputed pre-clamp value: exact even when y is stored in bf16/fp16.
      if constexpr (CLAMP) m = std::abs(v * gain) < clamp ? m : acc_t(0);
    }
    if constexpr (CLAMP && (ACT == kLinear || ACT == kRelu || ACT == kLrelu)) {
      m = std::abs(static_cast<acc_t>(y[i])) < clamp ? m : acc_t(0);
    }
    dx[i] = static_cast<scalar_t>(static_cast<acc_t>(dy[i]) * m);
  }
}

// Runs body(offset, count, bias_ptr, bias_stride) over a dense [outer, C, inner] walk, in parallel.
template <typename acc_t, typename Body>
void walk(const Geometry& g, const std::vector<acc_t>& bias, const Body& body) {
  const acc_t zero = acc_t(0);
  const acc_t* bptr = bias.empty() ? &zero : bias.data();
  if (bias.empty() || g.channels == 1) {
    const int64_t n = g.outer * g.channels * g.inner;
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      body(begin, end - begin, bptr, int64_t(0));
    });
  } else if (g.inner == 1) {  // channels_last-like: a row of C channels, one bias each
    const int64_t grain = std::max<int64_t>(1, kGrain / g.channels);
    at::parallel_for(0, g.outer, grain, [&](int64_t begin, int64_t end) {
      for (int64_t o = begin; o < end; ++o) body(o * g.channels, g.channels, bptr, int64_t(1));
    });
  } else {  // NCHW-like: rows of `inner` elements sharing one bias value
    const int64_t rows = g.outer * g.channels;
    const int64_t grain = std::max<int64_t>(1, kGrain / g.inner);
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) body(r * g.inner, g.inner, bptr + (r % g.channels), int64_t(0));
    });
  }
}

template <typename acc_t, typename scalar_t>
std::vector<acc_t> bias_vector(const c10::optional<at::Tensor>& b, bool wanted) {
  std::vector<acc_t> out;
  if (!wanted || !b.has_value() || !b->defined()) return out;
  at::Tensor bc = b->contiguous();
  const scalar_t* p = bc.data_ptr<scalar_t>();
  out.resize(bc.numel());
  for (int64_t i = 0; i < bc.numel(); ++i) out[i] = static_cast<acc_t>(p[i]);
  return out;
}

// Calls f(std::integral_constant<int64_t, ACT>, std::bool_constant<CLAMP>) for the runtime pair.
template <typename F>
void dispatch_act(int64_t act, bool clamp, const F& f) {
#define MTCORE_ACT_CASE(A)                                                     \
  case A:                                                                      \
    if (clamp)                                                                 \
      f(std::integral_constant<int64_t, A>{}, std::true_type{});               \
    else                                                                       \
      f(std::integral_constant<int64_t, A>{}, std::false_type{});              \
    break;
  switch (act) {
    MTCORE_ACT_CASE(kLinear)
    MTCORE_ACT_CASE(kRelu)
    MTCORE_ACT_CASE(kLrelu)
    MTCORE_ACT_CASE(kTanh)
    MTCORE_ACT_CASE(kSigmoid)
    MTCORE_ACT_CASE(kSilu)
    default:
      TORCH_CHECK(false, "bias_act: unknown act ", act);
  }
#undef MTCORE_ACT_CASE
}

// ---------------------------------------------------------------- ops

at::Tensor bias_act_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& b, int64_t dim, int64_t act,
                        double alpha, double gain, double clamp) {
  check_common("bias_act", x, "x", act, alpha);
  check_bias("bias_act", b, x, dim);
  const bool has_bias = b.has_value() && b->defined();
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) return y;
  advise_huge_pages(y);
  at::Tensor xc = match_layout(x, y);
  const int64_t d = has_bias ? at::maybe_wrap_dim(dim, x.dim()) : 0;
  const Geometry g = geometry(y, d, has_bias);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "mtcore_bias_act", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const std::vector<acc_t> bias = bias_vector<acc_t, scalar_t>(b, has_bias);
    const Params<acc_t> p = make_params<acc_t>(act, alpha, gain, clamp);
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    dispatch_act(act, clamp >= 0, [&](auto act_c, auto clamp_c) {
      constexpr int64_t A = decltype(act_c)::value;
      constexpr bool C = decltype(clamp_c)::value;
      walk<acc_t>(g, bias, [&](int64_t off, int64_t n, const acc_t* bp, int64_t bs) {
        fwd_run<A, C, scalar_t, acc_t>(xp + off, yp + off, n, bp, bs, p);
      });
    });
  });
  return y;
}

at::Tensor bias_act_grad_cpu(const at::Tensor& dy, const at::Tensor& x, const c10::optional<at::Tensor>& b,
                             const at::Tensor& y, int64_t dim, int64_t act, double alpha, double gain,
                             double clamp) {
  check_common("bias_act_grad", dy, "dy", act, alpha);
  const bool need_x = uses_x(act), need_y = uses_y(act, clamp);
  for (auto [t, name, needed] : {std::make_tuple(&x, "x", need_x), std::make_tuple(&y, "y", need_y)}) {
    if (!needed && t->numel() == 0) continue;
    TORCH_CHECK_VALUE(t->sizes() == dy.sizes(), "bias_act_grad: act=", act_name(act), clamp >= 0 ? " with clamp" : "",
                      " needs ", name, " of dy's shape ", dy.sizes(), ", got ", t->sizes(),
                      needed ? "" : " (pass an empty tensor when it is not needed)");
    TORCH_CHECK_TYPE(t->scalar_type() == dy.scalar_type(), "bias_act_grad: ", name, " has dtype ",
                     t->scalar_type(), " but dy has dtype ", dy.scalar_type());
    TORCH_CHECK_VALUE(t->device() == dy.device(), "bias_act_grad: ", name, " is on ", t->device(), " but dy is on ",
                      dy.device());
  }
  check_bias("bias_act_grad", b, dy, dim);
  const bool has_bias = need_x && b.has_value() && b->defined();
  // The output takes the layout of the saved activation when there is one (see the fake in Python).
  const at::Tensor& ref = (need_y && y.numel() > 0) ? y : (need_x && x.numel() > 0) ? x : dy;
  at::Tensor dx = at::empty_like(ref);
  if (dy.numel() == 0) return dx;
  advise_huge_pages(dx);
  at::Tensor dyc = match_layout(dy, dx);
  at::Tensor xc = need_x ? match_layout(x, dx) : x;
  at::Tensor yc = need_y ? match_layout(y, dx) : y;
  const int64_t d = has_bias ? at::maybe_wrap_dim(dim, dy.dim()) : 0;
  const Geometry g = geometry(dx, d, has_bias);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dy.scalar_type(), "mtcore_bias_act_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const std::vector<acc_t> bias = bias_vector<acc_t, scalar_t>(b, has_bias);
    const Params<acc_t> p = make_params<acc_t>(act, alpha, gain, clamp);
    const scalar_t* dyp = dyc.const_data_ptr<scalar_t>();
    const scalar_t* xp = need_x ? xc.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* yp = need_y ? yc.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    dispatch_act(act, clamp >= 0, [&](auto act_c, auto clamp_c) {
      constexpr int64_t A = decltype(act_c)::value;
      constexpr bool C = decltype(clamp_c)::value;
      walk<acc_t>(g, bias, [&](int64_t off, int64_t n, const acc_t* bp, int64_t bs) {
        bwd_run<A, C, scalar_t, acc_t>(dyp + off, xp ? xp + off : nullptr, yp ? yp + off : nullptr, dxp + off,
                                       n, bp, bs, p);
      });
    });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mtcore, m) {
  m.def("bias_act(Tensor x, Tensor? b, int dim, int act, float alpha, float gain, float clamp) -> Tensor");
  m.def(
      "bias_act_grad(Tensor dy, Tensor x, Tensor? b, Tensor y, int dim, int act, float alpha, float gain, "
      "float clamp) -> Tensor");
}

TORCH_LIBRARY_IMPL(mtcore, CPU, m) {
  m.impl("bias_act", &bias_act_cpu);
  m.impl("bias_act_grad", &bias_act_grad_cpu);
}

}  // namespace mtcore
