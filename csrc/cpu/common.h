// Shared pieces of mtcore's CPU loss kernels: a vectorisable exp, deterministic parallel sums,
// and the fused cross-entropy / VAE / adversarial cores (loss and gradient in one pass) that both
// the single ops and the joint loss call.
//
// Hot loops are plain C++ over raw pointers that GCC/Clang auto-vectorise at -O3. On x86-64 they
// are compiled twice (target_clones: AVX2+FMA and the baseline) and picked at load time, so the
// cached library stays portable (no -march=native).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define MT_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MT_CLONES
#endif
#define MT_AI inline __attribute__((always_inline))

namespace mtcore {

// Accumulation type: float for float/bf16/half, double for double.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// exp(x) for float, Cephes-style range reduction + degree-6 polynomial (about 1-2 ulp), written
// without branches or libm calls so the compiler vectorises it. x must lie in [-87.3, 88.3], the
// range where the result is a normal float: the wrappers below clamp it.
static MT_AI float fast_exp_clamped(float x) {
  float n = x * 1.44269504088896341f + 12582912.0f;  // round to nearest via the 1.5*2^23 trick
  n -= 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
static MT_AI float fast_exp(float x) {
  return fast_exp_clamped(std::min(std::max(x, -87.3f), 88.3f));
}
// exp(x) for x <= 0 (a logit minus its row maximum): only the lower clamp is needed.
static MT_AI float fast_exp_nonpos(float x) { return fast_exp_clamped(std::max(x, -87.3f)); }
static MT_AI double fast_exp(double x) { return std::exp(x); }
static MT_AI double fast_exp_nonpos(double x) { return std::exp(x); }

// log(x) for a positive normal float, Cephes-style: x = m * 2^e with m in [sqrt(1/2), sqrt(2)),
// then a degree-9 polynomial in m - 1 (about 1 ulp); branch-free so loops over it vectorise.
static MT_AI float fast_log(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  int32_t e = ((bits >> 23) & 0xff) - 127;
  bits = (bits & 0x007fffff) | 0x3f800000;  // mantissa m in [1, 2)
  float m;
  std::memcpy(&m, &bits, sizeof(m));
  const bool big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1 : e;
  const float f = m - 1.0f, z = f * f, ef = static_cast<float>(e);
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z - 2.12194440e-4f * ef - 0.5f * z;
  return f + y + 0.693359375f * ef;
}
static MT_AI double fast_log(double x) { return std::log(x); }

// log1p(e) for e in [0, 1] without a libm call, so loops over it vectorise: log(u) * e / (u - 1)
// with u = 1 + e rounded, which cancels u's rounding error (Goldberg's log1p; e itself where
// u rounds to 1).
static MT_AI float log1p_unit(float e) {
  const float u = 1.0f + e, d = u - 1.0f;
  return d == 0.0f ? e : fast_log(u) * (e / d);
}
static MT_AI double log1p_unit(double e) { return std::log1p(e); }

// softplus(x) = max(x, 0) + log1p(exp(-|x|)): no overflow for large |x|.
template <typename A> static MT_AI A softplus(A x) {
  return std::max(x, A(0)) + log1p_unit(fast_exp(-std::abs(x)));
}
// softplus(x), and its derivative sigmoid(x) into `sig`, from one exp(-|x|).
template <typename A> static MT_AI A softplus_sigmoid(A x, A& sig) {
  const A e = fast_exp(-std::abs(x));
  sig = (x >= A(0) ? A(1) : e) / (A(1) + e);
  return std::max(x, A(0)) + log1p_unit(e);
}

// Sum of f(lo, hi) over a fixed split of [0, n) into at most 64 chunks, run with at::parallel_for.
// The split does not depend on the thread count, so the result is deterministic.
template <typename F> double parallel_sum(int64_t n, int64_t grain, const F& f) {
  if (n <= 0) return 0.0;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>((n + grain - 1) / grain, 64));
  if (chunks == 1) return f(int64_t(0), n);  // small input: no parallel region to start
  std::vector<double> part(chunks, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) part[c] = f(n * c / chunks, n * (c + 1) / chunks);
  });
  double s = 0.0;
  for (double v : part) s += v;
  return s;
}

