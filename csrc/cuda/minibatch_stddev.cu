// Minibatch standard deviation layer (CUDA), StyleGAN2 discriminator (Karras et al. 2020).
//
// x [N, C, H, W], G = min(group_size, N), M = N / G, F = num_channels, K = (C / F) H W.
// Sample n = g M + m belongs to group column m. stat[m, f] = mean_k sqrt(var_g(x[gM+m, f, k]) + 1e-8)
// (population variance over g, k runs over the C/F channels of slot f and H, W: contiguous in memory).
// out = cat([x, stat[n % M, f] broadcast over H, W], dim 1).
// Backward: with d_g = x_g - mean_g x and s = sqrt(var + 1e-8),
// dx_g = dout[:, :C] + (sum_{g, h, w} dout[gM+m, C+f]) / (K s) * d_g / G
// (the mean's own term vanishes because sum_g d_g = 0).
// A channels-last x with F = 1 keeps its layout (as on the CPU): k then runs over a sample's
// values in memory order (pixel-major), which leaves the statistic's sum unchanged, and out and
// grad_out are channels-last too (C + 1 values per pixel).
#include "common.cuh"

namespace mtcore::cuda_impl {
namespace {

constexpr double kEps = 1e-8;

struct MbstdShape {
  int64_t N, C, HW, G, M, F, K;
  bool nhwc;  // channels-last x, out and grad_out (F == 1)
};

// Offset in out / grad_out ([N, C + F, H, W]) of value k (as x's k: k < K) of slot f of sample n.
__host__ __device__ __forceinline__ int64_t mbstd_out_offset(const MbstdShape& s, int64_t n, int64_t f,
                                                             int64_t k) {
  const int64_t ctot = s.C + s.F;
  if (s.nhwc) return (n * s.HW + k / s.C) * ctot + k % s.C;
  return n * ctot * s.HW + f * s.K + k;
}

// Blocks b = mf * splits + split: partial sums over a slice of k of sqrt(var_g + eps).
template <typename scalar_t, typename acc_t>
__global__ void mbstd_stat_partial_kernel(const scalar_t* __restrict__ x, MbstdShape s,
                                          int splits, acc_t* __restrict__ partials) {
  const int64_t mf = blockIdx.x / splits;
  const int split = blockIdx.x % splits;
  const int64_t m = mf / s.F;
  const int64_t f = mf % s.F;
  const acc_t inv_g = acc_t(1) / static_cast<acc_t>(s.G);
  acc_t local = 0;
  for (int64_t k = split * (int64_t)blockDim.x + threadIdx.x; k < s.K;
       k += (int64_t)splits * blockDim.x) {
    const scalar_t* p = x + m * s.C * s.HW + f * s.K + k;
    const int64_t step = s.M * s.C * s.HW;  // from sample g M + m to (g+1) M + m
    acc_t mean = 0;
    for (int64_t g = 0; g < s.G; ++g) mean += static_cast<acc_t>(p[g * step]);
    mean *= inv_g;
    acc_t var = 0;
    for (int64_t g = 0; g < s.G; ++g) {
      const acc_t d = static_cast<acc_t>(p[g * step]) - mean;
      var += d * d;
    }
    local += sqrt(var * inv_g + acc_t(kEps));
  }
  local = block_sum(local);
  if (threadIdx.x == 0) partials[blockIdx.x] = local;
}

// out[mf] = scale * sum of its `splits` partials.
template <typename acc_t>
__global__ void mbstd_reduce_splits_kernel(const acc_t* __restrict__ partials, int64_t n_mf,
                                           int splits, acc_t scale, acc_t* __restrict__ out) {
  for (int64_t mf = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; mf < n_mf;
       mf += (int64_t)gridDim.x * blockDim.x) {
    acc_t v = 0;
    for (int i = 0; i < splits; ++i) v += partials[mf * splits + i];
    out[mf] = v * scale;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void mbstd_output_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ stat,
                                    MbstdShape s, scalar_t* __restrict__ out) {
  const int64_t per_sample = (s.C + s.F) * s.HW;
  const int64_t total = s.N * per_sample;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t n = i / per_sample;
    const int64_t r = i - n * per_sample;
    if (s.nhwc) {  // pixel r / (C + 1), channel r % (C + 1); F == 1
      const int64_t pix = r / (s.C + 1);
      const int64_t ch = r - pix * (s.C + 1);
      out[i] = ch < s.C ? x[(n * s.HW + pix) * s.C + ch] : static_cast<scalar_t>(stat[n % s.M]);
      continue;
    }
    const int64_t ch = r / s.HW;
    out[i] = ch < s.C ? x[n * s.C * s.HW + r]
                      : static_cast<scalar_t>(stat[(n % s.M) * s.F + (ch - s.C)]);
  }
}

// Blocks b = mf * splits + split: partial sums of dout over the stat channel f of group column m.
template <typename scalar_t, typename acc_t>
__global__ void mbstd_gstat_partial_kernel(const scalar_t* __restrict__ dout, MbstdShape s,
                                           int splits, acc_t* __restrict__ partials) {
  const int64_t mf = blockIdx.x / splits;
  const int split = blockIdx.x % splits;
  const int64_t m = mf / s.F;
  const int64_t f = mf % s.F;
  const int64_t L = s.G * s.HW;
  acc_t local = 0;
  for (int64_t j = split * (int64_t)blockDim.x + threadIdx.x; j < L;
       j += (int64_t)splits * blockDim.x) {
    const int64_t g = j / s.HW;
    const int64_t hw = j - g * s.HW;
    const int64_t n = g * s.M + m;
    const int64_t o = s.nhwc ? (n * s.HW + hw) * (s.C + 1) + s.C : (n * (s.C + s.F) + s.C + f) * s.HW + hw;
    local += static_cast<acc_t>(dout[o]);
  }
  local = block_sum(local);
  if (threadIdx.x == 0) partials[blockIdx.x] = local;
}

// One thread per (m, f, k): recompute the group statistics and write dx for all G samples.
template <typename scalar_t, typename acc_t>
__global__ void mbstd_dx_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dout,
                                const acc_t* __restrict__ gstat, MbstdShape s,
                                scalar_t* __restrict__ dx) {
  const int64_t total = s.M * s.F * s.K;
  const acc_t inv_g = acc_t(1) / static_cast<acc_t>(s.G);
  const acc_t inv_k = acc_t(1) / static_cast<acc_t>(s.K);
  for (int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; t < total;
       t += (int64_t)gridDim.x * blockDim.x) {
    const int64_t mf = t / s.K;
    const int64_t k = t - mf * s.K;
    const int64_t m = mf / s.F;
    const int64_t f = mf % s.F;
    const int64_t x_off = m * s.C * s.HW + f * s.K + k;
    const int64_t x_step = s.M * s.C * s.HW;
    const int64_t o_off = mbstd_out_offset(s, m, f, k);
    const int64_t o_step = s.M * (s.C + s.F) * s.HW;
    acc_t mean = 0;
    for (int64_t g = 0; g < s.G; ++g) mean += static_cast<acc_t>(x[x_off + g * x_step]);
    mean *= inv_g;
    acc_t var = 0;
    for (int64_t g = 0; g < s.G; ++g) {
      const acc_t d = static_cast<acc_t>(x[x_off + g * x_step]) - mean;
      var += d * d;
    }
    const acc_t sd = sqrt(var * inv_g + acc_t(kEps));
    const acc_t c = gstat[mf] * inv_k / sd * inv_g;
    for (int64_t g = 0; g < s.G; ++g) {
      const acc_t d = static_cast<acc_t>(x[x_off + g * x_step]) - mean;
      dx[x_off + g * x_step] =
          static_cast<scalar_t>(static_cast<acc_t>(dout[o_off + g * o_step]) + c * d);
    }
  }
}

MbstdShape check_shape(const char* op, const at::Tensor& x, int64_t group_size,
                       int64_t num_channels, bool nhwc) {
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be [N, C, H, W], got x of shape ", x.sizes());
  TORCH_CHECK_VALUE(group_size >= 1, op, ": group_size must be an int >= 1, got ", group_size);
  TORCH_CHECK_VALUE(num_channels >= 1, op, ": num_channels must be an int >= 1, got ",
                    num_channels);
  const int64_t N = x.size(0);
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(N > 0, op, ": x has an empty batch (shape ", x.sizes(), ")");
  const int64_t G = std::min(group_size, N);
  TORCH_CHECK_VALUE(N % G == 0, op, ": the batch size N=", N, " of x (shape ", x.sizes(),
                    ") must be divisible by the group size G=min(group_size, N)=", G);
  TORCH_CHECK_VALUE(C % num_channels == 0, op, ": the channel count C=", C, " of x (shape ",
                    x.sizes(), ") must be divisible by num_channels=", num_channels);
  const int64_t HW = x.size(2) * x.size(3);
  return MbstdShape{N, C, HW, G, N / G, num_channels, (C / num_channels) * HW, nhwc};
}

// Whether x is kept channels-last: dense channels-last (and not also NCHW-contiguous), F == 1.
bool keeps_nhwc(const at::Tensor& x, int64_t num_channels) {
  return num_channels == 1 && x.dim() == 4 && !x.is_contiguous() &&
         x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

at::MemoryFormat layout(bool nhwc) {
  return nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// Splits of the k range per (m, f) so that the grid fills the device.
int splits_for(int64_t n_mf, int64_t work) {
  const int64_t want = std::max<int64_t>(1, max_blocks() / std::max<int64_t>(n_mf, 1));
  const int64_t useful = std::max<int64_t>(1, (work + kThreads - 1) / kThreads);
  return static_cast<int>(std::min<int64_t>(want, useful));
}

at::Tensor mbstd_fwd_cuda(const at::Tensor& x_in, int64_t group_size, int64_t num_channels) {
  constexpr const char* kOp = "mbstd_fwd";
  check_cuda(x_in, kOp, "x");
  check_float(x_in, kOp, "x");
  const bool nhwc = keeps_nhwc(x_in, num_channels);
  const at::Tensor x = x_in.contiguous(layout(nhwc));
  const MbstdShape s = check_shape(kOp, x, group_size, num_channels, nhwc);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({s.N, s.C + s.F, x.size(2), x.size(3)}, x.options().memory_format(layout(nhwc)));
  if (out.numel() == 0) return out;
  MTCORE_DISPATCH_FLOATS(x.scalar_type(), "mbstd_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_opts = acc_options<acc_t>(x);
    const cudaStream_t st = stream();
    const int64_t n_mf = s.M * s.F;
    at::Tensor stat = at::zeros({n_mf}, acc_opts);
    if (s.K > 0) {
      const int splits = splits_for(n_mf, s.K);
      at::Tensor partials = at::empty({n_mf * splits}, acc_opts);
      const auto grid = static_cast<unsigned int>(n_mf * splits);
      mbstd_stat_partial_kernel<scalar_t, acc_t><<<grid, kThreads, 0, st>>>(
          x.data_ptr<scalar_t>(), s, splits, partials.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      mbstd_reduce_splits_kernel<acc_t><<<num_blocks(n_mf), kThreads, 0, st>>>(
          partials.data_ptr<acc_t>(), n_mf, splits, acc_t(1) / static_cast<acc_t>(s.K),
          stat.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    mbstd_output_kernel<scalar_t, acc_t><<<num_blocks(out.numel()), kThreads, 0, st>>>(
        x.data_ptr<scalar_t>(), stat.data_ptr<acc_t>(), s, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor mbstd_bwd_cuda(const at::Tensor& grad_out_in, const at::Tensor& x_in,
                          int64_t group_size, int64_t num_channels) {
  constexpr const char* kOp = "mbstd_bwd";
  check_cuda(x_in, kOp, "x");
  check_float(x_in, kOp, "x");
  const bool nhwc = keeps_nhwc(x_in, num_channels);
  const at::Tensor x = x_in.contiguous(layout(nhwc));
  const MbstdShape s = check_shape(kOp, x, group_size, num_channels, nhwc);
  check_cuda(grad_out_in, kOp, "grad_out");
  check_same_device(grad_out_in, x, kOp, "grad_out", "x");
  TORCH_CHECK_TYPE(grad_out_in.scalar_type() == x.scalar_type(), kOp, ": grad_out has dtype ",
                   grad_out_in.scalar_type(), " but x has dtype ", x.scalar_type());
  TORCH_CHECK_VALUE(grad_out_in.dim() == 4 && grad_out_in.size(0) == s.N &&
                        grad_out_in.size(1) == s.C + s.F && grad_out_in.size(2) == x.size(2) &&
                        grad_out_in.size(3) == x.size(3),
                    kOp, ": grad_out must have shape [N, C + num_channels, H, W] = [", s.N, ", ",
                    s.C + s.F, ", ", x.size(2), ", ", x.size(3), "], got ", grad_out_in.sizes());
  const at::Tensor dout = grad_out_in.contiguous(layout(nhwc));
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(layout(nhwc)));
  if (x.numel() == 0) return dx;
  MTCORE_DISPATCH_FLOATS(x.scalar_type(), "mbstd_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_opts = acc_options<acc_t>(x);
    const cudaStream_t st = stream();
    const int64_t n_mf = s.M * s.F;
    const int splits = splits_for(n_mf, s.G * s.HW);
    at::Tensor partials = at::empty({n_mf * splits}, acc_opts);
    at::Tensor gstat = at::empty({n_mf}, acc_opts);
    const auto grid = static_cast<unsigned int>(n_mf * splits);
    mbstd_gstat_partial_kernel<scalar_t, acc_t><<<grid, kThreads, 0, st>>>(
        dout.data_ptr<scalar_t>(), s, splits, partials.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    mbstd_reduce_splits_kernel<acc_t><<<num_blocks(n_mf), kThreads, 0, st>>>(
        partials.data_ptr<acc_t>(), n_mf, splits, acc_t(1), gstat.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    mbstd_dx_kernel<scalar_t, acc_t><<<num_blocks(n_mf * s.K), kThreads, 0, st>>>(
        x.data_ptr<scalar_t>(), dout.data_ptr<scalar_t>(), gstat.data_ptr<acc_t>(), s,
        dx.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}

}  // namespace
}  // namespace mtcore::cuda_impl

TORCH_LIBRARY_IMPL(mtcore, CUDA, m) {
  m.impl("mbstd_fwd", &mtcore::cuda_impl::mbstd_fwd_cuda);
  m.impl("mbstd_bwd", &mtcore::cuda_impl::mbstd_bwd_cuda);
}
