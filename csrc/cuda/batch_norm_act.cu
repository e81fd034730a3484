// Fused BatchNorm + activation (linear, relu, lrelu) on CUDA; csrc/cpu/batch_norm_act.cpp has the
// math. x is walked as [outer, C, inner] (channels-last: inner = 1; NCHW: inner = H*W); value j
// of channel c (j < M = outer * inner) sits at ((j / inner) * C + c) * inner + j % inner.
// Training statistics: per-channel moments about the channel's first value, in (channel, split)
// partials that a second kernel adds in a fixed order (deterministic, no host sync). NCHW: a block
// per (channel, split) walks the channel's planes. Channels-last (inner = 1, also [N, C]): a block
// per (32-channel tile, split), neighbouring threads on neighbouring channels of a row, so every
// warp reads contiguous memory. The backward's sums take the same route; the elementwise passes
// are grid-stride loops.
#include "common.cuh"

namespace mtcore::cuda_impl {
namespace {

struct BnShape {
  int64_t outer, C, inner, M;
};

__host__ __device__ __forceinline__ int64_t bn_offset(const BnShape& s, int64_t c, int64_t j) {
  return ((j / s.inner) * s.C + c) * s.inner + j % s.inner;
}

// Block (c, split): sums of a = d, b = d^2 (MOMENTS: d = x - x[c, 0]) or of a = g, b = g (x - mean)
// (the backward: g = dy act'(pre)) over the split's values of channel c.
template <bool MOMENTS, typename scalar_t, typename acc_t>
__global__ void bn_partial_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                                  const acc_t* __restrict__ coef, BnShape s, int splits, acc_t neg,
                                  acc_t* __restrict__ pa, acc_t* __restrict__ pb) {
  const int64_t c = blockIdx.x / splits;
  const int split = blockIdx.x % splits;
  acc_t sa = 0, sb = 0;
  if (MOMENTS) {
    const acc_t shift = static_cast<acc_t>(x[bn_offset(s, c, 0)]);
    for (int64_t j = split * (int64_t)blockDim.x + threadIdx.x; j < s.M; j += (int64_t)splits * blockDim.x) {
      const acc_t d = static_cast<acc_t>(x[bn_offset(s, c, j)]) - shift;
      sa += d;
      sb += d * d;
    }
  } else {
    const acc_t scale = coef[c], shift = coef[s.C + c], mean = coef[2 * s.C + c];
    for (int64_t j = split * (int64_t)blockDim.x + threadIdx.x; j < s.M; j += (int64_t)splits * blockDim.x) {
      const int64_t o = bn_offset(s, c, j);
      const acc_t xv = static_cast<acc_t>(x[o]);
      const acc_t g = static_cast<acc_t>(dy[o]) * norm_act_slope(xv * scale + shift, neg);
      sa += g;
      sb += g * (xv - mean);
    }
  }
  sa = block_sum(sa);
  sb = block_sum(sb);
  if (threadIdx.x == 0) {
    pa[blockIdx.x] = sa;
    pb[blockIdx.x] = sb;
  }
}

// Channels-last tile: kTileC channels x kTileRows row lanes per block of kThreads threads.
constexpr int kTileC = 32;
constexpr int kTileRows = kThreads / kTileC;

// As bn_partial_kernel for inner == 1 (value j of channel c at j * C + c). Block b = tile *
// splits + split; thread (row lane r, channel lane l) sums rows split * kTileRows + r, stepping
// splits * kTileRows; the block's row lanes are then added in shared memory, in order.
template <bool MOMENTS, typename scalar_t, typename acc_t>
__global__ void bn_partial_nhwc_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                                       const acc_t* __restrict__ coef, BnShape s, int splits, acc_t neg,
                                       acc_t* __restrict__ pa, acc_t* __restrict__ pb) {
  __shared__ acc_t sha[kTileRows][kTileC];
  __shared__ acc_t shb[kTileRows][kTileC];
  const int lane = threadIdx.x % kTileC;
  const int row = threadIdx.x / kTileC;
  const int split = blockIdx.x % splits;
  const int64_t c = (blockIdx.x / splits) * (int64_t)kTileC + lane;
  const int64_t step = (int64_t)splits * kTileRows;
  acc_t sa = 0, sb = 0;
  if (c < s.C) {
    if (MOMENTS) {
      const acc_t shift = static_cast<acc_t>(x[c]);
      for (int64_t j = (int64_t)split * kTileRows + row; j < s.M; j += step) {
        const acc_t d = static_cast<acc_t>(x[j * s.C + c]) - shift;
        sa += d;
        sb += d * d;
      }
    } else {
      const acc_t scale = coef[c], shift = coef[s.C + c], mean = coef[2 * s.C + c];
      for (int64_t j = (int64_t)split * kTileRows + row; j < s.M; j += step) {
        const int64_t o = j * s.C + c;
        const acc_t xv = static_cast<acc_t>(x[o]);
        const acc_t g = static_cast<acc_t>(dy[o]) * norm_act_slope(xv * scale + shift, neg);
        sa += g;
        sb += g * (xv - mean);
      }
    }
  }
  sha[row][lane] = sa;
  shb[row][lane] = sb;
  __syncthreads();
  if (row == 0 && c < s.C) {
    for (int r = 1; r < kTileRows; ++r) {
      sa += sha[r][lane];
      sb += shb[r][lane];
    }
    pa[c * splits + split] = sa;
    pb[c * splits + split] = sb;
  }
}

