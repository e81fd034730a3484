// Minibatch standard deviation layer (StyleGAN2 discriminator, Karras et al. 2020) on CPU.
//
// x [N, C, H, W], G = min(group_size, N), M = N / G, F = num_channels, c = C / F, K = c * H * W.
// Sample n = g * M + m belongs to group column m. Per (m, f) and per element k of its K features:
//   d_gk = x_gk - mean_g x_gk,  s_k = sqrt(mean_g d_gk^2 + 1e-8),  sigma_mf = mean_k s_k.
// Output: cat([x, sigma tiled to [N, F, H, W] (sample n takes column n % M)], dim 1).
// Backward: with S_mf = sum of grad_out over the F-channel f of the samples of column m and H, W,
//   dx_gk = grad_out_x_gk + S_mf / (K * G) * d_gk / s_k      (the mean's term vanishes: sum_g d_gk = 0).
//
// Channels-last x with F = 1 (the default) keeps its layout: a sample's K features are one
// contiguous block in either layout and sigma is their mean, so the statistics run on the raw
// memory as they are; only the output's interleaving (C values, then F, per pixel) differs.
// Returning NCHW there made the next convolution copy it back (and the backward copy its inputs).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

namespace mtcore {
namespace {

constexpr int64_t kChunk = 1024;  // features per task
constexpr double kEps = 1e-8;

struct Dims {
  int64_t N, C, H, W, G, M, F, c, HW, K, nchunks;
};

Dims check_mbstd(const char* op, const at::Tensor& x, int64_t group_size, int64_t num_channels) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": x must be a CPU tensor for the cpp backend, got one on ", x.device());
  auto st = x.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, op,
                   ": x must be float32, float64, bfloat16 or float16, got ", st);
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be [N, C, H, W], got shape ", x.sizes());
  TORCH_CHECK_VALUE(group_size >= 1, op, ": group_size must be >= 1, got ", group_size);
  TORCH_CHECK_VALUE(num_channels >= 1, op, ": num_channels must be >= 1, got ", num_channels);
  Dims d;
  d.N = x.size(0);
  d.C = x.size(1);
  d.H = x.size(2);
  d.W = x.size(3);
  TORCH_CHECK_VALUE(d.N >= 1, op, ": x has an empty batch (shape ", x.sizes(), ")");
  d.G = std::min(group_size, d.N);
  TORCH_CHECK_VALUE(d.N % d.G == 0, op, ": the batch size N=", d.N, " of x (shape ", x.sizes(),
                    ") must be divisible by the group size G=min(group_size, N)=", d.G);
  d.F = num_channels;
  TORCH_CHECK_VALUE(d.C % d.F == 0, op, ": the channel count C=", d.C, " of x (shape ", x.sizes(),
                    ") must be divisible by num_channels=", d.F);
  d.M = d.N / d.G;
  d.c = d.C / d.F;
  d.HW = d.H * d.W;
  d.K = d.c * d.HW;
  d.nchunks = std::max<int64_t>(1, (d.K + kChunk - 1) / kChunk);
  return d;
}

// Offset of feature k0 of sample n = g*M + m in channel group f of a [N, Ctot, H, W] tensor.
inline int64_t offset(const Dims& d, int64_t ctot, int64_t g, int64_t m, int64_t f, int64_t k0) {
  return ((g * d.M + m) * ctot + f * d.c) * d.HW + k0;
}