// ------------------------------------------------------------------------- cross entropy core
//
// Per element i with target y (w = class weights, W = sum w, eps = label smoothing, C classes):
//   loss_i = A_i * lse_i - (1-eps) w_y z_y - eps/C sum_c w_c z_c,   A_i = (1-eps) w_y + eps/C W
//   dloss_i/dz_c = A_i softmax_c - (1-eps) w_y [c == y] - eps/C w_c
// Ignored elements have loss 0 and gradient 0. The gradient is written multiplied by `scale`.

struct CEParams {
  int64_t N, C, HW;      // logits viewed as [N, C, HW]; HW = 1 for [N, C]
  int64_t ignore_index;
  double eps;            // label smoothing
  double wsum;           // sum of class weights
  double scale;          // factor on the written gradient (1/denominator for mean)
  bool grad;             // write the gradient
  bool per_element;      // write per-element losses (reduction "none")
};

constexpr int64_t kBlock = 256;  // pixels per block on the spatial path

// Spatial path (HW > 1): units are blocks of up to kBlock pixels of one sample; channel stride HW.
template <typename T, typename A>
static MT_AI double ce_spatial_impl(const T* __restrict z, const int64_t* __restrict t,
                                    const A* __restrict w, const CEParams& p, T* __restrict g,
                                    T* __restrict lossn, int64_t u0, int64_t u1) {
  const int64_t C = p.C, HW = p.HW;
  const int64_t bpn = (HW + kBlock - 1) / kBlock;
  const A eps = static_cast<A>(p.eps), ec = static_cast<A>(p.eps / static_cast<double>(C));
  const A one_m_eps = A(1) - eps, wsum = static_cast<A>(p.wsum), scale = static_cast<A>(p.scale);
  // exp(z - max) of one block, every class; default-initialised (a std::vector would zero it)
  std::unique_ptr<A[]> buf(new A[static_cast<size_t>(C * kBlock)]);
  A mx[kBlock], s[kBlock], sz[kBlock], ca[kBlock], cw[kBlock], dy[kBlock];
  int32_t ty[kBlock];
  double total = 0.0;
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t n = u / bpn, p0 = (u % bpn) * kBlock;
    const int64_t len = std::min(kBlock, HW - p0);
    const T* zb = z + n * C * HW + p0;
    const int64_t* tb = t + n * HW + p0;
    for (int64_t j = 0; j < kBlock; ++j) {
      mx[j] = -std::numeric_limits<A>::infinity();
      s[j] = A(0);
      sz[j] = A(0);
    }
    for (int64_t c = 0; c < C; ++c) {
      const T* zc = zb + c * HW;
      for (int64_t j = 0; j < len; ++j) mx[j] = std::max(mx[j], static_cast<A>(zc[j]));
    }
    for (int64_t c = 0; c < C; ++c) {
      const T* zc = zb + c * HW;
      A* e = buf.get() + c * kBlock;
      for (int64_t j = 0; j < len; ++j) {
        const A v = fast_exp_nonpos(static_cast<A>(zc[j]) - mx[j]);
        e[j] = v;
        s[j] += v;
      }
    }
    if (eps != A(0)) {
      for (int64_t c = 0; c < C; ++c) {
        const T* zc = zb + c * HW;
        const A wc = w[c];
        for (int64_t j = 0; j < len; ++j) sz[j] += wc * static_cast<A>(zc[j]);
      }
    }
    for (int64_t j = 0; j < len; ++j) mx[j] += fast_log(s[j]);  // mx becomes log-sum-exp
    A bsum = A(0);
    for (int64_t j = 0; j < len; ++j) {
      const int64_t y = tb[j];
      const bool valid = y != p.ignore_index;
      const A wy = valid ? w[y] : A(0);
      const A zy = valid ? static_cast<A>(zb[y * HW + j]) : A(0);
      const A lse = mx[j];
      const A a = valid ? one_m_eps * wy + ec * wsum : A(0);
      const A l = valid ? a * lse - one_m_eps * wy * zy - ec * sz[j] : A(0);
      if (p.per_element) lossn[n * HW + p0 + j] = static_cast<T>(l);
      bsum += l;
      ca[j] = scale * a / s[j];
      cw[j] = valid ? scale * ec : A(0);
      dy[j] = scale * one_m_eps * wy;
      ty[j] = valid ? static_cast<int32_t>(y) : -1;
    }
    total += static_cast<double>(bsum);
    if (p.grad) {
      T* gb = g + n * C * HW + p0;
      for (int64_t c = 0; c < C; ++c) {
        const A* e = buf.get() + c * kBlock;
        const A wc = w[c];
        T* gc = gb + c * HW;
        const int32_t c32 = static_cast<int32_t>(c);
        for (int64_t j = 0; j < len; ++j) {
          const A d = ty[j] == c32 ? dy[j] : A(0);
          gc[j] = static_cast<T>(e[j] * ca[j] - cw[j] * wc - d);
        }
      }
    }
  }
  return total;
}

