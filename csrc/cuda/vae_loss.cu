// Fused VAE loss (CUDA): reconstruction + KL terms and their gradients in one pass each.
//
// rec = sum((x - t)^2) / N ("mse"), or for logits x ("bernoulli")
// rec = sum(max(x,0) - x t + log1p(exp(-|x|))) / N;
// kl = -0.5 sum(1 + lv - mu^2 - exp(lv)) / N (Kingma & Welling 2014); total = rec + beta kl.
// N = max(batch, 1) as in the reference, so an empty batch gives zeros.
#include "common.cuh"

namespace mtcore::cuda_impl {
namespace {

constexpr const char* kOp = "vae_loss_fwd";

// Per element: rec term and d(rec)/d(recon) (times inv_n * grad_scale); block partials of the sum.
template <typename scalar_t, typename acc_t>
__global__ void vae_rec_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ t,
                               int64_t n, int kind, acc_t inv_n,
                               const acc_t* __restrict__ grad_scale,
                               scalar_t* __restrict__ grad, double* __restrict__ partials) {
  const acc_t k = inv_n * (grad_scale ? grad_scale[0] : acc_t(1));
  acc_t local = 0;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    const acc_t xi = static_cast<acc_t>(x[i]);
    const acc_t ti = static_cast<acc_t>(t[i]);
    acc_t g;
    if (kind == 0) {
      const acc_t d = xi - ti;
      local += d * d;
      g = acc_t(2) * d;
    } else {
      local += softplus(xi) - xi * ti;  // == max(x,0) - x t + log1p(exp(-|x|))
      g = sigmoid(xi) - ti;
    }
    if (grad) grad[i] = static_cast<scalar_t>(g * k);
  }
  local = block_sum(local);
  if (threadIdx.x == 0) partials[blockIdx.x] = static_cast<double>(local);
}

// Per latent: KL term and d(kl)/d(mu) = mu / N, d(kl)/d(logvar) = 0.5 (exp(lv) - 1) / N.
template <typename scalar_t, typename acc_t>
__global__ void vae_kl_kernel(const scalar_t* __restrict__ mu, const scalar_t* __restrict__ lv,
                              int64_t n, acc_t inv_n, acc_t kl_factor,
                              const acc_t* __restrict__ grad_scale,
                              scalar_t* __restrict__ grad_mu, scalar_t* __restrict__ grad_lv,
                              double* __restrict__ partials) {
  const acc_t k = inv_n * kl_factor * (grad_scale ? grad_scale[0] : acc_t(1));
  acc_t local = 0;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    const acc_t m = static_cast<acc_t>(mu[i]);
    const acc_t l = static_cast<acc_t>(lv[i]);
    const acc_t e = exp(l);
    local += acc_t(-0.5) * (acc_t(1) + l - m * m - e);
    if (grad_mu) {
      grad_mu[i] = static_cast<scalar_t>(m * k);
      grad_lv[i] = static_cast<scalar_t>(acc_t(0.5) * (e - acc_t(1)) * k);
    }
  }
  local = block_sum(local);
  if (threadIdx.x == 0) partials[blockIdx.x] = static_cast<double>(local);
}

