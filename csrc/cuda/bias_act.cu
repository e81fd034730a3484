// Fused bias + activation + gain + clamp (CUDA), as the StyleGAN2 fused op (Karras et al. 2020).
//
// y = clamp(act(x + b[c]) * gain, -clamp, clamp), c the index along `dim`; clamp < 0 means none.
// act: 0 linear, 1 relu, 2 lrelu (slope alpha), 3 tanh, 4 sigmoid, 5 silu.
// bias_act_grad returns dx = dy * dy/dx, recomputed from x and b (exact at the clamp bounds, where
// torch.clamp passes the gradient through inclusively); db is dx summed over all dims but `dim`.
#include "common.cuh"

namespace mtcore::cuda_impl {
namespace {

struct ActArgs {
  int64_t n;      // numel of x
  int64_t inner;  // prod(x.shape[dim+1:])
  int64_t C;      // x.shape[dim] (1 without bias)
  int act;
  double alpha, gain, clamp;
};

template <typename acc_t>
__device__ __forceinline__ acc_t act_value(acc_t v, int act, acc_t alpha) {
  switch (act) {
    case 1: return v > acc_t(0) ? v : acc_t(0);
    case 2: return v > acc_t(0) ? v : v * alpha;
    case 3: return tanh(v);
    case 4: return sigmoid(v);
    case 5: return v * sigmoid(v);
    default: return v;
  }
}

// d act / d v (relu and lrelu use the torch convention at 0: the negative-side slope).
template <typename acc_t>
__device__ __forceinline__ acc_t act_deriv(acc_t v, int act, acc_t alpha) {
  switch (act) {
    case 1: return v > acc_t(0) ? acc_t(1) : acc_t(0);
    case 2: return v > acc_t(0) ? acc_t(1) : alpha;
    case 3: {
      const acc_t t = tanh(v);
      return acc_t(1) - t * t;
    }
    case 4: {
      const acc_t s = sigmoid(v);
      return s * (acc_t(1) - s);
    }
    case 5: {
      const acc_t s = sigmoid(v);
      return s * (acc_t(1) + v * (acc_t(1) - s));
    }
    default: return acc_t(1);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void bias_act_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ b,
                                ActArgs a, scalar_t* __restrict__ y) {
  const acc_t alpha = static_cast<acc_t>(a.alpha);
  const acc_t gain = static_cast<acc_t>(a.gain);
  const acc_t clamp = static_cast<acc_t>(a.clamp);
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < a.n;
       i += (int64_t)gridDim.x * blockDim.x) {
    acc_t v = static_cast<acc_t>(x[i]);
    if (b) v += static_cast<acc_t>(b[(i / a.inner) % a.C]);
    acc_t u = act_value(v, a.act, alpha) * gain;
    if (clamp >= acc_t(0)) u = u < -clamp ? -clamp : (u > clamp ? clamp : u);
    y[i] = static_cast<scalar_t>(u);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void bias_act_grad_kernel(const scalar_t* __restrict__ dy,
                                     const scalar_t* __restrict__ x,
                                     const scalar_t* __restrict__ b, ActArgs a,
                                     scalar_t* __restrict__ dx) {
  const acc_t alpha = static_cast<acc_t>(a.alpha);
  const acc_t gain = static_cast<acc_t>(a.gain);
  const acc_t clamp = static_cast<acc_t>(a.clamp);
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < a.n;
       i += (int64_t)gridDim.x * blockDim.x) {
    acc_t v = static_cast<acc_t>(x[i]);
    if (b) v += static_cast<acc_t>(b[(i / a.inner) % a.C]);
    acc_t g = static_cast<acc_t>(dy[i]) * act_deriv(v, a.act, alpha) * gain;
    if (clamp >= acc_t(0)) {
      const acc_t u = act_value(v, a.act, alpha) * gain;
      if (u < -clamp || u > clamp) g = acc_t(0);
    }
    dx[i] = static_cast<scalar_t>(g);
  }
}

// Checks shared by forward and backward; returns the launch description and the contiguous bias.
ActArgs prepare(const char* op, const at::Tensor& x, const c10::optional<at::Tensor>& b_in,
                int64_t dim, int64_t act, double alpha, double gain, double clamp,
                at::Tensor& b) {
  TORCH_CHECK_VALUE(act >= 0 && act <= 5, op,
                    ": act must be 0 linear, 1 relu, 2 lrelu, 3 tanh, 4 sigmoid or 5 silu, got ",
                    act);
  TORCH_CHECK_VALUE(std::isfinite(gain), op, ": gain must be finite, got ", gain);
  TORCH_CHECK_VALUE(std::isfinite(alpha), op, ": alpha must be finite, got ", alpha);
  ActArgs a{x.numel(), 1, 1, static_cast<int>(act), alpha, gain, clamp};
  if (b_in.has_value() && b_in->defined()) {
    const at::Tensor& bt = *b_in;
    TORCH_CHECK_VALUE(x.dim() > 0, op,
                      ": x is 0-d, so it has no dimension to add the bias b along");
    TORCH_CHECK_VALUE(dim >= -x.dim() && dim < x.dim(), op, ": dim=", dim,
                      " is out of range for x of shape ", x.sizes());
    const int64_t d = dim < 0 ? dim + x.dim() : dim;
    check_cuda(bt, op, "b");
    check_same_device(bt, x, op, "b", "x");
    TORCH_CHECK_TYPE(bt.scalar_type() == x.scalar_type(), op, ": b has dtype ", bt.scalar_type(),
                     " but x has dtype ", x.scalar_type(), "; they must match");
    TORCH_CHECK_VALUE(bt.dim() == 1 && bt.size(0) == x.size(d), op,
                      ": b must have shape [x.shape[dim]] = [", x.size(d), "] (x of shape ",
                      x.sizes(), ", dim=", dim, "), got b of shape ", bt.sizes());
    b = bt.contiguous();
    a.C = x.size(d);
    for (int64_t k = d + 1; k < x.dim(); ++k) a.inner *= x.size(k);
    if (a.inner == 0) a.inner = 1;  // x is empty; keeps the (unused) index math defined
  }
  return a;
}

at::Tensor bias_act_cuda(const at::Tensor& x_in, const c10::optional<at::Tensor>& b_in,
                         int64_t dim, int64_t act, double alpha, double gain, double clamp) {
  constexpr const char* kOp = "bias_act";
  const at::Tensor x = float_input(x_in, kOp, "x");
  at::Tensor b;
  const ActArgs a = prepare(kOp, x, b_in, dim, act, alpha, gain, clamp, b);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  if (a.n == 0) return y;
  MTCORE_DISPATCH_FLOATS(x.scalar_type(), "bias_act_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    bias_act_kernel<scalar_t, acc_t><<<num_blocks(a.n), kThreads, 0, stream()>>>(
        x.data_ptr<scalar_t>(), b.defined() ? b.data_ptr<scalar_t>() : nullptr, a,
        y.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

at::Tensor bias_act_grad_cuda(const at::Tensor& dy_in, const at::Tensor& x_in,
                              const c10::optional<at::Tensor>& b_in, const at::Tensor& y,
                              int64_t dim, int64_t act, double alpha, double gain, double clamp) {
  constexpr const char* kOp = "bias_act_grad";
  const at::Tensor x = float_input(x_in, kOp, "x");
  check_cuda(dy_in, kOp, "dy");
  check_same_device(dy_in, x, kOp, "dy", "x");
  TORCH_CHECK_VALUE(dy_in.sizes() == x.sizes(), kOp, ": dy must have the shape of x ", x.sizes(),
                    ", got ", dy_in.sizes());
  // y is accepted for schema compatibility; dx is recomputed from x (exact at the clamp bounds).
  TORCH_CHECK_VALUE(!y.defined() || y.numel() == 0 || y.sizes() == x.sizes(), kOp,
                    ": y must be empty or have the shape of x ", x.sizes(), ", got ", y.sizes());
  const at::Tensor dy = dy_in.to(x.scalar_type()).contiguous();
  at::Tensor b;
  const ActArgs a = prepare(kOp, x, b_in, dim, act, alpha, gain, clamp, b);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty_like(x);
  if (a.n == 0) return dx;
  MTCORE_DISPATCH_FLOATS(x.scalar_type(), "bias_act_grad_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    bias_act_grad_kernel<scalar_t, acc_t><<<num_blocks(a.n), kThreads, 0, stream()>>>(
        dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
        b.defined() ? b.data_ptr<scalar_t>() : nullptr, a, dx.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}

}  // namespace
}  // namespace mtcore::cuda_impl

TORCH_LIBRARY_IMPL(mtcore, CUDA, m) {
  m.impl("bias_act", &mtcore::cuda_impl::bias_act_cuda);
  m.impl("bias_act_grad", &mtcore::cuda_impl::bias_act_grad_cuda);
}