// Row path (HW == 1, classification [N, C]): units are rows; classes are contiguous.
template <typename T, typename A>
static MT_AI double ce_rows_impl(const T* __restrict z, const int64_t* __restrict t,
                                 const A* __restrict w, const CEParams& p, T* __restrict g,
                                 T* __restrict lossn, int64_t u0, int64_t u1) {
  const int64_t C = p.C;
  const A eps = static_cast<A>(p.eps), ec = static_cast<A>(p.eps / static_cast<double>(C));
  const A one_m_eps = A(1) - eps, wsum = static_cast<A>(p.wsum), scale = static_cast<A>(p.scale);
  std::vector<A> e(static_cast<size_t>(C));
  double total = 0.0;
  for (int64_t i = u0; i < u1; ++i) {
    const T* zr = z + i * C;
    const int64_t y = t[i];
    const bool valid = y != p.ignore_index;
    if (!valid) {
      if (p.per_element) lossn[i] = static_cast<T>(0);
      if (p.grad) {
        T* gr = g + i * C;
        for (int64_t c = 0; c < C; ++c) gr[c] = static_cast<T>(0);
      }
      continue;
    }
    A mx = -std::numeric_limits<A>::infinity();
    for (int64_t c = 0; c < C; ++c) mx = std::max(mx, static_cast<A>(zr[c]));
    A s = A(0), sz = A(0);
    for (int64_t c = 0; c < C; ++c) {
      const A v = fast_exp(static_cast<A>(zr[c]) - mx);
      e[c] = v;
      s += v;
    }
    if (eps != A(0))
      for (int64_t c = 0; c < C; ++c) sz += w[c] * static_cast<A>(zr[c]);
    const A wy = w[y];
    const A lse = mx + std::log(s);
    const A a = one_m_eps * wy + ec * wsum;
    const A l = a * lse - one_m_eps * wy * static_cast<A>(zr[y]) - ec * sz;
    if (p.per_element) lossn[i] = static_cast<T>(l);
    total += static_cast<double>(l);
    if (p.grad) {
      T* gr = g + i * C;
      const A ca = scale * a / s, cw = scale * ec;
      for (int64_t c = 0; c < C; ++c) gr[c] = static_cast<T>(e[c] * ca - cw * w[c]);
      gr[y] = static_cast<T>(e[y] * ca - cw * w[y] - scale * one_m_eps * wy);
    }
  }
  return total;
}

#define MT_CE_INSTANCE(T)                                                                       \
  static MT_CLONES double ce_spatial(const T* z, const int64_t* t, const Acc<T>::type* w,       \
                                     const CEParams& p, T* g, T* lossn, int64_t u0, int64_t u1) { \
    return ce_spatial_impl<T, Acc<T>::type>(z, t, w, p, g, lossn, u0, u1);                      \
  }                                                                                             \
  static MT_CLONES double ce_rows(const T* z, const int64_t* t, const Acc<T>::type* w,          \
                                  const CEParams& p, T* g, T* lossn, int64_t u0, int64_t u1) {  \
    return ce_rows_impl<T, Acc<T>::type>(z, t, w, p, g, lossn, u0, u1);                         \
  }
