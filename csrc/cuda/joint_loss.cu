// Joint multi-task loss (CUDA): the four task terms and their weighted total, with gradients.
//
// terms = [seg CE mean, cls CE mean (label smoothing), VAE rec + beta kl, GAN g loss].
// mode 0 "fixed": total = sum_k w_k L_k. mode 1 "uncertainty" (Kendall et al. 2018, log-variance
// form): total = sum_k exp(-s_k) L_k + s_k. d(total)/d(L_k) (w_k or exp(-s_k)) does not depend on
// the losses, so it is computed first and each task kernel scales its gradient by it on the device:
// every gradient is written once, with no host round trip.
#include <ATen/ops/stack.h>

#include "common.cuh"

namespace mtcore::cuda_impl {
namespace {

constexpr const char* kOp = "joint_loss_fwd";

// coef_k = d(total)/d(L_k).
template <typename scalar_t, typename acc_t>
__global__ void joint_coef_kernel(const scalar_t* __restrict__ weights, int mode,
                                  acc_t* __restrict__ coef) {
  const int k = threadIdx.x;
  if (k < 4) {
    const acc_t w = static_cast<acc_t>(weights[k]);
    coef[k] = mode == 0 ? w : exp(-w);
  }
}

// total and d(total)/d(weights) from the terms.
template <typename scalar_t, typename acc_t>
__global__ void joint_total_kernel(const scalar_t* __restrict__ terms,
                                   const scalar_t* __restrict__ weights, int mode,
                                   scalar_t* __restrict__ total, scalar_t* __restrict__ grad_w) {
  if (threadIdx.x != 0) return;
  acc_t sum = 0;
  for (int k = 0; k < 4; ++k) {
    const acc_t L = static_cast<acc_t>(terms[k]);
    const acc_t w = static_cast<acc_t>(weights[k]);
    if (mode == 0) {
      sum += w * L;
      if (grad_w) grad_w[k] = static_cast<scalar_t>(L);
    } else {
      const acc_t e = exp(-w);
      sum += e * L + w;
      if (grad_w) grad_w[k] = static_cast<scalar_t>(acc_t(1) - e * L);
    }
  }
  total[0] = static_cast<scalar_t>(sum);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor>
joint_loss_fwd_cuda(const at::Tensor& seg_logits, const at::Tensor& seg_target,
                    const at::Tensor& cls_logits, const at::Tensor& cls_target,
                    const at::Tensor& recon, const at::Tensor& image, const at::Tensor& mu,
                    const at::Tensor& logvar, const at::Tensor& fake_logits,
                    const at::Tensor& weights_in, int64_t mode, double beta,
                    double label_smoothing, int64_t ignore_index, int64_t recon_kind,
                    int64_t adv_kind, bool compute_grad) {
  const at::Tensor weights = float_input(weights_in, kOp, "weights");
  TORCH_CHECK_VALUE(weights.dim() == 1 && weights.size(0) == 4, kOp,
                    ": weights must have shape (4,) (one per task: seg, cls, vae, gan), got ",
                    weights.sizes());
  TORCH_CHECK_VALUE(mode == 0 || mode == 1, kOp,
                    ": mode must be 0 (fixed) or 1 (uncertainty), got ", mode);
  for (auto [t, name] : {std::pair<const at::Tensor&, const char*>{seg_logits, "seg_logits"},
                         {seg_target, "seg_target"},
                         {cls_logits, "cls_logits"},
                         {cls_target, "cls_target"},
                         {recon, "recon"},
                         {image, "image"},
                         {mu, "mu"},
                         {logvar, "logvar"},
                         {fake_logits, "fake_logits"}}) {
    check_cuda(t, kOp, name);
    check_same_device(t, weights, kOp, name, "weights");
  }
  const c10::cuda::CUDAGuard guard(weights.device());
  const cudaStream_t st = stream();
  const auto wdt = weights.scalar_type();

  at::Tensor coef;  // undefined without gradients: the task ops then skip the scaling
  if (compute_grad) {
    MTCORE_DISPATCH_FLOATS(wdt, "joint_coef_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      coef = at::empty({4}, acc_options<acc_t>(weights));
      joint_coef_kernel<scalar_t, acc_t><<<1, 32, 0, st>>>(weights.data_ptr<scalar_t>(),
                                                           static_cast<int>(mode),
                                                           coef.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  auto coef_k = [&](int64_t k) { return coef.defined() ? coef.narrow(0, k, 1) : at::Tensor(); };

  // Each term comes back in its accumulation type (not rounded to a bf16/fp16 input's dtype)
  // and is weighed in the weights' dtype, as the CPU kernel does.
  auto [seg, grad_seg] = seg_ce_impl(seg_logits, seg_target, c10::nullopt, ignore_index, 0.0,
                                     /*mean*/ 1, compute_grad, coef_k(0), /*acc_loss*/ true);
  auto [cls, grad_cls] = seg_ce_impl(cls_logits, cls_target, c10::nullopt, ignore_index,
                                     label_smoothing, /*mean*/ 1, compute_grad, coef_k(1), true);
  auto [rec, kl, vae, grad_recon, grad_mu, grad_logvar] =
      vae_loss_impl(recon, image, mu, logvar, beta, recon_kind, compute_grad, coef_k(2),
                    /*kl factor*/ beta, /*acc_loss*/ true);
  auto [gan, grad_fake] =
      adv_loss_impl(fake_logits, adv_kind, /*g*/ 2, compute_grad, coef_k(3), true);

  const at::Tensor terms = at::stack({seg.to(wdt), cls.to(wdt), vae.to(wdt), gan.to(wdt)});
  at::Tensor total = at::empty({}, weights.options());
  at::Tensor grad_w = compute_grad ? at::empty({4}, weights.options())
                                   : at::empty({0}, weights.options());
  MTCORE_DISPATCH_FLOATS(wdt, "joint_total_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    joint_total_kernel<scalar_t, acc_t><<<1, 32, 0, st>>>(
        terms.data_ptr<scalar_t>(), weights.data_ptr<scalar_t>(), static_cast<int>(mode),
        total.data_ptr<scalar_t>(), compute_grad ? grad_w.data_ptr<scalar_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {terms,      total,   grad_seg,    grad_cls, grad_recon,
          grad_mu,    grad_logvar, grad_fake, grad_w};
}

}  // namespace
}  // namespace mtcore::cuda_impl

TORCH_LIBRARY_IMPL(mtcore, CUDA, m) {
  m.impl("joint_loss_fwd", &mtcore::cuda_impl::joint_loss_fwd_cuda);
}
