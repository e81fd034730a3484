// Fused GAN losses (CUDA): the mean over all logits and its gradient f'(x) / n in one pass.
//
// non_saturating (Goodfellow et al. 2014): d_real softplus(-x), d_fake softplus(x), g softplus(-x)
// hinge (Lim & Ye 2017):                   d_real relu(1-x),    d_fake relu(1+x),   g -x
// least_squares (Mao et al. 2017):         d_real (x-1)^2,      d_fake x^2,          g (x-1)^2
// n = max(numel, 1) as in the reference, so an empty tensor gives 0.
#include "common.cuh"

namespace mtcore::cuda_impl {
namespace {

constexpr const char* kOp = "adv_loss_fwd";

// The per-element loss f(x) and its derivative f'(x) (relu's is 0 at the kink, as in torch).
template <typename acc_t>
__device__ __forceinline__ void adv_term(acc_t x, int kind, int role, acc_t& f, acc_t& df) {
  if (kind == 0) {
    if (role == 1) {
      f = softplus(x);
      df = sigmoid(x);
    } else {
      f = softplus(-x);
      df = -sigmoid(-x);
    }
  } else if (kind == 1) {
    if (role == 2) {
      f = -x;
      df = acc_t(-1);
    } else if (role == 1) {
      const acc_t u = acc_t(1) + x;
      f = u > acc_t(0) ? u : acc_t(0);
      df = u > acc_t(0) ? acc_t(1) : acc_t(0);
    } else {
      const acc_t u = acc_t(1) - x;
      f = u > acc_t(0) ? u : acc_t(0);
      df = u > acc_t(0) ? acc_t(-1) : acc_t(0);
    }
  } else {
    const acc_t d = role == 1 ? x : x - acc_t(1);
    f = d * d;
    df = acc_t(2) * d;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void adv_loss_kernel(const scalar_t* __restrict__ x, int64_t n, int kind, int role,
                                acc_t inv_n, const acc_t* __restrict__ grad_scale,
                                scalar_t* __restrict__ grad, acc_t* __restrict__ partials) {
  const acc_t k = inv_n * (grad_scale ? grad_scale[0] : acc_t(1));
  acc_t local = 0;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    acc_t f;
    acc_t df;
    adv_term(static_cast<acc_t>(x[i]), kind, role, f, df);
    local += f;
    if (grad) grad[i] = static_cast<scalar_t>(df * k);
  }
  local = block_sum(local);
  if (threadIdx.x == 0) partials[blockIdx.x] = local;
}

template <typename out_t, typename acc_t>
__global__ void adv_finalize_kernel(const acc_t* __restrict__ partials, int n, acc_t inv_n,
                                    out_t* __restrict__ out) {
  acc_t v = 0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) v += partials[i];
  v = block_sum(v);
  if (threadIdx.x == 0) out[0] = static_cast<out_t>(v * inv_n);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> adv_loss_impl(const at::Tensor& logits_in, int64_t kind,
                                                 int64_t role, bool compute_grad,
                                                 const at::Tensor& grad_scale, bool acc_loss) {
  const at::Tensor logits = float_input(logits_in, kOp, "logits");
  TORCH_CHECK_VALUE(kind >= 0 && kind <= 2, kOp,
                    ": kind must be 0 (non_saturating), 1 (hinge) or 2 (least_squares), got ",
                    kind);
  TORCH_CHECK_VALUE(role >= 0 && role <= 2, kOp,
                    ": role must be 0 (d_real), 1 (d_fake) or 2 (g), got ", role);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto loss_dtype =
      acc_loss ? at::toOpMathType(logits.scalar_type()) : logits.scalar_type();
  at::Tensor loss = at::empty({}, logits.options().dtype(loss_dtype));
  at::Tensor grad = compute_grad ? at::empty_like(logits) : at::empty({0}, logits.options());
  const int64_t n = logits.numel();

  MTCORE_DISPATCH_FLOATS(logits.scalar_type(), "adv_loss_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t inv_n = acc_t(1) / static_cast<acc_t>(std::max<int64_t>(n, 1));
    at::Tensor scale_holder;
    const acc_t* gs_ptr = scale_ptr<acc_t>(grad_scale, scale_holder);
    const cudaStream_t st = stream();
    const int blocks = num_blocks(n);
    at::Tensor partials = at::empty({blocks}, acc_options<acc_t>(logits));
    adv_loss_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, st>>>(
        logits.data_ptr<scalar_t>(), n, static_cast<int>(kind), static_cast<int>(role), inv_n,
        gs_ptr, compute_grad ? grad.data_ptr<scalar_t>() : nullptr, partials.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (acc_loss) {
      adv_finalize_kernel<acc_t, acc_t><<<1, kThreads, 0, st>>>(
          partials.data_ptr<acc_t>(), blocks, inv_n, loss.data_ptr<acc_t>());
    } else {
      adv_finalize_kernel<scalar_t, acc_t><<<1, kThreads, 0, st>>>(
          partials.data_ptr<acc_t>(), blocks, inv_n, loss.data_ptr<scalar_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, grad};
}

namespace {

std::tuple<at::Tensor, at::Tensor> adv_loss_fwd_cuda(const at::Tensor& logits, int64_t kind,
                                                     int64_t role, bool compute_grad) {
  return adv_loss_impl(logits, kind, role, compute_grad, at::Tensor());
}

}  // namespace
}  // namespace mtcore::cuda_impl

TORCH_LIBRARY_IMPL(mtcore, CUDA, m) {
  m.impl("adv_loss_fwd", &mtcore::cuda_impl::adv_loss_fwd_cuda);
}