MT_CE_INSTANCE(float)
MT_CE_INSTANCE(double)
MT_CE_INSTANCE(c10::BFloat16)
MT_CE_INSTANCE(c10::Half)
#undef MT_CE_INSTANCE

// Checks targets (class in [0, C) or ignore_index) and returns the sum of w[y] over non-ignored
// targets (the denominator of the mean). Throws ValueError naming a bad value.
template <typename A>
static double ce_target_denominator(const int64_t* t, int64_t count, int64_t C, int64_t ignore,
                                    const A* w) {
  std::vector<int64_t> bad(64, 0);
  std::vector<char> has_bad(64, 0);
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>((count + 32767) / 32768, 64));
  std::vector<double> part(chunks, 0.0);
  if (count > 0) {
    at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
      for (int64_t ch = b; ch < e; ++ch) {
        const int64_t lo = count * ch / chunks, hi = count * (ch + 1) / chunks;
        double s = 0.0;
        for (int64_t i = lo; i < hi; ++i) {
          const int64_t y = t[i];
          if (y == ignore) continue;
          if (y < 0 || y >= C) {
            if (!has_bad[ch]) { has_bad[ch] = 1; bad[ch] = y; }
            continue;
          }
          s += static_cast<double>(w[y]);
        }
        part[ch] = s;
      }
    });
  }
  double denom = 0.0;
  for (int64_t ch = 0; ch < chunks; ++ch) {
    TORCH_CHECK_VALUE(!has_bad[ch], "target holds class index ", bad[ch], ", outside [0, ", C,
                      ") and not ignore_index=", ignore);
    denom += part[ch];
  }
  return denom;
}

// Validates CE inputs (dtype/device/shape) with messages that name the argument.
static inline void ce_check(const at::Tensor& logits, const at::Tensor& target,
                            const c10::optional<at::Tensor>& weight, const char* who) {
  TORCH_CHECK_TYPE(logits.is_floating_point(), who, ": logits must be a floating tensor, got ",
                   logits.scalar_type(), " with shape ", logits.sizes());
  TORCH_CHECK_VALUE(logits.dim() >= 2, who, ": logits must be [N, C, *spatial], got shape ",
                    logits.sizes());
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, who,
                   ": target must be int64 class indices, got ", target.scalar_type());
  TORCH_CHECK_VALUE(logits.size(1) > 0, who, ": logits need at least one class, got shape ",
                    logits.sizes());
  std::vector<int64_t> expect{logits.size(0)};
  for (int64_t d = 2; d < logits.dim(); ++d) expect.push_back(logits.size(d));
  TORCH_CHECK_VALUE(target.sizes().vec() == expect, who, ": target shape ", target.sizes(),
                    " does not match logits shape ", logits.sizes(),
                    " (logits [N, C, *spatial] -> target [N, *spatial])");
  TORCH_CHECK_VALUE(target.device() == logits.device(), who, ": target is on ", target.device(),
                    " but logits on ", logits.device());
  if (weight.has_value() && weight->defined()) {
    TORCH_CHECK_VALUE(weight->dim() == 1 && weight->size(0) == logits.size(1), who,
                      ": weight must be [C] = [", logits.size(1), "], got shape ", weight->sizes());
    TORCH_CHECK_VALUE(weight->device() == logits.device(), who, ": weight is on ",
                      weight->device(), " but logits on ", logits.device());
  }
}