// A channel's partials, added in order (one thread per channel in the kernels below, which loop
// over the grid: num_blocks caps it, and C may exceed the threads of a capped grid).
template <typename acc_t>
__device__ __forceinline__ void bn_reduce(const acc_t* pa, const acc_t* pb, int64_t c, int splits, acc_t& a,
                                          acc_t& b) {
  a = 0;
  b = 0;
  for (int k = 0; k < splits; ++k) {
    a += pa[c * splits + k];
    b += pb[c * splits + k];
  }
}

// Training: mean, var from the moments; eval: the running statistics. Then coef = [scale, shift,
// mean] per channel, and the statistics handed back.
template <typename scalar_t, typename acc_t, typename param_t>
__global__ void bn_coef_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ pa,
                               const acc_t* __restrict__ pb, int splits, const param_t* __restrict__ rm,
                               const param_t* __restrict__ rv, const param_t* __restrict__ w,
                               const param_t* __restrict__ b, BnShape s, acc_t eps, acc_t* __restrict__ coef,
                               acc_t* __restrict__ mean_out, acc_t* __restrict__ var_out) {
  for (int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; c < s.C;
       c += (int64_t)gridDim.x * blockDim.x) {
    acc_t mean, var;
    if (pa != nullptr) {
      acc_t s1, s2;
      bn_reduce(pa, pb, c, splits, s1, s2);
      const acc_t d1 = s1 / static_cast<acc_t>(s.M);
      mean = static_cast<acc_t>(x[bn_offset(s, c, 0)]) + d1;
      var = s2 / static_cast<acc_t>(s.M) - d1 * d1;
      var = var > acc_t(0) ? var : acc_t(0);
    } else {
      mean = static_cast<acc_t>(rm[c]);
      var = static_cast<acc_t>(rv[c]);
    }
    const acc_t scale = (w ? static_cast<acc_t>(w[c]) : acc_t(1)) / sqrt(var + eps);
    coef[c] = scale;
    coef[s.C + c] = (b ? static_cast<acc_t>(b[c]) : acc_t(0)) - mean * scale;
    coef[2 * s.C + c] = mean;
    mean_out[c] = mean;
    var_out[c] = var;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void bn_apply_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ coef, BnShape s,
                                acc_t neg, int64_t n, scalar_t* __restrict__ y) {
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t c = (e / s.inner) % s.C;
    const acc_t pre = static_cast<acc_t>(x[e]) * coef[c] + coef[s.C + c];
    y[e] = static_cast<scalar_t>(pre * norm_act_slope(pre, neg));
  }
}

