// Pixel norm + activation (linear, relu, lrelu) on CUDA; csrc/cpu/pixel_norm_act.cpp has the math.
// One thread per pixel (n, spatial position): its C values lie `stride` apart (channels-last: 1,
// consecutive threads on consecutive pixels' blocks; NCHW: H*W, consecutive threads on consecutive
// positions, so each channel's loads coalesce).
#include "common.cuh"

namespace mtcore::cuda_impl {
namespace {

// Pixel p of N * S: base offset and channel stride in either layout.
__device__ __forceinline__ int64_t pn_base(int64_t p, int64_t C, int64_t S, bool nhwc) {
  return nhwc ? p * C : (p / S) * C * S + p % S;
}

template <bool FWD, typename scalar_t, typename acc_t>
__global__ void pn_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ dy, int64_t pixels,
                          int64_t C, int64_t S, bool nhwc, acc_t eps, acc_t neg, scalar_t* __restrict__ out) {
  const int64_t stride = nhwc ? 1 : S;
  for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < pixels;
       p += (int64_t)gridDim.x * blockDim.x) {
    const int64_t base = pn_base(p, C, S, nhwc);
    acc_t ss = 0;
    for (int64_t c = 0; c < C; ++c) {
      const acc_t v = static_cast<acc_t>(x[base + c * stride]);
      ss += v * v;
    }
    const acc_t r = rsqrt(ss / static_cast<acc_t>(C) + eps);
    if (FWD) {
      for (int64_t c = 0; c < C; ++c) {
        const acc_t u = static_cast<acc_t>(x[base + c * stride]) * r;
        out[base + c * stride] = static_cast<scalar_t>(u * norm_act_slope(u, neg));
      }
    } else {
      acc_t gx = 0;
      for (int64_t c = 0; c < C; ++c) {
        const acc_t v = static_cast<acc_t>(x[base + c * stride]);
        gx += static_cast<acc_t>(dy[base + c * stride]) * norm_act_slope(v, neg) * v;
      }
      const acc_t k = r * r * r * gx / static_cast<acc_t>(C);
      for (int64_t c = 0; c < C; ++c) {
        const int64_t o = base + c * stride;
        const acc_t v = static_cast<acc_t>(x[o]);
        out[o] = static_cast<scalar_t>(r * static_cast<acc_t>(dy[o]) * norm_act_slope(v, neg) - k * v);
      }
    }
  }
}

template <bool FWD>
at::Tensor pn_run(const at::Tensor& x_in, const at::Tensor* dy_in, double eps, int64_t act, double alpha) {
  const bool nhwc = x_in.dim() == 4 && !x_in.is_contiguous() && x_in.is_contiguous(at::MemoryFormat::ChannelsLast);
  const auto fmt = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor x = x_in.contiguous(fmt);
  at::Tensor dy;
  if (!FWD) dy = dy_in->to(x.scalar_type()).contiguous(fmt);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  const int64_t N = x.size(0), C = x.size(1);
  if (x.numel() == 0) return out;
  const int64_t S = x.numel() / (N * C);
  MTCORE_DISPATCH_FLOATS(x.scalar_type(), "pixel_norm_act_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t neg = norm_act_neg<acc_t>(act, alpha);
    pn_kernel<FWD, scalar_t, acc_t><<<num_blocks(N * S), kThreads, 0, stream()>>>(
        x.data_ptr<scalar_t>(), FWD ? nullptr : dy.data_ptr<scalar_t>(), N * S, C, S, nhwc || S == 1,
        static_cast<acc_t>(eps), neg, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor pn_act_fwd_cuda(const at::Tensor& x, double eps, int64_t act, double alpha) {
  check_norm_act_input("pixel_norm_act", x, "x", act, alpha, eps);
  return pn_run<true>(x, nullptr, eps, act, alpha);
}

at::Tensor pn_act_bwd_cuda(const at::Tensor& dy, const at::Tensor& x, double eps, int64_t act, double alpha) {
  check_norm_act_input("pixel_norm_act backward", x, "x", act, alpha, eps);
  check_norm_act_input("pixel_norm_act backward", dy, "dy", act, alpha, eps);
  TORCH_CHECK_VALUE(dy.sizes() == x.sizes(), "pixel_norm_act backward: dy has shape ", dy.sizes(),
                    " but x has shape ", x.sizes());
  check_same_device(dy, x, "pixel_norm_act backward", "dy", "x");
  return pn_run<false>(x, &dy, eps, act, alpha);
}

}  // namespace
}  // namespace mtcore::cuda_impl

TORCH_LIBRARY_IMPL(mtcore, CUDA, m) {
  m.impl("pn_act_fwd", &mtcore::cuda_impl::pn_act_fwd_cuda);
  m.impl("pn_act_bwd", &mtcore::cuda_impl::pn_act_bwd_cuda);
}
