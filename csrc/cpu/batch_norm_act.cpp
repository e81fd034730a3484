// Fused BatchNorm + activation (linear, relu, lrelu) on CPU: the conv -> BN -> ReLU blocks of
// the backbone, the segmentation decoder and the VAE decoder.
//
// x is walked as [outer, C, inner] in memory order: NCHW-contiguous as (N, C, H*W), channels-last
// as (N*H*W, C, 1); other strides are made contiguous first. With M = outer * inner values per
// channel c:
//   training: mean_c and the biased var_c of the batch, in one pass of the moments about each
//             channel's first value (so a large mean costs the statistics no precision); eval: the running ones
//   y = act(x * scale_c + shift_c),  invstd = 1/sqrt(var + eps), scale = w invstd, shift = b - mean scale
// Backward, with g = dy * act'(pre), pre = x * scale + shift (relu: [pre > 0]; lrelu: 1 or alpha):
//   db_c = sum g,  dw_c = invstd * sum g (x - mean)
//   training: dx = scale * (g - db/M - (x - mean) invstd^2 sum g (x - mean) / M)
//   eval:     dx = scale * g
// One fused pass replaces BatchNorm's normalisation and the activation's pass, forward and
// backward (ATen's channels-last BatchNorm backward at 32 channels takes as long as ~15 copies of
// the tensor). The
// backward keeps x, not y. Sums run over a split that does not depend on the thread count
// (deterministic), in float lanes per block and double across blocks.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "common.h"
#include "norm_act.h"

namespace mtcore {
namespace {

using norm_act::check_float;
using norm_act::is_nhwc;
using norm_act::neg_slope;
using norm_act::slope;

constexpr int64_t kLanes = 16;      // independent partial sums in a plane reduction (vectorised)
constexpr int64_t kRowBlock = 64;   // channels-last rows summed in float before a double add
constexpr int64_t kMaxChunks = 64;  // parallel chunks of a reduction (fixed: deterministic)

struct Layout {
  at::Tensor x;  // x in the layout walked
  int64_t outer, C, inner;
  at::MemoryFormat format;
};

Layout layout_of(const at::Tensor& x) {
  Layout l;
  l.C = x.size(1);
  if (is_nhwc(x)) {
    l.x = x;
    l.format = at::MemoryFormat::ChannelsLast;
    l.outer = x.size(0) * x.size(2) * x.size(3);
    l.inner = 1;
  } else {
    l.x = x.contiguous();
    l.format = at::MemoryFormat::Contiguous;
    l.outer = x.size(0);
    l.inner = l.C == 0 ? 0 : x.numel() / std::max<int64_t>(1, x.size(0) * l.C);
  }
  return l;
}

void check_channel_vec(const char* op, const std::optional<at::Tensor>& t, const char* name, int64_t C) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK_VALUE(t->device().is_cpu(), op, ": ", name, " must be a CPU tensor for the cpp backend, got one on ",
                    t->device());
  check_float(op, *t, name);
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == C, op, ": ", name, " must have shape [", C,
                    "] (one value per channel of x), got ", t->sizes());
}

// The per-channel vector `t` (or `fill` where absent) as acc_t values.
template <typename acc_t>
std::vector<acc_t> channel_values(const std::optional<at::Tensor>& t, int64_t C, acc_t fill) {
  std::vector<acc_t> v(C, fill);
  if (t.has_value() && t->defined()) {
    const at::Tensor d = t->to(at::CPU(std::is_same<acc_t, double>::value ? at::kDouble : at::kFloat)).contiguous();
    const acc_t* p = d.const_data_ptr<acc_t>();
    std::copy(p, p + C, v.begin());
  }
  return v;
}

// Per-channel coefficients of one call, as acc_t arrays of C.
template <typename A>
struct Coef {
  const A* scale;  // w * invstd
  const A* shift;  // b - mean * scale
  const A* mean;
  const A* km;     // training backward: sum g / M
  const A* kx;     // training backward: invstd^2 sum g (x - mean) / M
  A neg;
};