// Backward coefficients: km = sum g / M, kx = invstd^2 sum g (x - mean) / M (training only), and
// dw = invstd sum g (x - mean), db = sum g.
template <typename acc_t, typename param_t>
__global__ void bn_bwd_coef_kernel(const acc_t* __restrict__ pa, const acc_t* __restrict__ pb, int splits,
                                   const acc_t* __restrict__ var, BnShape s, acc_t eps, bool training,
                                   acc_t* __restrict__ k, param_t* __restrict__ dw, param_t* __restrict__ db) {
  for (int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; c < s.C;
       c += (int64_t)gridDim.x * blockDim.x) {
    acc_t sg, sgx;
    bn_reduce(pa, pb, c, splits, sg, sgx);
    const acc_t invstd = acc_t(1) / sqrt(var[c] + eps);
    const acc_t m = static_cast<acc_t>(s.M);
    k[c] = training ? sg / m : acc_t(0);
    k[s.C + c] = training ? sgx / m * invstd * invstd : acc_t(0);
    dw[c] = static_cast<param_t>(sgx * invstd);
    db[c] = static_cast<param_t>(sg);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void bn_dx_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy,
                             const acc_t* __restrict__ coef, const acc_t* __restrict__ k, BnShape s, acc_t neg,
                             int64_t n, scalar_t* __restrict__ dx) {
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t c = (e / s.inner) % s.C;
    const acc_t scale = coef[c], xv = static_cast<acc_t>(x[e]);
    const acc_t g = static_cast<acc_t>(dy[e]) * norm_act_slope(xv * scale + coef[s.C + c], neg);
    dx[e] = static_cast<scalar_t>(scale * (g - k[c] - (xv - coef[2 * s.C + c]) * k[s.C + c]));
  }
}

bool bn_nhwc(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

BnShape bn_shape(const at::Tensor& x) {
  BnShape s;
  s.C = x.size(1);
  const int64_t per_sample = x.size(0) == 0 ? 0 : x.numel() / x.size(0);
  if (bn_nhwc(x)) {
    s.inner = 1;
    s.outer = x.numel() / std::max<int64_t>(1, s.C);
  } else {
    s.inner = s.C == 0 ? 0 : per_sample / s.C;
    s.outer = x.size(0);
  }
  s.M = s.outer * s.inner;
  return s;
}

// A per-channel vector as a contiguous tensor of `dtype` on x's device (undefined if absent).
at::Tensor channel_vec(const c10::optional<at::Tensor>& t, const at::Tensor& x, const char* op, const char* name,
                       at::ScalarType dtype) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  check_same_device(*t, x, op, name, "x");
  check_float(*t, op, name);
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == x.size(1), op, ": ", name, " must have shape [", x.size(1),
                    "] (one value per channel of x), got ", t->sizes());
  return t->to(dtype).contiguous();
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// Blocks per channel (NCHW) or per channel tile (channels-last) so that the grid fills the device.
int bn_splits(const BnShape& s) {
  const bool tiled = s.inner == 1;
  const int64_t units = tiled ? (s.C + kTileC - 1) / kTileC : s.C;
  const int64_t per_block = tiled ? kTileRows : kThreads;
  const int64_t want = std::max<int64_t>(1, max_blocks() / std::max<int64_t>(units, 1));
  const int64_t useful = std::max<int64_t>(1, (s.M + per_block - 1) / per_block);
  return static_cast<int>(std::min<int64_t>(want, useful));
}