// Cross entropy loss and gradient. reduction 0 none / 1 mean / 2 sum. `grad_factor` multiplies
// the gradient (the joint loss passes its task weight); `value_out` receives the reduced loss in
// double precision. Returns (loss, grad) with grad empty unless compute_grad. Non-contiguous or
// channels_last logits are made contiguous first (one extra copy of the logits).
static inline std::tuple<at::Tensor, at::Tensor> ce_forward(
    const at::Tensor& logits_in, const at::Tensor& target_in,
    const c10::optional<at::Tensor>& weight, int64_t ignore_index, double eps, int64_t reduction,
    bool compute_grad, double grad_factor = 1.0, double* value_out = nullptr) {
  TORCH_CHECK_VALUE(reduction >= 0 && reduction <= 2, "seg_ce_fwd: reduction must be 0 (none), ",
                    "1 (mean) or 2 (sum), got ", reduction);
  TORCH_CHECK_VALUE(eps >= 0.0 && eps <= 1.0, "seg_ce_fwd: label_smoothing must be in [0, 1], got ",
                    eps);
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor target = target_in.contiguous();
  const int64_t N = logits.size(0), C = logits.size(1);
  const int64_t HW = logits.numel() / std::max<int64_t>(1, N * C);
  const int64_t count = N * HW;
  at::Tensor loss, grad;
  grad = compute_grad ? at::empty(logits.sizes(), logits.options()) : at::empty({0}, logits.options());
  if (reduction == 0) loss = at::empty(target.sizes(), logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "seg_ce_fwd", [&] {
    using A = Acc<scalar_t>::type;
    std::vector<A> w(static_cast<size_t>(C), A(1));
    if (weight.has_value() && weight->defined()) {
      const at::Tensor wt = weight->to(at::kDouble).contiguous();
      const double* wp = wt.data_ptr<double>();
      for (int64_t c = 0; c < C; ++c) w[c] = static_cast<A>(wp[c]);
    }
    double wsum = 0.0;
    for (int64_t c = 0; c < C; ++c) wsum += static_cast<double>(w[c]);
    const int64_t* tp = target.data_ptr<int64_t>();
    const double denom = ce_target_denominator<A>(tp, count, C, ignore_index, w.data());
    CEParams p{N, C, HW, ignore_index, eps, wsum, 1.0, compute_grad, reduction == 0};
    if (reduction == 1) p.scale = denom != 0 ? 1.0 / denom : 0.0;  // weights may be negative
    p.scale *= grad_factor;
    const scalar_t* zp = logits.data_ptr<scalar_t>();
    scalar_t* gp = compute_grad ? grad.data_ptr<scalar_t>() : nullptr;
    scalar_t* lp = reduction == 0 ? loss.data_ptr<scalar_t>() : nullptr;
    double total;
    if (HW == 1) {
      const int64_t grain = std::max<int64_t>(1, 16384 / C);
      total = parallel_sum(N, grain, [&](int64_t a, int64_t b) {
        return ce_rows(zp, tp, w.data(), p, gp, lp, a, b);
      });
    } else {
      const int64_t units = N * ((HW + kBlock - 1) / kBlock);
      const int64_t grain = std::max<int64_t>(1, 16384 / (C * kBlock));
      total = parallel_sum(units, grain, [&](int64_t a, int64_t b) {
        return ce_spatial(zp, tp, w.data(), p, gp, lp, a, b);
      });
    }
    if (reduction == 1) total = denom != 0 ? total / denom : 0.0;
    if (value_out != nullptr) *value_out = total;
    if (reduction != 0) loss = at::scalar_tensor(total, logits.options());
  });
  return {loss, grad};
}

// ------------------------------------------------------------------------- VAE core
// rec = sum over elements of (x - t)^2 (kind 0) or BCE-with-logits (kind 1); the gradient written
// is gfac * d(rec)/dx. kl = -0.5 sum(1 + lv - mu^2 - exp(lv)); gradients gfac * d(kl)/d(mu, lv).
// Both return the raw sums (the caller divides by N and folds 1/N into gfac).