// Which per-channel sums a pass takes (see sums_rows / sums_plane): the moments of x about a
// per-channel shift (in `mean`), or the backward's sum g and sum g (x - mean).
enum Sums { kMoments, kGrad };

// Channels-last rows [r0, r1) of C values: adds into sa/sb (float blocks of kRowBlock rows in
// the scratch ba/bb, then double) sum d and sum d^2 with d = x - mean (kMoments) or sum g and
// sum g (x - mean) (kGrad).
template <Sums S, typename T, typename A>
MT_AI void sums_rows(const T* __restrict x, const T* __restrict dy, int64_t r0, int64_t r1, int64_t C,
                     const Coef<A>& k, A* __restrict ba, A* __restrict bb, double* __restrict sa,
                     double* __restrict sb) {
  const A* __restrict sc = k.scale;
  const A* __restrict sh = k.shift;
  const A* __restrict mu = k.mean;
  const A neg = k.neg;
  for (int64_t rb = r0; rb < r1; rb += kRowBlock) {
    for (int64_t c = 0; c < C; ++c) ba[c] = bb[c] = A(0);
    const int64_t re = std::min(r1, rb + kRowBlock);
    for (int64_t r = rb; r < re; ++r) {
      const T* __restrict xr = x + r * C;
      if constexpr (S == kMoments) {
        for (int64_t c = 0; c < C; ++c) {
          const A d = static_cast<A>(xr[c]) - mu[c];
          ba[c] += d;
          bb[c] += d * d;
        }
      } else {
        const T* __restrict gr = dy + r * C;
        for (int64_t c = 0; c < C; ++c) {
          const A xv = static_cast<A>(xr[c]);
          const A g = static_cast<A>(gr[c]) * slope(xv * sc[c] + sh[c], neg);
          ba[c] += g;
          bb[c] += g * (xv - mu[c]);
        }
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      sa[c] += static_cast<double>(ba[c]);
      sb[c] += static_cast<double>(bb[c]);
    }
  }
}

// The same sums over one contiguous plane of n values of channel c, in kLanes float lanes.
template <Sums S, typename T, typename A>
MT_AI void sums_plane(const T* __restrict x, const T* __restrict dy, int64_t n, int64_t c, const Coef<A>& k,
                      double& sa, double& sb) {
  const A s = k.scale[c], h = k.shift[c], mu = k.mean[c], neg = k.neg;
  A la[kLanes] = {}, lb[kLanes] = {};
  int64_t i = 0;
  auto add = [&](int64_t j, int64_t idx) {
    const A xv = static_cast<A>(x[idx]);
    if constexpr (S == kMoments) {
      la[j] += xv - mu;
      lb[j] += (xv - mu) * (xv - mu);
    } else {
      const A g = static_cast<A>(dy[idx]) * slope(xv * s + h, neg);
      la[j] += g;
      lb[j] += g * (xv - mu);
    }
  };
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) add(j, i + j);
  for (int64_t j = 0; i < n; ++i, ++j) add(j, i);
  for (int64_t j = 0; j < kLanes; ++j) {
    sa += static_cast<double>(la[j]);
    sb += static_cast<double>(lb[j]);
  }
}