// Launches the partial sums (MOMENTS: the forward's; else the backward's) into pa, pb of
// C * splits values each; returns splits.
template <bool MOMENTS, typename scalar_t, typename acc_t>
int bn_partials(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& coef, const BnShape& s, acc_t neg,
                at::Tensor& pa, at::Tensor& pb) {
  const int splits = bn_splits(s);
  pa = at::empty({s.C * splits}, acc_options<acc_t>(x));
  pb = at::empty({s.C * splits}, acc_options<acc_t>(x));
  const scalar_t* dyp = MOMENTS ? nullptr : dy.data_ptr<scalar_t>();
  const acc_t* cp = MOMENTS ? nullptr : coef.data_ptr<acc_t>();
  if (s.inner == 1) {
    const auto grid = static_cast<unsigned int>((s.C + kTileC - 1) / kTileC * splits);
    bn_partial_nhwc_kernel<MOMENTS, scalar_t, acc_t><<<grid, kThreads, 0, stream()>>>(
        x.data_ptr<scalar_t>(), dyp, cp, s, splits, neg, pa.data_ptr<acc_t>(), pb.data_ptr<acc_t>());
  } else {
    bn_partial_kernel<MOMENTS, scalar_t, acc_t><<<static_cast<unsigned int>(s.C * splits), kThreads, 0, stream()>>>(
        x.data_ptr<scalar_t>(), dyp, cp, s, splits, neg, pa.data_ptr<acc_t>(), pb.data_ptr<acc_t>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return splits;
}

at::ScalarType stat_dtype(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_fwd_cuda(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var, double eps,
    int64_t act, double alpha) {
  constexpr const char* kOp = "batch_norm_act";
  check_norm_act_input(kOp, x_in, "x", act, alpha, eps);
  const auto sd = stat_dtype(x_in);
  const at::Tensor w = channel_vec(weight, x_in, kOp, "weight", sd);
  const at::Tensor b = channel_vec(bias, x_in, kOp, "bias", sd);
  const at::Tensor rm = channel_vec(running_mean, x_in, kOp, "running_mean", sd);
  const at::Tensor rv = channel_vec(running_var, x_in, kOp, "running_var", sd);
  TORCH_CHECK_VALUE(rm.defined() == rv.defined(), kOp,
                    ": give both running_mean and running_var (eval) or neither (training)");
  const bool training = !rm.defined();
  const at::Tensor x = bn_nhwc(x_in) ? x_in : x_in.contiguous();
  const BnShape s = bn_shape(x);
  TORCH_CHECK_VALUE(!training || s.M > 1, kOp, ": training statistics need more than one value per channel, got x "
                    "of shape ", x.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  at::Tensor mean_out = at::empty({s.C}, x.options().dtype(sd)), var_out = at::empty({s.C}, x.options().dtype(sd));
  if (s.C == 0) return {y, mean_out, var_out};
  MTCORE_DISPATCH_FLOATS(x.scalar_type(), "bn_act_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const cudaStream_t st = stream();
    const acc_t neg = norm_act_neg<acc_t>(act, alpha);
    at::Tensor coef = at::empty({3 * s.C}, acc_options<acc_t>(x));
    at::Tensor pa, pb;
    int splits = 1;
    if (training) splits = bn_partials<true, scalar_t, acc_t>(x, at::Tensor(), at::Tensor(), s, neg, pa, pb);
    bn_coef_kernel<scalar_t, acc_t, acc_t><<<num_blocks(s.C), kThreads, 0, st>>>(
        x.data_ptr<scalar_t>(), ptr_or_null<acc_t>(pa), ptr_or_null<acc_t>(pb), splits, ptr_or_null<acc_t>(rm),
        ptr_or_null<acc_t>(rv), ptr_or_null<acc_t>(w), ptr_or_null<acc_t>(b), s, static_cast<acc_t>(eps),
        coef.data_ptr<acc_t>(), mean_out.data_ptr<acc_t>(), var_out.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (x.numel() > 0) {
      bn_apply_kernel<scalar_t, acc_t><<<num_blocks(x.numel()), kThreads, 0, st>>>(
          x.data_ptr<scalar_t>(), coef.data_ptr<acc_t>(), s, neg, x.numel(), y.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {y, mean_out, var_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_bwd_cuda(
    const at::Tensor& dy_in, const at::Tensor& x_in, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& mean_in, const at::Tensor& var_in, double eps,
    int64_t act, double alpha, bool training) {
  constexpr const char* kOp = "batch_norm_act backward";
  check_norm_act_input(kOp, x_in, "x", act, alpha, eps);
  check_norm_act_input(kOp, dy_in, "dy", act, alpha, eps);
  TORCH_CHECK_VALUE(dy_in.sizes() == x_in.sizes(), kOp, ": dy has shape ", dy_in.sizes(), " but x has shape ",
                    x_in.sizes());
  check_same_device(dy_in, x_in, kOp, "dy", "x");
  const auto sd = stat_dtype(x_in);
  const at::Tensor w = channel_vec(weight, x_in, kOp, "weight", sd);
  const at::Tensor b = channel_vec(bias, x_in, kOp, "bias", sd);
  const at::Tensor mean = channel_vec(mean_in, x_in, kOp, "mean", sd);
  const at::Tensor var = channel_vec(var_in, x_in, kOp, "var", sd);
  const bool nhwc = bn_nhwc(x_in);
  const auto fmt = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor dy = dy_in.to(x.scalar_type()).contiguous(fmt);
  const BnShape s = bn_shape(x);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty_like(x);
  const auto pt = weight.has_value() && weight->defined() ? weight->scalar_type() : sd;
  at::Tensor dw = at::empty({s.C}, x.options().dtype(sd)), db = at::empty({s.C}, x.options().dtype(sd));
  if (s.C > 0) {
    MTCORE_DISPATCH_FLOATS(x.scalar_type(), "bn_act_bwd_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const cudaStream_t st = stream();
      const acc_t neg = norm_act_neg<acc_t>(act, alpha);
      at::Tensor coef = at::empty({3 * s.C}, acc_options<acc_t>(x));
      at::Tensor stat_m = at::empty({s.C}, acc_options<acc_t>(x)), stat_v = at::empty({s.C}, acc_options<acc_t>(x));
      bn_coef_kernel<scalar_t, acc_t, acc_t><<<num_blocks(s.C), kThreads, 0, st>>>(
          x.data_ptr<scalar_t>(), nullptr, nullptr, 1, mean.data_ptr<acc_t>(), var.data_ptr<acc_t>(),
          ptr_or_null<acc_t>(w), ptr_or_null<acc_t>(b), s, static_cast<acc_t>(eps), coef.data_ptr<acc_t>(),
          stat_m.data_ptr<acc_t>(), stat_v.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      at::Tensor pa, pb;
      const int splits = bn_partials<false, scalar_t, acc_t>(x, dy, coef, s, neg, pa, pb);
      at::Tensor k = at::empty({2 * s.C}, acc_options<acc_t>(x));
      bn_bwd_coef_kernel<acc_t, acc_t><<<num_blocks(s.C), kThreads, 0, st>>>(
          pa.data_ptr<acc_t>(), pb.data_ptr<acc_t>(), splits, var.data_ptr<acc_t>(), s, static_cast<acc_t>(eps),
          training, k.data_ptr<acc_t>(), dw.data_ptr<acc_t>(), db.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (x.numel() > 0) {
        bn_dx_kernel<scalar_t, acc_t><<<num_blocks(x.numel()), kThreads, 0, st>>>(
            x.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(), coef.data_ptr<acc_t>(), k.data_ptr<acc_t>(), s, neg,
            x.numel(), dx.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
  return {dx, dw.to(pt), db.to(pt)};
}

}  // namespace
}  // namespace mtcore::cuda_impl

TORCH_LIBRARY_IMPL(mtcore, CUDA, m) {
  m.impl("bn_act_fwd", &mtcore::cuda_impl::bn_act_fwd_cuda);
  m.impl("bn_act_bwd", &mtcore::cuda_impl::bn_act_bwd_cuda);
}