template <typename T, typename A>
static MT_AI double vae_rec_impl(const T* __restrict x, const T* __restrict t, int64_t kind,
                                 A gfac, T* __restrict g, int64_t i0, int64_t i1) {
  A s = A(0);
  if (kind == 0) {
    if (g != nullptr) {
      for (int64_t i = i0; i < i1; ++i) {
        const A d = static_cast<A>(x[i]) - static_cast<A>(t[i]);
        s += d * d;
        g[i] = static_cast<T>(A(2) * gfac * d);
      }
    } else {
      for (int64_t i = i0; i < i1; ++i) {
        const A d = static_cast<A>(x[i]) - static_cast<A>(t[i]);
        s += d * d;
      }
    }
  } else if (g != nullptr) {  // the branch outside the loops, so each one vectorises
    for (int64_t i = i0; i < i1; ++i) {
      const A xv = static_cast<A>(x[i]), tv = static_cast<A>(t[i]);
      A sig;
      s += softplus_sigmoid(xv, sig) - xv * tv;
      g[i] = static_cast<T>(gfac * (sig - tv));
    }
  } else {
    for (int64_t i = i0; i < i1; ++i) {
      const A xv = static_cast<A>(x[i]), tv = static_cast<A>(t[i]);
      s += softplus(xv) - xv * tv;
    }
  }
  return static_cast<double>(s);
}

template <typename T, typename A>
static MT_AI double vae_kl_impl(const T* __restrict mu, const T* __restrict lv, A gfac,
                                T* __restrict gmu, T* __restrict glv, int64_t i0, int64_t i1) {
  A s = A(0);
  if (gmu != nullptr) {  // the branch outside the loops, as in vae_rec_impl
    for (int64_t i = i0; i < i1; ++i) {
      const A m = static_cast<A>(mu[i]), l = static_cast<A>(lv[i]);
      const A e = fast_exp(l);
      s += A(1) + l - m * m - e;
      gmu[i] = static_cast<T>(gfac * m);
      glv[i] = static_cast<T>(gfac * A(0.5) * (e - A(1)));
    }
  } else {
    for (int64_t i = i0; i < i1; ++i) {
      const A m = static_cast<A>(mu[i]), l = static_cast<A>(lv[i]);
      s += A(1) + l - m * m - fast_exp(l);
    }
  }
  return -0.5 * static_cast<double>(s);
}

// ------------------------------------------------------------------------- adversarial core
// Per-element GAN loss of logits x (kind 0 non-saturating, 1 hinge, 2 least squares; role 0
// d_real, 1 d_fake, 2 g); the gradient written is gfac * d(loss_i)/dx. Returns the raw sum.
// A per-element loss and its derivative.
template <typename A> struct LossGrad {
  A loss, grad;
};

// One loop per (kind, role, gradient or not), with no branch inside, so each one vectorises (the
// sum stays in order: GCC adds the vector lanes one by one).
template <typename T, typename A, typename F>
static MT_AI double adv_loop(const T* __restrict x, A gfac, T* __restrict g, int64_t i0,
                             int64_t i1, const F& term) {
  A s = A(0);
  if (g != nullptr) {
    for (int64_t i = i0; i < i1; ++i) {
      const LossGrad<A> t = term(static_cast<A>(x[i]));
      s += t.loss;
      g[i] = static_cast<T>(gfac * t.grad);
    }
  } else {
    for (int64_t i = i0; i < i1; ++i) s += term(static_cast<A>(x[i])).loss;
  }
  return static_cast<double>(s);
}

#define MT_LAMBDA_AI __attribute__((always_inline))