// Per-channel sums over all of x (and dy for kGrad), deterministic: the split into chunks does
// not depend on the thread count.
template <Sums S, typename T, typename A>
std::pair<std::vector<double>, std::vector<double>> channel_sums(const Layout& l, const T* x, const T* dy,
                                                                 const Coef<A>& k) {
  const int64_t C = l.C;
  std::vector<double> ta(C, 0.0), tb(C, 0.0);
  if (l.outer == 0 || l.inner == 0 || C == 0) return {ta, tb};
  if (l.inner == 1) {
    const int64_t R = l.outer;
    const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(kMaxChunks, R / 256));
    std::vector<double> part(chunks * 2 * C, 0.0);
    at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
      std::vector<A> ba(C), bb(C);
      for (int64_t q = b; q < e; ++q) {
        double* out = part.data() + q * 2 * C;
        sums_rows<S, T, A>(x, dy, R * q / chunks, R * (q + 1) / chunks, C, k, ba.data(), bb.data(), out, out + C);
      }
    });
    for (int64_t q = 0; q < chunks; ++q)
      for (int64_t c = 0; c < C; ++c) {
        ta[c] += part[q * 2 * C + c];
        tb[c] += part[q * 2 * C + C + c];
      }
    return {ta, tb};
  }
  const int64_t planes = l.outer * C, n = l.inner;
  std::vector<double> pa(planes, 0.0), pb(planes, 0.0);
  at::parallel_for(0, planes, std::max<int64_t>(1, 32768 / n), [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p)
      sums_plane<S, T, A>(x + p * n, dy ? dy + p * n : nullptr, n, p % C, k, pa[p], pb[p]);
  });
  for (int64_t p = 0; p < planes; ++p) {
    ta[p % C] += pa[p];
    tb[p % C] += pb[p];
  }
  return {ta, tb};
}

// y = act(x * scale + shift) (FWD) or dx = scale * (g - km - (x - mean) kx) (backward) for one
// value of channel c (index i into x, dy, out).
template <bool FWD, typename T, typename A>
MT_AI void map_one(const T* __restrict x, const T* __restrict dy, T* __restrict out, int64_t i, A s, A h, A mu,
                   A km, A kx, A neg) {
  const A xv = static_cast<A>(x[i]);
  const A pre = xv * s + h;
  if constexpr (FWD) {
    out[i] = static_cast<T>(pre * slope(pre, neg));
  } else {
    const A g = static_cast<A>(dy[i]) * slope(pre, neg);
    out[i] = static_cast<T>(s * (g - km - (xv - mu) * kx));
  }
}

// map_one over channels-last rows [r0, r1) of C values.
template <bool FWD, typename T, typename A>
MT_AI void map_rows(const T* __restrict x, const T* __restrict dy, T* __restrict out, int64_t r0, int64_t r1,
                    int64_t C, const Coef<A>& k) {
  const A* __restrict sc = k.scale;
  const A* __restrict sh = k.shift;
  const A* __restrict mu = k.mean;
  const A* __restrict km = k.km;
  const A* __restrict kx = k.kx;
  const A zero(0), neg = k.neg;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t off = r * C;
    if constexpr (FWD) {
      for (int64_t c = 0; c < C; ++c) map_one<FWD, T, A>(x, dy, out, off + c, sc[c], sh[c], zero, zero, zero, neg);
    } else {
      for (int64_t c = 0; c < C; ++c) map_one<FWD, T, A>(x, dy, out, off + c, sc[c], sh[c], mu[c], km[c], kx[c], neg);
    }
  }
}

// map_one over x's layout: rows of C channels (channels-last) or planes of one channel.
template <bool FWD, typename T, typename A>
void channel_map(const Layout& l, const T* x, const T* dy, T* out, const Coef<A>& k) {
  const int64_t C = l.C;
  if (l.outer == 0 || l.inner == 0 || C == 0) return;
  const A zero(0);
  if (l.inner == 1) {
    at::parallel_for(0, l.outer, std::max<int64_t>(1, 16384 / C),
                     [&](int64_t b, int64_t e) { map_rows<FWD, T, A>(x, dy, out, b, e, C, k); });
  } else {
    const int64_t n = l.inner;
    at::parallel_for(0, l.outer * C, std::max<int64_t>(1, 16384 / n), [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) {
        const int64_t c = p % C;
        const A s = k.scale[c], h = k.shift[c];
        const A mu = FWD ? zero : k.mean[c], km = FWD ? zero : k.km[c], kx = FWD ? zero : k.kx[c];
        for (int64_t i = p * n; i < (p + 1) * n; ++i) map_one<FWD, T, A>(x, dy, out, i, s, h, mu, km, kx, k.neg);
      }
    });
  }
}