// Whether x is channels-last (and not also NCHW-contiguous) with F = 1: the layout kept as is.
bool pixel_major(const at::Tensor& x, const Dims& d) {
  return d.F == 1 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// mean[i] and inv_s[i] = 1 / s_k for the `len` features starting at k0 of column (m, f).
template <typename scalar_t, typename acc_t>
void group_stats(const Dims& d, const scalar_t* x, int64_t m, int64_t f, int64_t k0, int64_t len, acc_t* mean,
                 acc_t* s) {
  const acc_t inv_g = acc_t(1) / acc_t(d.G);
  std::fill(mean, mean + len, acc_t(0));
  for (int64_t g = 0; g < d.G; ++g) {
    const scalar_t* xp = x + offset(d, d.C, g, m, f, k0);
    for (int64_t i = 0; i < len; ++i) mean[i] += static_cast<acc_t>(xp[i]);
  }
  for (int64_t i = 0; i < len; ++i) mean[i] *= inv_g;
  std::fill(s, s + len, acc_t(0));
  for (int64_t g = 0; g < d.G; ++g) {
    const scalar_t* xp = x + offset(d, d.C, g, m, f, k0);
    for (int64_t i = 0; i < len; ++i) {
      acc_t v = static_cast<acc_t>(xp[i]) - mean[i];
      s[i] += v * v;
    }
  }
  for (int64_t i = 0; i < len; ++i) s[i] = std::sqrt(s[i] * inv_g + acc_t(kEps));
}

at::Tensor mbstd_fwd_cpu(const at::Tensor& x_in, int64_t group_size, int64_t num_channels) {
  const Dims d = check_mbstd("mbstd_fwd", x_in, group_size, num_channels);
  const bool nhwc = pixel_major(x_in, d);
  at::Tensor x = nhwc ? x_in : x_in.contiguous();
  at::Tensor out = at::empty({d.N, d.C + d.F, d.H, d.W},
                             x.options().memory_format(nhwc ? at::MemoryFormat::ChannelsLast
                                                            : at::MemoryFormat::Contiguous));
  const int64_t tasks = d.M * d.F * d.nchunks;
  std::vector<double> partial(tasks, 0.0);
  std::vector<double> sigma(d.M * d.F, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "mtcore_mbstd_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    if (d.K > 0) {
      at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> mean(kChunk), s(kChunk);
        for (int64_t t = begin; t < end; ++t) {
          const int64_t mf = t / d.nchunks, k0 = (t % d.nchunks) * kChunk;
          const int64_t len = std::min(kChunk, d.K - k0);
          group_stats<scalar_t, acc_t>(d, xp, mf / d.F, mf % d.F, k0, len, mean.data(), s.data());
          acc_t sum = 0;
          for (int64_t i = 0; i < len; ++i) sum += s[i];
          partial[t] = static_cast<double>(sum);
        }
      });
    }
    for (int64_t mf = 0; mf < d.M * d.F; ++mf) {
      double sum = 0;
      for (int64_t ch = 0; ch < d.nchunks; ++ch) sum += partial[mf * d.nchunks + ch];
      sigma[mf] = sum / static_cast<double>(d.K);  // K == 0 gives NaN, like the mean of nothing
    }
    const int64_t ctot = d.C + d.F;
    if (nhwc) {  // per pixel: its C values, then sigma (F == 1)
      const int64_t grain = std::max<int64_t>(1, 32768 / ctot);
      at::parallel_for(0, d.N * d.HW, grain, [&](int64_t begin, int64_t end) {
        for (int64_t pix = begin; pix < end; ++pix) {
          scalar_t* dst = op + pix * ctot;
          std::memcpy(dst, xp + pix * d.C, sizeof(scalar_t) * d.C);
          dst[d.C] = static_cast<scalar_t>(sigma[(pix / d.HW) % d.M]);
        }
      });
      return;
    }
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, d.HW));
    at::parallel_for(0, d.N * ctot, grain, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t n = plane / ctot, ch = plane % ctot;
        scalar_t* dst = op + plane * d.HW;
        if (ch < d.C) {
          std::memcpy(dst, xp + (n * d.C + ch) * d.HW, sizeof(scalar_t) * d.HW);
        } else {
          const scalar_t v = static_cast<scalar_t>(sigma[(n % d.M) * d.F + (ch - d.C)]);
          std::fill(dst, dst + d.HW, v);
        }
      }
    });
  });
  return out;
}

// mbstd_bwd for channels-last x with F = 1 (see the top): tasks take whole pixels (C features
// each), so grad_out's rows (C + 1 values per pixel) line up with x's.
at::Tensor mbstd_bwd_nhwc(const at::Tensor& grad_out_in, const at::Tensor& x, const Dims& d) {
  const int64_t ctot = d.C + 1;
  at::Tensor go = grad_out_in.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor dx = at::empty({d.N, d.C, d.H, d.W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const int64_t pix_per_task = std::max<int64_t>(1, kChunk / std::max<int64_t>(1, d.C));
  const int64_t chunks = (d.HW + pix_per_task - 1) / pix_per_task;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "mtcore_mbstd_bwd_nhwc", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = go.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    std::vector<double> S(d.M, 0.0);  // the gradient reaching sigma_m (the last channel's maps)
    for (int64_t pix = 0; pix < d.N * d.HW; ++pix) S[(pix / d.HW) % d.M] += static_cast<double>(gp[pix * ctot + d.C]);
    const double scale = d.K > 0 ? 1.0 / (static_cast<double>(d.K) * static_cast<double>(d.G)) : 0.0;
    at::parallel_for(0, d.M * chunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> mean(pix_per_task * d.C), s(pix_per_task * d.C);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t m = t / chunks, p0 = (t % chunks) * pix_per_task;
        const int64_t npix = std::min(pix_per_task, d.HW - p0), k0 = p0 * d.C, len = npix * d.C;
        group_stats<scalar_t, acc_t>(d, xp, m, 0, k0, len, mean.data(), s.data());
        const acc_t a = static_cast<acc_t>(S[m] * scale);
        for (int64_t i = 0; i < len; ++i) s[i] = a / s[i];  // s now holds A / s_k
        for (int64_t g = 0; g < d.G; ++g) {
          const int64_t n = g * d.M + m;
          const scalar_t* xr = xp + offset(d, d.C, g, m, 0, k0);
          scalar_t* dr = dxp + offset(d, d.C, g, m, 0, k0);
          for (int64_t p = 0; p < npix; ++p) {
            const scalar_t* gr = gp + (n * d.HW + p0 + p) * ctot;
            const int64_t i0 = p * d.C;
            for (int64_t ch = 0; ch < d.C; ++ch) {
              acc_t v = static_cast<acc_t>(gr[ch]) + (static_cast<acc_t>(xr[i0 + ch]) - mean[i0 + ch]) * s[i0 + ch];
              dr[i0 + ch] = static_cast<scalar_t>(v);
            }
          }
        }
      }
    });
  });
  return dx;
}

