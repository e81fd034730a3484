// Fused cross entropy (CUDA): loss and d(loss)/d(logits) in one pass over each pixel's logits.
//
// loss_i = (1-eps) w[t_i] (lse_i - z_{i,t}) + eps/C sum_c w_c (lse_i - z_{i,c})
// (label smoothing: Szegedy et al. 2016)
// grad_{i,c} = (1-eps) w[t_i] (p_c - [c == t_i]) + eps/C (W p_c - w_c),  W = sum_c w_c.
// The mean divides by the summed weight of non-ignored targets, 0 (zero grad) when that is 0.
// Layout: logits [N, C, S] (S = prod(spatial)); thread-per-pixel kernels read channel c of 32
// neighbouring pixels in one coalesced access. Without spatial dims (S == 1) one warp owns a row.
#include "common.cuh"

namespace mtcore::cuda_impl {
namespace {

constexpr const char* kOp = "seg_ce_fwd";

// Pass 1 (targets only): summed weight of valid targets per block, and the first invalid target.
template <typename acc_t>
__global__ void seg_ce_denom_kernel(const int64_t* __restrict__ target,
                                    const acc_t* __restrict__ weight, int64_t P, int64_t C,
                                    int64_t ignore_index, bool assert_valid,
                                    unsigned long long* __restrict__ first_bad,
                                    acc_t* __restrict__ partials) {
  acc_t w_sum = 0;
  for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < P;
       p += (int64_t)gridDim.x * blockDim.x) {
    const int64_t t = target[p];
    if (t == ignore_index) continue;
    if (t < 0 || t >= C) {
      if (assert_valid) CUDA_KERNEL_ASSERT(false && "seg_ce_fwd: target out of [0, C)");
      atomicMin(first_bad, static_cast<unsigned long long>(p));
      continue;
    }
    w_sum += weight ? weight[t] : acc_t(1);
  }
  w_sum = block_sum(w_sum);
  if (threadIdx.x == 0) partials[blockIdx.x] = w_sum;
}

struct CeArgs {
  int64_t P, C, S, ignore_index;
  int reduction;  // 0 none, 1 mean, 2 sum
  bool compute_grad;
};

template <typename acc_t>
__device__ __forceinline__ acc_t grad_factor(const CeArgs& a, const acc_t* denom,
                                             const acc_t* grad_scale) {
  acc_t s = grad_scale ? grad_scale[0] : acc_t(1);
  if (a.reduction == 1) {
    const acc_t d = denom[0];
    s = d != acc_t(0) ? s / d : acc_t(0);  // class weights may be negative
  }
  return s;
}

// One thread per pixel (S > 1): pixels n*S + s; channel c sits at n*C*S + c*S + s.
template <typename scalar_t, typename acc_t>
__global__ void seg_ce_spatial_kernel(const scalar_t* __restrict__ logits,
                                      const int64_t* __restrict__ target,
                                      const acc_t* __restrict__ weight,
                                      const acc_t* __restrict__ weight_sum,
                                      const acc_t* __restrict__ denom,
                                      const acc_t* __restrict__ grad_scale, CeArgs a, acc_t eps,
                                      scalar_t* __restrict__ loss_none,
                                      acc_t* __restrict__ partials, scalar_t* __restrict__ grad) {
  const acc_t C_acc = static_cast<acc_t>(a.C);
  const acc_t W = weight ? weight_sum[0] : C_acc;
  const acc_t scale = grad_factor(a, denom, grad_scale);
  acc_t local = 0;
  for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < a.P;
       p += (int64_t)gridDim.x * blockDim.x) {
    const int64_t n = p / a.S;
    const int64_t s = p - n * a.S;
    const scalar_t* z = logits + n * a.C * a.S + s;
    const int64_t t = target[p];
    const bool valid = t != a.ignore_index && t >= 0 && t < a.C;
    // online log-sum-exp (Milakov & Gimelshein 2018) and sum_c w_c z_c in one sweep
    // A -inf logit adds exp(-inf) = 0 (the guard keeps exp(-inf - -inf) = NaN out), and sum w z
    // is only formed with smoothing on, so masked classes (-inf) give a finite loss as on the CPU.
    acc_t m = static_cast<acc_t>(z[0]);
    acc_t l = 1;
    acc_t wz = eps != acc_t(0) ? (weight ? weight[0] : acc_t(1)) * m : acc_t(0);
    for (int64_t c = 1; c < a.C; ++c) {
      const acc_t v = static_cast<acc_t>(z[c * a.S]);
      if (v > m) {
        l = l * exp(m - v) + acc_t(1);
        m = v;
      } else if (v != -INFINITY) {
        l += exp(v - m);
      }
      if (eps != acc_t(0)) wz += (weight ? weight[c] : acc_t(1)) * v;
    }
    const acc_t lse = m + log(l);
    acc_t loss = 0;
    acc_t wt = 0;
    if (valid) {
      wt = weight ? weight[t] : acc_t(1);
      const acc_t zt = static_cast<acc_t>(z[t * a.S]);
      loss = (acc_t(1) - eps) * wt * (lse - zt);
      if (eps != acc_t(0)) loss += eps / C_acc * (W * lse - wz);
    }
    if (a.reduction == 0) {
      loss_none[p] = static_cast<scalar_t>(loss);
    } else {
      local += loss;
    }
    if (a.compute_grad) {
      scalar_t* g = grad + n * a.C * a.S + s;
      const acc_t k = a.reduction == 0 ? (grad_scale ? grad_scale[0] : acc_t(1)) : scale;
      for (int64_t c = 0; c < a.C; ++c) {
        acc_t out = 0;
        if (valid) {
          const acc_t pc = exp(static_cast<acc_t>(z[c * a.S]) - lse);
          const acc_t wc = weight ? weight[c] : acc_t(1);
          out = (acc_t(1) - eps) * wt * (pc - (c == t ? acc_t(1) : acc_t(0))) +
                eps / C_acc * (W * pc - wc);
        }
        g[c * a.S] = static_cast<scalar_t>(out * k);
      }
    }
  }
  if (a.reduction != 0) {
    local = block_sum(local);
    if (threadIdx.x == 0) partials[blockIdx.x] = local;
  }
}

