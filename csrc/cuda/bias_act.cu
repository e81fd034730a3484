// Fused bias + activation + gain + clamp (CUDA), as the StyleGAN2 fused op (Karras et al. 2020).
//
// y = clamp(act(x + b[c]) * gain, -clamp, clamp), c the index along `dim`; clamp < 0 means none.
// act: 0 linear, 1 relu, 2 lrelu (slope alpha), 3 tanh, 4 sigmoid, 5 silu.
// bias_act_grad returns dx (db is dx summed over all dims but `dim`, done by the autograd glue).
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

// dx = dy * gain * act'(.) * clamp mask, following the CPU kernel's contract: relu/lrelu read the
// derivative off y's sign (times the gain's sign), tanh/sigmoid/silu recompute it from x (+ b); the
// clamp mask is |y| < clamp for linear/relu/lrelu (StyleGAN2's convention) and |act(x + b) * gain|
// < clamp, recomputed, for tanh/sigmoid/silu. Unneeded inputs may be nullptr.
template <typename scalar_t, typename acc_t>
__global__ void bias_act_grad_kernel(const scalar_t* __restrict__ dy,
                                     const scalar_t* __restrict__ x,
                                     const scalar_t* __restrict__ b,
                                     const scalar_t* __restrict__ y, ActArgs a,
                                     scalar_t* __restrict__ dx) {
  const acc_t alpha = static_cast<acc_t>(a.alpha);
  const acc_t gain = static_cast<acc_t>(a.gain);
  const acc_t clamp = static_cast<acc_t>(a.clamp);
  const acc_t gain_sign = gain < acc_t(0) ? acc_t(-1) : acc_t(1);
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < a.n;
       i += (int64_t)gridDim.x * blockDim.x) {
    acc_t g = static_cast<acc_t>(dy[i]) * gain;
    if (a.act >= 3) {
      acc_t v = static_cast<acc_t>(x[i]);
      if (b) v += static_cast<acc_t>(b[(i / a.inner) % a.C]);
      g *= act_deriv(v, a.act, alpha);
      // the clamp mask from the recomputed pre-clamp value (y is not passed for these acts, and a
      // bf16/fp16 y could round onto the bound), as the CPU kernel does
      if (clamp >= acc_t(0) && !(fabs(act_value(v, a.act, alpha) * gain) < clamp)) g = acc_t(0);
    } else {
      if (a.act == 1 || a.act == 2) {
        const bool pos = static_cast<acc_t>(y[i]) * gain_sign > acc_t(0);
        g = pos ? g : (a.act == 1 ? acc_t(0) : g * alpha);
      }
      if (clamp >= acc_t(0) && !(fabs(static_cast<acc_t>(y[i])) < clamp)) g = acc_t(0);
    }
    dx[i] = static_cast<scalar_t>(g);
  }
}

void check_act(const char* op, int64_t act, double alpha, double gain) {
  TORCH_CHECK_VALUE(act >= 0 && act <= 5, op,
                    ": act must be 0 linear, 1 relu, 2 lrelu, 3 tanh, 4 sigmoid or 5 silu, got ",
                    act);
  TORCH_CHECK_VALUE(std::isfinite(gain), op, ": gain must be finite, got ", gain);
  TORCH_CHECK_VALUE(act != 2 || (alpha >= 0.0 && std::isfinite(alpha)), op,
                    ": alpha must be a finite number >= 0 for lrelu, got ", alpha);
}

// Checks the optional bias against `like` (x, or dy in the backward); fills the broadcast geometry
// and the contiguous bias when there is one.
void prepare_bias(const char* op, const at::Tensor& like, const c10::optional<at::Tensor>& b_in,
                  int64_t dim, ActArgs& a, at::Tensor& b) {
  if (!b_in.has_value() || !b_in->defined()) return;
  const at::Tensor& bt = *b_in;
  TORCH_CHECK_VALUE(like.dim() > 0, op,
                    ": x is 0-d, so it has no dimension to add the bias b along");
  TORCH_CHECK_VALUE(dim >= -like.dim() && dim < like.dim(), op, ": dim=", dim,
                    " is out of range for x of shape ", like.sizes());
  const int64_t d = dim < 0 ? dim + like.dim() : dim;
  check_cuda(bt, op, "b");
  check_same_device(bt, like, op, "b", "x");
  TORCH_CHECK_TYPE(bt.scalar_type() == like.scalar_type(), op, ": b has dtype ", bt.scalar_type(),
                   " but x has dtype ", like.scalar_type(), "; they must match");
  TORCH_CHECK_VALUE(bt.dim() == 1 && bt.size(0) == like.size(d), op,
                    ": b must have shape [x.shape[dim]] = [", like.size(d), "] (x of shape ",
                    like.sizes(), ", dim=", dim, "), got b of shape ", bt.sizes());
  b = bt.contiguous();
  a.C = like.size(d);
  a.inner = 1;
  for (int64_t k = d + 1; k < like.dim(); ++k) a.inner *= like.size(k);
  if (a.inner == 0) a.inner = 1;  // empty tensor: keeps the (unused) index math defined
}