at::ScalarType stat_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_fwd_cpu(
    const at::Tensor& x_in, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var, double eps,
    int64_t act, double alpha) {
  constexpr const char* op = "batch_norm_act";
  norm_act::check_input(op, x_in, "x", act, alpha, eps);
  const int64_t C = x_in.size(1);
  check_channel_vec(op, weight, "weight", C);
  check_channel_vec(op, bias, "bias", C);
  check_channel_vec(op, running_mean, "running_mean", C);
  check_channel_vec(op, running_var, "running_var", C);
  const bool has_mean = running_mean.has_value() && running_mean->defined();
  const bool has_var = running_var.has_value() && running_var->defined();
  TORCH_CHECK_VALUE(has_mean == has_var, op, ": give both running_mean and running_var (eval) or neither (training)");
  const bool training = !has_mean;
  const Layout l = layout_of(x_in);
  const int64_t M = l.outer * l.inner;
  TORCH_CHECK_VALUE(!training || M > 1, op, ": training statistics need more than one value per channel, got x of shape ",
                    x_in.sizes());
  at::Tensor y = at::empty_like(l.x, l.x.options().memory_format(l.format));
  at::Tensor mean_out = at::empty({C}, x_in.options().dtype(stat_type(x_in)));
  at::Tensor var_out = at::empty({C}, x_in.options().dtype(stat_type(x_in)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, l.x.scalar_type(), "mtcore_bn_act_fwd", [&] {
    using A = typename Acc<scalar_t>::type;
    const scalar_t* xp = l.x.const_data_ptr<scalar_t>();
    std::vector<A> mean(C, A(0)), var(C, A(1)), scale(C), shift(C);
    Coef<A> k{scale.data(), shift.data(), mean.data(), nullptr, nullptr, neg_slope<A>(act, alpha)};
    if (training) {
      // One pass of the moments about a shift, each channel's first value: the shifted values
      // are O(std), so var = E[d^2] - E[d]^2 does not cancel even when |mean| >> std.
      std::vector<A> shift0(C);
      for (int64_t c = 0; c < C; ++c) shift0[c] = static_cast<A>(xp[l.inner == 1 ? c : c * l.inner]);
      k.mean = shift0.data();
      const auto s = channel_sums<kMoments, scalar_t, A>(l, xp, nullptr, k);
      for (int64_t c = 0; c < C; ++c) {
        const double d1 = s.first[c] / M;
        mean[c] = static_cast<A>(static_cast<double>(shift0[c]) + d1);
        var[c] = static_cast<A>(std::max(0.0, s.second[c] / M - d1 * d1));
      }
      k.mean = mean.data();
    } else {
      mean = channel_values<A>(running_mean, C, A(0));
      var = channel_values<A>(running_var, C, A(1));
      k.mean = mean.data();
    }
    const std::vector<A> w = channel_values<A>(weight, C, A(1));
    const std::vector<A> b = channel_values<A>(bias, C, A(0));
    for (int64_t c = 0; c < C; ++c) {
      scale[c] = w[c] / std::sqrt(var[c] + static_cast<A>(eps));
      shift[c] = b[c] - mean[c] * scale[c];
    }
    channel_map<true, scalar_t, A>(l, xp, nullptr, y.data_ptr<scalar_t>(), k);
    using stat_t = std::conditional_t<std::is_same<A, double>::value, double, float>;
    std::copy(mean.begin(), mean.end(), mean_out.data_ptr<stat_t>());
    std::copy(var.begin(), var.end(), var_out.data_ptr<stat_t>());
  });
  return {y, mean_out, var_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_bwd_cpu(
    const at::Tensor& dy_in, const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean_in, const at::Tensor& var_in, double eps,
    int64_t act, double alpha, bool training) {
  constexpr const char* op = "batch_norm_act backward";
  norm_act::check_input(op, x_in, "x", act, alpha, eps);
  norm_act::check_input(op, dy_in, "dy", act, alpha, eps);
  TORCH_CHECK_VALUE(dy_in.sizes() == x_in.sizes(), op, ": dy has shape ", dy_in.sizes(), " but x has shape ",
                    x_in.sizes());
  const int64_t C = x_in.size(1);
  check_channel_vec(op, weight, "weight", C);
  check_channel_vec(op, bias, "bias", C);
  check_channel_vec(op, mean_in, "mean", C);
  check_channel_vec(op, var_in, "var", C);
  const Layout l = layout_of(x_in);
  const at::Tensor dy = dy_in.scalar_type() == l.x.scalar_type() ? dy_in.contiguous(l.format)
                                                                 : dy_in.to(l.x.scalar_type()).contiguous(l.format);
  const int64_t M = l.outer * l.inner;
  at::Tensor dx = at::empty_like(l.x, l.x.options().memory_format(l.format));
  const auto param_type = weight.has_value() && weight->defined() ? weight->scalar_type() : stat_type(x_in);
  at::Tensor dw = at::empty({C}, x_in.options().dtype(param_type));
  at::Tensor db = at::empty({C}, x_in.options().dtype(param_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, l.x.scalar_type(), "mtcore_bn_act_bwd", [&] {
    using A = typename Acc<scalar_t>::type;
    const scalar_t* xp = l.x.const_data_ptr<scalar_t>();
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    const std::vector<A> mean = channel_values<A>(mean_in, C, A(0));
    const std::vector<A> var = channel_values<A>(var_in, C, A(1));
    const std::vector<A> w = channel_values<A>(weight, C, A(1));
    const std::vector<A> b = channel_values<A>(bias, C, A(0));
    std::vector<A> invstd(C), scale(C), shift(C), km(C, A(0)), kx(C, A(0));
    for (int64_t c = 0; c < C; ++c) {
      invstd[c] = A(1) / std::sqrt(var[c] + static_cast<A>(eps));
      scale[c] = w[c] * invstd[c];
      shift[c] = b[c] - mean[c] * scale[c];
    }
    const Coef<A> k{scale.data(), shift.data(), mean.data(), km.data(), kx.data(), neg_slope<A>(act, alpha)};
    // pass 1: sum g and sum g (x - mean), g = dy * act'(pre); pass 2: dx
    const auto sums = channel_sums<kGrad, scalar_t, A>(l, xp, gp, k);
    const std::vector<double>&sum_g = sums.first, &sum_gx = sums.second;
    if (training && M > 0) {
      for (int64_t c = 0; c < C; ++c) {
        km[c] = static_cast<A>(sum_g[c] / M);
        kx[c] = static_cast<A>(sum_gx[c] / M) * invstd[c] * invstd[c];
      }
    }
    channel_map<false, scalar_t, A>(l, xp, gp, dx.data_ptr<scalar_t>(), k);
    at::Tensor dw64 = at::empty({C}, at::kDouble), db64 = at::empty({C}, at::kDouble);
    for (int64_t c = 0; c < C; ++c) {
      dw64.data_ptr<double>()[c] = sum_gx[c] * static_cast<double>(invstd[c]);
      db64.data_ptr<double>()[c] = sum_g[c];
    }
    dw.copy_(dw64);
    db.copy_(db64);
  });
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mtcore, m) {
  m.def(
      "bn_act_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, float eps, "
      "int act, float alpha) -> (Tensor, Tensor, Tensor)");
  m.def(
      "bn_act_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor var, float eps, int act, "
      "float alpha, bool training) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mtcore, CPU, m) {
  m.impl("bn_act_fwd", &bn_act_fwd_cpu);
  m.impl("bn_act_bwd", &bn_act_bwd_cpu);
}

}  // namespace mtcore