// One warp per row (S == 1, classification [N, C]): lanes stride over the row's classes.
template <typename scalar_t, typename acc_t>
__global__ void seg_ce_rows_kernel(const scalar_t* __restrict__ logits,
                                   const int64_t* __restrict__ target,
                                   const acc_t* __restrict__ weight,
                                   const acc_t* __restrict__ weight_sum,
                                   const acc_t* __restrict__ denom,
                                   const acc_t* __restrict__ grad_scale, CeArgs a, acc_t eps,
                                   scalar_t* __restrict__ loss_none, acc_t* __restrict__ partials,
                                   scalar_t* __restrict__ grad) {
  const int lane = threadIdx.x & 31;
  const acc_t C_acc = static_cast<acc_t>(a.C);
  const acc_t W = weight ? weight_sum[0] : C_acc;
  const acc_t scale = grad_factor(a, denom, grad_scale);
  const acc_t none_scale = grad_scale ? grad_scale[0] : acc_t(1);
  acc_t local = 0;
  // the loop bound is uniform across a warp, so the full-mask shuffles below are safe
  for (int64_t row = blockIdx.x * (int64_t)kWarpsPerBlock + (threadIdx.x >> 5); row < a.P;
       row += (int64_t)gridDim.x * kWarpsPerBlock) {
    const scalar_t* z = logits + row * a.C;
    acc_t m = -INFINITY;
    acc_t l = 0;
    acc_t wz = 0;
    for (int64_t c = lane; c < a.C; c += 32) {  // -inf logits as in the spatial kernel
      const acc_t v = static_cast<acc_t>(z[c]);
      if (v > m) {
        l = l * exp(m - v) + acc_t(1);
        m = v;
      } else if (v != -INFINITY) {
        l += exp(v - m);
      }
      if (eps != acc_t(0)) wz += (weight ? weight[c] : acc_t(1)) * v;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const acc_t m2 = __shfl_xor_sync(0xffffffffu, m, o);
      const acc_t l2 = __shfl_xor_sync(0xffffffffu, l, o);
      const acc_t mn = m > m2 ? m : m2;
      l = (l > acc_t(0) ? l * exp(m - mn) : acc_t(0)) +
          (l2 > acc_t(0) ? l2 * exp(m2 - mn) : acc_t(0));
      m = mn;
      wz += __shfl_xor_sync(0xffffffffu, wz, o);
    }
    const acc_t lse = m + log(l);
    const int64_t t = target[row];
    const bool valid = t != a.ignore_index && t >= 0 && t < a.C;
    acc_t loss = 0;
    acc_t wt = 0;
    if (valid) {
      wt = weight ? weight[t] : acc_t(1);
      loss = (acc_t(1) - eps) * wt * (lse - static_cast<acc_t>(z[t]));
      if (eps != acc_t(0)) loss += eps / C_acc * (W * lse - wz);
    }
    if (lane == 0) {
      if (a.reduction == 0) {
        loss_none[row] = static_cast<scalar_t>(loss);
      } else {
        local += loss;
      }
    }
    if (a.compute_grad) {
      const acc_t k = a.reduction == 0 ? none_scale : scale;
      for (int64_t c = lane; c < a.C; c += 32) {
        acc_t out = 0;
        if (valid) {
          const acc_t pc = exp(static_cast<acc_t>(z[c]) - lse);
          const acc_t wc = weight ? weight[c] : acc_t(1);
          out = (acc_t(1) - eps) * wt * (pc - (c == t ? acc_t(1) : acc_t(0))) +
                eps / C_acc * (W * pc - wc);
        }
        grad[row * a.C + c] = static_cast<scalar_t>(out * k);
      }
    }
  }
  if (a.reduction != 0) {
    local = block_sum(local);
    if (threadIdx.x == 0) partials[blockIdx.x] = local;
  }
}