at::Tensor mbstd_bwd_cpu(const at::Tensor& grad_out_in, const at::Tensor& x_in, int64_t group_size,
                         int64_t num_channels) {
  const Dims d = check_mbstd("mbstd_bwd", x_in, group_size, num_channels);
  const int64_t ctot = d.C + d.F;
  TORCH_CHECK_VALUE(grad_out_in.dim() == 4 && grad_out_in.size(0) == d.N && grad_out_in.size(1) == ctot &&
                        grad_out_in.size(2) == d.H && grad_out_in.size(3) == d.W,
                    "mbstd_bwd: grad_out must have shape [N, C + num_channels, H, W] = [", d.N, ", ", ctot, ", ", d.H,
                    ", ", d.W, "], got ", grad_out_in.sizes());
  TORCH_CHECK_TYPE(grad_out_in.scalar_type() == x_in.scalar_type(), "mbstd_bwd: grad_out has dtype ",
                   grad_out_in.scalar_type(), " but x has dtype ", x_in.scalar_type());
  TORCH_CHECK_VALUE(grad_out_in.device() == x_in.device(), "mbstd_bwd: grad_out is on ", grad_out_in.device(),
                    " but x is on ", x_in.device());
  if (pixel_major(x_in, d)) return mbstd_bwd_nhwc(grad_out_in, x_in, d);
  at::Tensor x = x_in.contiguous();
  at::Tensor go = grad_out_in.contiguous();
  at::Tensor dx = at::empty({d.N, d.C, d.H, d.W}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "mtcore_mbstd_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = go.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    // S_mf: the gradient reaching sigma_mf, summed over the G samples of column m and over H, W.
    std::vector<double> S(d.M * d.F, 0.0);
    for (int64_t n = 0; n < d.N; ++n) {
      for (int64_t f = 0; f < d.F; ++f) {
        const scalar_t* p = gp + (n * ctot + d.C + f) * d.HW;
        double sum = 0;
        for (int64_t i = 0; i < d.HW; ++i) sum += static_cast<double>(p[i]);
        S[(n % d.M) * d.F + f] += sum;
      }
    }
    const int64_t tasks = d.M * d.F * d.nchunks;
    const double scale = d.K > 0 ? 1.0 / (static_cast<double>(d.K) * static_cast<double>(d.G)) : 0.0;
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> mean(kChunk), s(kChunk);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t mf = t / d.nchunks, k0 = (t % d.nchunks) * kChunk;
        const int64_t len = std::min(kChunk, d.K - k0);
        if (len <= 0) continue;
        const int64_t m = mf / d.F, f = mf % d.F;
        group_stats<scalar_t, acc_t>(d, xp, m, f, k0, len, mean.data(), s.data());
        const acc_t a = static_cast<acc_t>(S[mf] * scale);
        for (int64_t i = 0; i < len; ++i) s[i] = a / s[i];  // s now holds A / s_k
        for (int64_t g = 0; g < d.G; ++g) {
          const scalar_t* xr = xp + offset(d, d.C, g, m, f, k0);
          const scalar_t* gr = gp + offset(d, ctot, g, m, f, k0);
          scalar_t* dr = dxp + offset(d, d.C, g, m, f, k0);
          for (int64_t i = 0; i < len; ++i) {
            acc_t v = static_cast<acc_t>(gr[i]) + (static_cast<acc_t>(xr[i]) - mean[i]) * s[i];
            dr[i] = static_cast<scalar_t>(v);
          }
        }
      }
    });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mtcore, m) {
  m.def("mbstd_fwd(Tensor x, int group_size, int num_channels) -> Tensor");
  m.def("mbstd_bwd(Tensor grad_out, Tensor x, int group_size, int num_channels) -> Tensor");
}

TORCH_LIBRARY_IMPL(mtcore, CPU, m) {
  m.impl("mbstd_fwd", &mbstd_fwd_cpu);
  m.impl("mbstd_bwd", &mbstd_bwd_cpu);
}

}  // namespace mtcore
