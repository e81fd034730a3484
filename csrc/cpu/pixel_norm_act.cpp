// Pixel normalisation + activation (linear, relu, lrelu) on CPU: the GAN generator's
// "normalise each pixel's feature vector to unit RMS, then leaky ReLU" (Karras et al. 2018).
//
// Per pixel p (n, h, w) with C channels: r_p = 1 / sqrt(sum_c x_pc^2 / C + eps), u = x r,
// y = act(u). Backward, with g = dy * act'(u) (act' from the sign of x, since r > 0):
//   dx_c = r g_c - r^3 x_c / C * sum_c' g_c' x_c'
// x is walked as [outer, C, inner] in memory order: channels-last (N*H*W, C, 1), each pixel's C
// values contiguous; NCHW-contiguous (N, C, H*W), a plane per channel, summed across planes.
// One pass forward and one backward (r recomputed from x), where the eager composite
// (pow, mean, add, rsqrt, mul, leaky_relu and their backwards) makes about a dozen.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"
#include "norm_act.h"

namespace mtcore {
namespace {

using norm_act::neg_slope;
using norm_act::slope;

// One pixel (C values `stride` apart). FWD: y = act(x r); else dx from dy.
template <bool FWD, typename T, typename A>
MT_AI void pixel(const T* __restrict x, const T* __restrict dy, T* __restrict out, int64_t C, int64_t stride,
                 A eps, A neg) {
  A ss = 0;
  for (int64_t c = 0; c < C; ++c) {
    const A v = static_cast<A>(x[c * stride]);
    ss += v * v;
  }
  const A r = A(1) / std::sqrt(ss / A(C) + eps);
  if constexpr (FWD) {
    for (int64_t c = 0; c < C; ++c) {
      const A u = static_cast<A>(x[c * stride]) * r;
      out[c * stride] = static_cast<T>(u * slope(u, neg));
    }
  } else {
    A gx = 0;
    for (int64_t c = 0; c < C; ++c) {
      const A v = static_cast<A>(x[c * stride]);
      gx += static_cast<A>(dy[c * stride]) * slope(v, neg) * v;
    }
    const A k = r * r * r * gx / A(C);
    for (int64_t c = 0; c < C; ++c) {
      const A v = static_cast<A>(x[c * stride]);
      out[c * stride] = static_cast<T>(r * static_cast<A>(dy[c * stride]) * slope(v, neg) - k * v);
    }
  }
}

// A plane block of an NCHW tensor: `len` pixels starting at column i0 of sample n (vectorised
// across pixels; per-pixel sums in `acc`).
template <bool FWD, typename T, typename A>
void plane_block(const T* x, const T* dy, T* out, int64_t C, int64_t S, int64_t len, A eps, A neg, A* ss, A* gx) {
  std::fill(ss, ss + len, A(0));
  for (int64_t c = 0; c < C; ++c) {
    const T* __restrict xc = x + c * S;
    for (int64_t i = 0; i < len; ++i) ss[i] += static_cast<A>(xc[i]) * static_cast<A>(xc[i]);
  }
  for (int64_t i = 0; i < len; ++i) ss[i] = A(1) / std::sqrt(ss[i] / A(C) + eps);  // r
  if constexpr (FWD) {
    for (int64_t c = 0; c < C; ++c) {
      const T* __restrict xc = x + c * S;
      T* __restrict oc = out + c * S;
      for (int64_t i = 0; i < len; ++i) {
        const A u = static_cast<A>(xc[i]) * ss[i];
        oc[i] = static_cast<T>(u * slope(u, neg));
      }
    }
  } else {
    std::fill(gx, gx + len, A(0));
    for (int64_t c = 0; c < C; ++c) {
      const T* __restrict xc = x + c * S;
      const T* __restrict gc = dy + c * S;
      for (int64_t i = 0; i < len; ++i) {
        const A v = static_cast<A>(xc[i]);
        gx[i] += static_cast<A>(gc[i]) * slope(v, neg) * v;
      }
    }
    for (int64_t i = 0; i < len; ++i) gx[i] *= ss[i] * ss[i] * ss[i] / A(C);  // k
    for (int64_t c = 0; c < C; ++c) {
      const T* __restrict xc = x + c * S;
      const T* __restrict gc = dy + c * S;
      T* __restrict oc = out + c * S;
      for (int64_t i = 0; i < len; ++i) {
        const A v = static_cast<A>(xc[i]);
        oc[i] = static_cast<T>(ss[i] * static_cast<A>(gc[i]) * slope(v, neg) - gx[i] * v);
      }
    }
  }
}

template <bool FWD>
at::Tensor run(const at::Tensor& x_in, const at::Tensor* dy_in, double eps, int64_t act, double alpha) {
  const bool cl = norm_act::is_nhwc(x_in);
  const at::MemoryFormat fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = x_in.contiguous(fmt);
  at::Tensor dy;
  if (!FWD) dy = (dy_in->scalar_type() == x.scalar_type() ? *dy_in : dy_in->to(x.scalar_type())).contiguous(fmt);
  at::Tensor out = at::empty_like(x, x.options().memory_format(fmt));
  const int64_t C = x.size(1), N = x.size(0);
  if (x.numel() == 0) return out;
  const int64_t S = x.numel() / (N * C);  // pixels per sample
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "mtcore_pixel_norm_act", [&] {
    using A = typename Acc<scalar_t>::type;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = FWD ? nullptr : dy.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const A e = static_cast<A>(eps), neg = neg_slope<A>(act, alpha);
    if (cl || S == 1) {  // pixels of C contiguous values
      at::parallel_for(0, N * S, std::max<int64_t>(1, 16384 / C), [&](int64_t b, int64_t end) {
        for (int64_t p = b; p < end; ++p)
          pixel<FWD, scalar_t, A>(xp + p * C, FWD ? nullptr : gp + p * C, op + p * C, C, 1, e, neg);
      });
    } else {
      constexpr int64_t kBlock = 256;
      const int64_t blocks = (S + kBlock - 1) / kBlock;
      at::parallel_for(0, N * blocks, 1, [&](int64_t b, int64_t end) {
        std::vector<A> ss(kBlock), gx(kBlock);
        for (int64_t t = b; t < end; ++t) {
          const int64_t n = t / blocks, i0 = (t % blocks) * kBlock, len = std::min(kBlock, S - i0);
          const int64_t off = n * C * S + i0;
          plane_block<FWD, scalar_t, A>(xp + off, FWD ? nullptr : gp + off, op + off, C, S, len, e, neg, ss.data(),
                                        gx.data());
        }
      });
    }
  });
  return out;
}

at::Tensor pn_act_fwd_cpu(const at::Tensor& x, double eps, int64_t act, double alpha) {
  norm_act::check_input("pixel_norm_act", x, "x", act, alpha, eps);
  return run<true>(x, nullptr, eps, act, alpha);
}

at::Tensor pn_act_bwd_cpu(const at::Tensor& dy, const at::Tensor& x, double eps, int64_t act, double alpha) {
  norm_act::check_input("pixel_norm_act backward", x, "x", act, alpha, eps);
  norm_act::check_input("pixel_norm_act backward", dy, "dy", act, alpha, eps);
  TORCH_CHECK_VALUE(dy.sizes() == x.sizes(), "pixel_norm_act backward: dy has shape ", dy.sizes(), " but x has shape ",
                    x.sizes());
  return run<false>(x, &dy, eps, act, alpha);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mtcore, m) {
  m.def("pn_act_fwd(Tensor x, float eps, int act, float alpha) -> Tensor");
  m.def("pn_act_bwd(Tensor dy, Tensor x, float eps, int act, float alpha) -> Tensor");
}

TORCH_LIBRARY_IMPL(mtcore, CPU, m) {
  m.impl("pn_act_fwd", &pn_act_fwd_cpu);
  m.impl("pn_act_bwd", &pn_act_bwd_cpu);
}

}  // namespace mtcore