// rec, kl, total (= rec + beta kl) from the block partials (double: the two sums may come from
// different dtypes), each cast to out_t (recon's dtype, or its accumulation type for acc_loss).
template <typename out_t>
__global__ void vae_finalize_kernel(const double* __restrict__ rec_partials, int n_rec,
                                    const double* __restrict__ kl_partials, int n_kl,
                                    double inv_n, double beta, out_t* __restrict__ rec,
                                    out_t* __restrict__ kl, out_t* __restrict__ total) {
  double r = 0;
  double k = 0;
  for (int i = threadIdx.x; i < n_rec; i += blockDim.x) r += rec_partials[i];
  for (int i = threadIdx.x; i < n_kl; i += blockDim.x) k += kl_partials[i];
  r = block_sum(r);
  k = block_sum(k);
  if (threadIdx.x == 0) {
    r *= inv_n;
    k *= inv_n;
    rec[0] = static_cast<out_t>(r);
    kl[0] = static_cast<out_t>(k);
    total[0] = static_cast<out_t>(r + beta * k);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> vae_loss_impl(
    const at::Tensor& recon_in, const at::Tensor& target_in, const at::Tensor& mu_in,
    const at::Tensor& logvar_in, double beta, int64_t recon_kind, bool compute_grad,
    const at::Tensor& grad_scale, double kl_grad_factor, bool acc_loss) {
  check_cuda(recon_in, kOp, "recon");
  check_float(recon_in, kOp, "recon");
  for (auto [t, name] : {std::pair<const at::Tensor&, const char*>{target_in, "target"},
                         {mu_in, "mu"}, {logvar_in, "logvar"}}) {
    check_cuda(t, kOp, name);
    check_same_device(t, recon_in, kOp, name, "recon");
    check_float(t, kOp, name);
  }
  TORCH_CHECK_VALUE(recon_in.dim() >= 1 && recon_in.sizes() == target_in.sizes(), kOp,
                    ": recon and target must have the same shape [N, *], got recon ",
                    recon_in.sizes(), " and target ", target_in.sizes());
  TORCH_CHECK_VALUE(mu_in.dim() == 2 && mu_in.sizes() == logvar_in.sizes(), kOp,
                    ": mu and logvar must both be [N, Z], got mu ", mu_in.sizes(), " and logvar ",
                    logvar_in.sizes());
  TORCH_CHECK_VALUE(mu_in.size(0) == recon_in.size(0), kOp, ": mu has batch size ", mu_in.size(0),
                    " but recon has ", recon_in.size(0), " (recon shape ", recon_in.sizes(), ")");
  TORCH_CHECK_VALUE(recon_kind == 0 || recon_kind == 1, kOp,
                    ": recon_kind must be 0 (mse) or 1 (bernoulli), got ", recon_kind);

  const c10::cuda::CUDAGuard guard(recon_in.device());
  // The reconstruction runs in recon's dtype, the KL in mu's (as the CPU kernel and the
  // reference: a bf16 decoder with an fp32 encoder head keeps its fp32 KL and gradients).
  const at::Tensor recon = recon_in.contiguous();
  const at::Tensor target = target_in.to(recon.scalar_type()).contiguous();
  const at::Tensor mu = mu_in.contiguous();
  const at::Tensor logvar = logvar_in.to(mu.scalar_type()).contiguous();
  const auto out_dtype =
      acc_loss ? at::toOpMathType(recon.scalar_type()) : recon.scalar_type();
  const auto out_opts = recon.options().dtype(out_dtype);
  at::Tensor rec = at::empty({}, out_opts);
  at::Tensor kl = at::empty({}, out_opts);
  at::Tensor total = at::empty({}, out_opts);
  at::Tensor grad_recon = compute_grad ? at::empty_like(recon) : at::empty({0}, recon.options());
  at::Tensor grad_mu = compute_grad ? at::empty_like(mu) : at::empty({0}, mu.options());
  at::Tensor grad_logvar = compute_grad ? at::empty_like(logvar) : at::empty({0}, mu.options());
  const double inv_n = 1.0 / static_cast<double>(std::max<int64_t>(recon.size(0), 1));
  const auto partial_opts = recon.options().dtype(at::kDouble);
  const cudaStream_t st = stream();

  const int rec_blocks = num_blocks(recon.numel());
  at::Tensor rec_partials = at::empty({rec_blocks}, partial_opts);
  MTCORE_DISPATCH_FLOATS(recon.scalar_type(), "vae_rec_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor scale_holder;
    const acc_t* gs_ptr = scale_ptr<acc_t>(grad_scale, scale_holder);
    vae_rec_kernel<scalar_t, acc_t><<<rec_blocks, kThreads, 0, st>>>(
        recon.data_ptr<scalar_t>(), target.data_ptr<scalar_t>(), recon.numel(),
        static_cast<int>(recon_kind), static_cast<acc_t>(inv_n), gs_ptr,
        compute_grad ? grad_recon.data_ptr<scalar_t>() : nullptr, rec_partials.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  const int kl_blocks = num_blocks(mu.numel());
  at::Tensor kl_partials = at::empty({kl_blocks}, partial_opts);
  MTCORE_DISPATCH_FLOATS(mu.scalar_type(), "vae_kl_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor scale_holder;
    const acc_t* gs_ptr = scale_ptr<acc_t>(grad_scale, scale_holder);
    vae_kl_kernel<scalar_t, acc_t><<<kl_blocks, kThreads, 0, st>>>(
        mu.data_ptr<scalar_t>(), logvar.data_ptr<scalar_t>(), mu.numel(),
        static_cast<acc_t>(inv_n), static_cast<acc_t>(kl_grad_factor), gs_ptr,
        compute_grad ? grad_mu.data_ptr<scalar_t>() : nullptr,
        compute_grad ? grad_logvar.data_ptr<scalar_t>() : nullptr, kl_partials.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  MTCORE_DISPATCH_FLOATS(out_dtype, "vae_finalize_cuda", [&] {
    vae_finalize_kernel<scalar_t><<<1, kThreads, 0, st>>>(
        rec_partials.data_ptr<double>(), rec_blocks, kl_partials.data_ptr<double>(), kl_blocks,
        inv_n, beta, rec.data_ptr<scalar_t>(), kl.data_ptr<scalar_t>(),
        total.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {rec, kl, total, grad_recon, grad_mu, grad_logvar};
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
vae_loss_fwd_cuda(const at::Tensor& recon, const at::Tensor& target, const at::Tensor& mu,
                  const at::Tensor& logvar, double beta, int64_t recon_kind, bool compute_grad) {
  return vae_loss_impl(recon, target, mu, logvar, beta, recon_kind, compute_grad, at::Tensor(),
                       1.0, /*acc_loss*/ false);
}

}  // namespace
}  // namespace mtcore::cuda_impl

TORCH_LIBRARY_IMPL(mtcore, CUDA, m) {
  m.impl("vae_loss_fwd", &mtcore::cuda_impl::vae_loss_fwd_cuda);
}