// loss = sum(partials) (/ denom for the mean; 0 when denom == 0), cast to out_t (the logits
// dtype, or acc_t for acc_loss).
template <typename out_t, typename acc_t>
__global__ void seg_ce_finalize_kernel(const acc_t* __restrict__ partials, int n,
                                       const acc_t* __restrict__ denom, bool mean,
                                       out_t* __restrict__ out) {
  acc_t v = 0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) v += partials[i];
  v = block_sum(v);
  if (threadIdx.x == 0) {
    if (mean) v = denom[0] != acc_t(0) ? v / denom[0] : acc_t(0);
    out[0] = static_cast<out_t>(v);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> seg_ce_impl(const at::Tensor& logits_in,
                                               const at::Tensor& target_in,
                                               const c10::optional<at::Tensor>& weight_in,
                                               int64_t ignore_index, double label_smoothing,
                                               int64_t reduction, bool compute_grad,
                                               const at::Tensor& grad_scale, bool acc_loss) {
  check_cuda(logits_in, kOp, "logits");
  check_float(logits_in, kOp, "logits");
  TORCH_CHECK_VALUE(logits_in.dim() >= 2, kOp,
                    ": logits must be [N, C, *spatial] (at least 2-d), got shape ",
                    logits_in.sizes());
  const int64_t N = logits_in.size(0);
  const int64_t C = logits_in.size(1);
  TORCH_CHECK_VALUE(C > 0, kOp, ": logits must have at least one class (dim 1), got shape ",
                    logits_in.sizes());
  check_cuda(target_in, kOp, "target");
  check_same_device(target_in, logits_in, kOp, "target", "logits");
  TORCH_CHECK_TYPE(at::isIntegralType(target_in.scalar_type(), /*includeBool=*/false), kOp,
                   ": target must hold integer class indices (int64), got dtype ",
                   target_in.scalar_type(), " (shape ", target_in.sizes(), ")");
  std::vector<int64_t> expected{N};
  for (int64_t d = 2; d < logits_in.dim(); ++d) expected.push_back(logits_in.size(d));
  TORCH_CHECK_VALUE(target_in.sizes() == at::IntArrayRef(expected), kOp,
                    ": target must have shape ", at::IntArrayRef(expected), " to match logits ",
                    logits_in.sizes(), " (logits [N, C, *spatial] -> target [N, *spatial]), got ",
                    target_in.sizes());
  TORCH_CHECK_VALUE(reduction >= 0 && reduction <= 2, kOp,
                    ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0, kOp,
                    ": label_smoothing must be in [0, 1], got ", label_smoothing);

  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor target = target_in.to(at::kLong).contiguous();
  const int64_t S = N > 0 ? logits.numel() / (N * C) : 0;
  const int64_t P = N * S;

  acc_loss = acc_loss && reduction != 0;  // per-element losses stay in the logits dtype
  const auto loss_dtype =
      acc_loss ? at::toOpMathType(logits.scalar_type()) : logits.scalar_type();
  at::Tensor loss = reduction == 0 ? at::empty(expected, logits.options())
                                   : at::empty({}, logits.options().dtype(loss_dtype));
  at::Tensor grad = compute_grad ? at::empty_like(logits) : at::empty({0}, logits.options());
  if (P == 0) {  // empty batch: the mean and the sum are 0
    if (reduction != 0) loss.zero_();
    return {loss, grad};
  }

  MTCORE_DISPATCH_FLOATS(logits.scalar_type(), "seg_ce_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_opts = acc_options<acc_t>(logits);
    at::Tensor weight;
    at::Tensor weight_sum;
    const acc_t* w_ptr = nullptr;
    const acc_t* ws_ptr = nullptr;
    if (weight_in.has_value() && weight_in->defined()) {
      const at::Tensor& w = *weight_in;
      check_cuda(w, kOp, "weight");
      check_same_device(w, logits_in, kOp, "weight", "logits");
      check_float(w, kOp, "weight");
      TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == C, kOp,
                        ": weight must be 1-d with one entry per class (", C, "), got shape ",
                        w.sizes());
      weight = w.to(acc_opts.dtype()).contiguous();
      weight_sum = weight.sum();
      w_ptr = weight.data_ptr<acc_t>();
      ws_ptr = weight_sum.data_ptr<acc_t>();
    }
    at::Tensor scale_holder;
    const acc_t* gs_ptr = scale_ptr<acc_t>(grad_scale, scale_holder);
    const cudaStream_t st = stream();

    // pass 1: targets only -> denominator of the mean and validation
    const bool sync_check = !capturing();
    const int denom_blocks = num_blocks(P);
    at::Tensor denom_partials = at::empty({denom_blocks}, acc_opts);
    at::Tensor denom = at::empty({}, acc_opts);
    at::Tensor first_bad = at::full({}, P, target.options());
    seg_ce_denom_kernel<acc_t><<<denom_blocks, kThreads, 0, st>>>(
        target.data_ptr<int64_t>(), w_ptr, P, C, ignore_index, !sync_check,
        reinterpret_cast<unsigned long long*>(first_bad.data_ptr<int64_t>()),
        denom_partials.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sum_partials_kernel<acc_t><<<1, kThreads, 0, st>>>(denom_partials.data_ptr<acc_t>(),
                                                       denom_blocks, denom.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (sync_check) {  // one small device->host copy; skipped under CUDA-graph capture
      const int64_t bad = first_bad.item<int64_t>();
      if (bad < P) {
        const int64_t value = target.view({-1})[bad].item<int64_t>();
        TORCH_CHECK_VALUE(false, kOp, ": target holds class index ", value, ", outside [0, ", C,
                          ") and not ignore_index=", ignore_index);
      }
    }

    // pass 2: loss and gradient
    const CeArgs args{P, C, S, ignore_index, static_cast<int>(reduction), compute_grad};
    const acc_t eps = static_cast<acc_t>(label_smoothing);
    scalar_t* loss_none = reduction == 0 ? loss.data_ptr<scalar_t>() : nullptr;
    scalar_t* grad_ptr = compute_grad ? grad.data_ptr<scalar_t>() : nullptr;
    int blocks;
    at::Tensor partials;
    if (S == 1) {
      blocks = num_blocks(P, kWarpsPerBlock);
      partials = at::empty({blocks}, acc_opts);
      seg_ce_rows_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, st>>>(
          logits.data_ptr<scalar_t>(), target.data_ptr<int64_t>(), w_ptr, ws_ptr,
          denom.data_ptr<acc_t>(), gs_ptr, args, eps, loss_none, partials.data_ptr<acc_t>(),
          grad_ptr);
    } else {
      blocks = num_blocks(P);
      partials = at::empty({blocks}, acc_opts);
      seg_ce_spatial_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, st>>>(
          logits.data_ptr<scalar_t>(), target.data_ptr<int64_t>(), w_ptr, ws_ptr,
          denom.data_ptr<acc_t>(), gs_ptr, args, eps, loss_none, partials.data_ptr<acc_t>(),
          grad_ptr);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (reduction != 0 && acc_loss) {
      seg_ce_finalize_kernel<acc_t, acc_t><<<1, kThreads, 0, st>>>(
          partials.data_ptr<acc_t>(), blocks, denom.data_ptr<acc_t>(), reduction == 1,
          loss.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (reduction != 0) {
      seg_ce_finalize_kernel<scalar_t, acc_t><<<1, kThreads, 0, st>>>(
          partials.data_ptr<acc_t>(), blocks, denom.data_ptr<acc_t>(), reduction == 1,
          loss.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {loss, grad};
}

namespace {

std::tuple<at::Tensor, at::Tensor> seg_ce_fwd_cuda(const at::Tensor& logits,
                                                   const at::Tensor& target,
                                                   const c10::optional<at::Tensor>& weight,
                                                   int64_t ignore_index, double label_smoothing,
                                                   int64_t reduction, bool compute_grad) {
  return seg_ce_impl(logits, target, weight, ignore_index, label_smoothing, reduction,
                     compute_grad, at::Tensor());
}

}  // namespace
}  // namespace mtcore::cuda_impl

TORCH_LIBRARY_IMPL(mtcore, CUDA, m) {
  m.impl("seg_ce_fwd", &mtcore::cuda_impl::seg_ce_fwd_cuda);
}