template <typename T, typename A>
static MT_AI double adv_impl(const T* __restrict x, int64_t kind, int64_t role, A gfac,
                             T* __restrict g, int64_t i0, int64_t i1) {
  using LG = LossGrad<A>;
  if (kind == 0) {  // softplus(u) with u = v (d_fake) or -v; dloss/du = sigmoid(u)
    if (role == 1)
      return adv_loop<T, A>(x, gfac, g, i0, i1, [](A v) MT_LAMBDA_AI {
        A sig;
        const A l = softplus_sigmoid(v, sig);
        return LG{l, sig};
      });
    return adv_loop<T, A>(x, gfac, g, i0, i1, [](A v) MT_LAMBDA_AI {
      A sig;
      const A l = softplus_sigmoid(-v, sig);
      return LG{l, -sig};
    });
  }
  if (kind == 1) {  // hinge
    if (role == 2) return adv_loop<T, A>(x, gfac, g, i0, i1, [](A v) MT_LAMBDA_AI { return LG{-v, A(-1)}; });
    if (role == 1)
      return adv_loop<T, A>(x, gfac, g, i0, i1, [](A v) MT_LAMBDA_AI {
        return LG{std::max(A(1) + v, A(0)), v > A(-1) ? A(1) : A(0)};
      });
    return adv_loop<T, A>(x, gfac, g, i0, i1, [](A v) MT_LAMBDA_AI {
      return LG{std::max(A(1) - v, A(0)), v < A(1) ? A(-1) : A(0)};
    });
  }
  const A shift = role == 1 ? A(0) : A(1);  // least squares: (v - shift)^2
  return adv_loop<T, A>(x, gfac, g, i0, i1, [shift](A v) MT_LAMBDA_AI {
    const A r = v - shift;
    return LG{r * r, A(2) * r};
  });
}

#define MT_ELEM_INSTANCE(T)                                                                      \
  static MT_CLONES double vae_rec(const T* x, const T* t, int64_t kind, Acc<T>::type gfac, T* g, \
                                  int64_t i0, int64_t i1) {                                      \
    return vae_rec_impl<T, Acc<T>::type>(x, t, kind, gfac, g, i0, i1);                           \
  }                                                                                              \
  static MT_CLONES double vae_kl(const T* mu, const T* lv, Acc<T>::type gfac, T* gmu, T* glv,    \
                                 int64_t i0, int64_t i1) {                                       \
    return vae_kl_impl<T, Acc<T>::type>(mu, lv, gfac, gmu, glv, i0, i1);                         \
  }                                                                                              \
  static MT_CLONES double adv(const T* x, int64_t kind, int64_t role, Acc<T>::type gfac, T* g,   \
                              int64_t i0, int64_t i1) {                                          \
    return adv_impl<T, Acc<T>::type>(x, kind, role, gfac, g, i0, i1);                            \
  }
MT_ELEM_INSTANCE(float)
MT_ELEM_INSTANCE(double)
MT_ELEM_INSTANCE(c10::BFloat16)
MT_ELEM_INSTANCE(c10::Half)
#undef MT_ELEM_INSTANCE

constexpr int64_t kElemGrain = 32768;

static inline void float_check(const at::Tensor& t, const char* who, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble ||
                       t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
                   who, ": ", name, " must be float32, float64, bfloat16 or float16, got ",
                   t.scalar_type(), " with shape ", t.sizes());
}

struct VAEOut {
  double rec, kl;
  at::Tensor grad_recon, grad_mu, grad_logvar;
};