// The kernels walk contiguous memory; an output that should keep another layout (channels_last)
// is written contiguously first and copied into place.
at::Tensor contiguous_target(const at::Tensor& out) {
  return out.is_contiguous() ? out : at::empty(out.sizes(), out.options());
}

at::Tensor bias_act_cuda(const at::Tensor& x_in, const c10::optional<at::Tensor>& b_in,
                         int64_t dim, int64_t act, double alpha, double gain, double clamp) {
  constexpr const char* kOp = "bias_act";
  check_cuda(x_in, kOp, "x");
  check_float(x_in, kOp, "x");
  check_act(kOp, act, alpha, gain);
  const at::Tensor x = x_in.contiguous();
  ActArgs a{x.numel(), 1, 1, static_cast<int>(act), alpha, gain, clamp};
  at::Tensor b;
  prepare_bias(kOp, x_in, b_in, dim, a, b);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x_in);  // the layout of x, as the CPU kernel
  if (a.n == 0) return y;
  at::Tensor yc = contiguous_target(y);
  MTCORE_DISPATCH_FLOATS(x.scalar_type(), "bias_act_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    bias_act_kernel<scalar_t, acc_t><<<num_blocks(a.n), kThreads, 0, stream()>>>(
        x.data_ptr<scalar_t>(), b.defined() ? b.data_ptr<scalar_t>() : nullptr, a,
        yc.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (!yc.is_same(y)) y.copy_(yc);
  return y;
}

// x may be empty unless act is tanh/sigmoid/silu; y may be empty unless act is relu/lrelu, or
// linear with clamp >= 0 (the autograd glue need not keep them alive). dx takes the layout of y, else x, else
// dy, as the CPU kernel (and the fake in Python) do.
at::Tensor bias_act_grad_cuda(const at::Tensor& dy, const at::Tensor& x,
                              const c10::optional<at::Tensor>& b_in, const at::Tensor& y,
                              int64_t dim, int64_t act, double alpha, double gain, double clamp) {
  constexpr const char* kOp = "bias_act_grad";
  check_cuda(dy, kOp, "dy");
  check_float(dy, kOp, "dy");
  check_act(kOp, act, alpha, gain);
  const bool need_x = act >= 3;
  const bool need_y = act == 1 || act == 2 || (act == 0 && clamp >= 0);  // as _uses_y in Python
  for (auto [t, name, needed] :
       {std::make_tuple(&x, "x", need_x), std::make_tuple(&y, "y", need_y)}) {
    if (!needed && (!t->defined() || t->numel() == 0)) continue;
    TORCH_CHECK_VALUE(t->defined() && t->sizes() == dy.sizes(), kOp, ": act=", act,
                      clamp >= 0 ? " with clamp" : "", " needs ", name, " of dy's shape ",
                      dy.sizes(), ", got ", t->defined() ? t->sizes() : at::IntArrayRef{},
                      needed ? "" : " (pass an empty tensor when it is not needed)");
    TORCH_CHECK_TYPE(t->scalar_type() == dy.scalar_type(), kOp, ": ", name, " has dtype ",
                     t->scalar_type(), " but dy has dtype ", dy.scalar_type());
    check_cuda(*t, kOp, name);
    check_same_device(*t, dy, kOp, name, "dy");
  }
  ActArgs a{dy.numel(), 1, 1, static_cast<int>(act), alpha, gain, clamp};
  at::Tensor b;
  prepare_bias(kOp, dy, b_in, dim, a, b);
  const c10::cuda::CUDAGuard guard(dy.device());
  const at::Tensor& ref = (need_y && y.numel() > 0) ? y : (need_x && x.numel() > 0) ? x : dy;
  at::Tensor dx = at::empty_like(ref);
  if (a.n == 0) return dx;
  const at::Tensor dyc = dy.contiguous();
  const at::Tensor xc = need_x ? x.contiguous() : at::Tensor();
  const at::Tensor yc = need_y ? y.contiguous() : at::Tensor();
  at::Tensor dxc = contiguous_target(dx);
  MTCORE_DISPATCH_FLOATS(dy.scalar_type(), "bias_act_grad_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    bias_act_grad_kernel<scalar_t, acc_t><<<num_blocks(a.n), kThreads, 0, stream()>>>(
        dyc.data_ptr<scalar_t>(), need_x ? xc.data_ptr<scalar_t>() : nullptr,
        need_x && b.defined() ? b.data_ptr<scalar_t>() : nullptr,
        need_y ? yc.data_ptr<scalar_t>() : nullptr, a, dxc.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (!dxc.is_same(dx)) dx.copy_(dxc);
  return dx;
}

}  // namespace
}  // namespace mtcore::cuda_impl

TORCH_LIBRARY_IMPL(mtcore, CUDA, m) {
  m.impl("bias_act", &mtcore::cuda_impl::bias_act_cuda);
  m.impl("bias_act_grad", &mtcore::cuda_impl::bias_act_grad_cuda);
}