// VAE terms (already divided by N) and their gradients: grad_recon = rec_fac * d(rec)/d(recon),
// grad_mu/grad_logvar = kl_fac * d(kl)/d(mu, logvar).
static inline VAEOut vae_forward(const at::Tensor& recon_in, const at::Tensor& target_in,
                                 const at::Tensor& mu_in, const at::Tensor& logvar_in,
                                 int64_t kind, bool compute_grad, double rec_fac, double kl_fac,
                                 const char* who) {
  float_check(recon_in, who, "recon");
  float_check(mu_in, who, "mu");
  TORCH_CHECK_TYPE(target_in.scalar_type() == recon_in.scalar_type(), who, ": target dtype ",
                   target_in.scalar_type(), " must equal recon dtype ", recon_in.scalar_type());
  TORCH_CHECK_TYPE(logvar_in.scalar_type() == mu_in.scalar_type(), who, ": logvar dtype ",
                   logvar_in.scalar_type(), " must equal mu dtype ", mu_in.scalar_type());
  TORCH_CHECK_VALUE(recon_in.dim() >= 1 && recon_in.sizes() == target_in.sizes(), who,
                    ": recon and target must have one shape [N, *], got ", recon_in.sizes(),
                    " and ", target_in.sizes());
  TORCH_CHECK_VALUE(mu_in.dim() == 2 && mu_in.sizes() == logvar_in.sizes(), who,
                    ": mu and logvar must both be [N, Z], got ", mu_in.sizes(), " and ",
                    logvar_in.sizes());
  TORCH_CHECK_VALUE(mu_in.size(0) == recon_in.size(0), who, ": mu has batch size ",
                    mu_in.size(0), " but recon has ", recon_in.size(0));
  TORCH_CHECK_VALUE(kind == 0 || kind == 1, who, ": recon_kind must be 0 (mse) or 1 (bernoulli), got ",
                    kind);
  const at::Tensor recon = recon_in.contiguous(), target = target_in.contiguous();
  const at::Tensor mu = mu_in.contiguous(), logvar = logvar_in.contiguous();
  const double inv_n = 1.0 / static_cast<double>(std::max<int64_t>(1, recon.size(0)));
  VAEOut o;
  auto empty = [](const at::Tensor& t) { return at::empty({0}, t.options()); };
  o.grad_recon = compute_grad ? at::empty(recon.sizes(), recon.options()) : empty(recon);
  o.grad_mu = compute_grad ? at::empty(mu.sizes(), mu.options()) : empty(mu);
  o.grad_logvar = compute_grad ? at::empty(mu.sizes(), mu.options()) : empty(mu);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, recon.scalar_type(), "vae_rec", [&] {
    using A = Acc<scalar_t>::type;
    const scalar_t* xp = recon.data_ptr<scalar_t>();
    const scalar_t* tp = target.data_ptr<scalar_t>();
    scalar_t* gp = compute_grad ? o.grad_recon.data_ptr<scalar_t>() : nullptr;
    const A gfac = static_cast<A>(rec_fac * inv_n);
    o.rec = parallel_sum(recon.numel(), kElemGrain, [&](int64_t a, int64_t b) {
              return vae_rec(xp, tp, kind, gfac, gp, a, b);
            }) * inv_n;
  });
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, mu.scalar_type(), "vae_kl", [&] {
    using A = Acc<scalar_t>::type;
    const scalar_t* mp = mu.data_ptr<scalar_t>();
    const scalar_t* lp = logvar.data_ptr<scalar_t>();
    scalar_t* gm = compute_grad ? o.grad_mu.data_ptr<scalar_t>() : nullptr;
    scalar_t* gl = compute_grad ? o.grad_logvar.data_ptr<scalar_t>() : nullptr;
    const A gfac = static_cast<A>(kl_fac * inv_n);
    o.kl = parallel_sum(mu.numel(), kElemGrain, [&](int64_t a, int64_t b) {
             return vae_kl(mp, lp, gfac, gm, gl, a, b);
           }) * inv_n;
  });
  return o;
}

// Mean GAN loss over all elements (0 if empty) and gfac * its gradient.
static inline std::tuple<double, at::Tensor> adv_forward(const at::Tensor& logits_in, int64_t kind,
                                                         int64_t role, bool compute_grad,
                                                         double gfac, const char* who) {
  float_check(logits_in, who, "logits");
  TORCH_CHECK_VALUE(kind >= 0 && kind <= 2, who,
                    ": kind must be 0 (non_saturating), 1 (hinge) or 2 (least_squares), got ", kind);
  TORCH_CHECK_VALUE(role >= 0 && role <= 2, who, ": role must be 0 (d_real), 1 (d_fake) or 2 (g), got ",
                    role);
  const at::Tensor x = logits_in.contiguous();
  const double inv_m = 1.0 / static_cast<double>(std::max<int64_t>(1, x.numel()));
  at::Tensor grad = compute_grad ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  double loss = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "adv_loss", [&] {
    using A = Acc<scalar_t>::type;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* gp = compute_grad ? grad.data_ptr<scalar_t>() : nullptr;
    const A f = static_cast<A>(gfac * inv_m);
    loss = parallel_sum(x.numel(), kElemGrain, [&](int64_t a, int64_t b) {
             return adv(xp, kind, role, f, gp, a, b);
           }) * inv_m;
  });
  return {loss, grad};
}

}  // namespace mtcore
