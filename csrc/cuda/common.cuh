// Shared helpers of mtcore's CUDA kernels: input checks, launch sizes, warp/block reductions,
// and the internal entry points that joint_loss.cu composes.
//
// Only light c10/cuda headers are included (not ATen/cuda/CUDAContext.h): that one pulls in the
// cuBLAS/cuSPARSE/cuSOLVER headers, which a bare CUDA toolkit (nvcc + cudart) does not ship.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Optional.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <tuple>

// float32, float64, bfloat16 and float16; all accumulate in at::opmath_type (float, or double).
#define MTCORE_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

namespace mtcore::cuda_impl {

constexpr int kThreads = 256;       // threads per block of every kernel (a multiple of 32)
constexpr int kWarpsPerBlock = kThreads / 32;

// ----------------------------------------------------------------------------- host helpers

// Upper bound on the grid of grid-stride kernels: 4 resident blocks per SM, cached per device.
inline int64_t max_blocks() {
  static std::atomic<int> cache[C10_COMPILE_TIME_MAX_GPUS] = {};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  int v = cache[dev].load(std::memory_order_relaxed);
  if (v == 0) {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    v = std::max(1, sms) * 4;
    cache[dev].store(v, std::memory_order_relaxed);
  }
  return v;
}

// Blocks for `work` items handled `per_block` at a time; at least 1 so a launch is always valid.
inline int num_blocks(int64_t work, int64_t per_block = kThreads) {
  const int64_t want = (work + per_block - 1) / per_block;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, max_blocks())));
}

inline cudaStream_t stream() { return at::cuda::getCurrentCUDAStream().stream(); }

// True while the current stream is being captured into a CUDA graph (no host syncs allowed).
inline bool capturing() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

template <typename acc_t>
inline at::TensorOptions acc_options(const at::Tensor& like) {
  return like.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
}

inline void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": ", name, " must be a CUDA tensor for the CUDA kernel, got ",
                    name, " on ", t.device(), " (shape ", t.sizes(),
                    "); move it with .cuda() or use backend='cpp' for CPU tensors");
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op,
                              const char* name, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ",
                    ref_name, " is on ", ref.device(), "; move them to one device");
}

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf,
                   op, ": ", name, " must be float32, float64, bfloat16 or float16, got ", s,
                   " (shape ", t.sizes(), ")");
}

// A float CUDA tensor: device and dtype checked, then made contiguous.
inline at::Tensor float_input(const at::Tensor& t, const char* op, const char* name) {
  check_cuda(t, op, name);
  check_float(t, op, name);
  return t.contiguous();
}

// ----------------------------------------------------------------------------- device helpers

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;  // every lane holds the warp's sum
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); the result is valid in thread 0.
// Safe to call repeatedly in one kernel (it syncs before reusing its shared buffer).
template <typename T>
__device__ __forceinline__ T block_sum(T v) {
  __shared__ T warp_totals[32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) warp_totals[warp] = v;
  __syncthreads();
  const int nwarps = blockDim.x >> 5;
  v = (warp == 0 && lane < nwarps) ? warp_totals[lane] : T(0);
  if (warp == 0) v = warp_sum(v);
  return v;
}

// Sums `n` per-block partials into out[0] (one block; deterministic, no atomics).
template <typename acc_t>
__global__ void sum_partials_kernel(const acc_t* __restrict__ partials, int n,
                                    acc_t* __restrict__ out) {
  acc_t v = 0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) v += partials[i];
  v = block_sum(v);
  if (threadIdx.x == 0) out[0] = v;
}

// Numerically stable softplus(x) = log(1 + exp(x)).
template <typename acc_t>
__device__ __forceinline__ acc_t softplus(acc_t x) {
  return (x > acc_t(0) ? x : acc_t(0)) + log1p(exp(-fabs(x)));
}

template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid(acc_t x) {
  return acc_t(1) / (acc_t(1) + exp(-x));
}

// The norm + activation ops (batch_norm_act.cu, pixel_norm_act.cu): x (or dy) a float CUDA
// tensor [N, C, ...]; act 0 (linear), 1 (relu) or 2 (lrelu), alpha >= 0 for lrelu; eps > 0.
inline void check_norm_act_input(const char* op, const at::Tensor& x, const char* name, int64_t act,
                                 double alpha, double eps) {
  check_cuda(x, op, name);
  check_float(x, op, name);
  TORCH_CHECK_VALUE(x.dim() >= 2, op, ": ", name, " must be [N, C, ...], got shape ", x.sizes());
  TORCH_CHECK_VALUE(act >= 0 && act <= 2, op, ": act must be 0 (linear), 1 (relu) or 2 (lrelu), got ",
                    act);
  TORCH_CHECK_VALUE(act != 2 || alpha >= 0, op, ": alpha must be >= 0 for lrelu, got ", alpha);
  TORCH_CHECK_VALUE(eps > 0, op, ": eps must be > 0, got ", eps);
}

// Their activation's slope below zero (linear 1, relu 0, lrelu alpha), and act'(v) from it.
template <typename acc_t>
inline acc_t norm_act_neg(int64_t act, double alpha) {
  return act == 0 ? acc_t(1) : (act == 1 ? acc_t(0) : static_cast<acc_t>(alpha));
}

template <typename acc_t>
__device__ __forceinline__ acc_t norm_act_slope(acc_t v, acc_t neg) {
  return v > acc_t(0) ? acc_t(1) : neg;
}

// ------------------------------------------------------------------------ internal entry points
// `grad_scale` (optional, a 1-element CUDA tensor) multiplies every gradient on the device without
// a host sync; joint_loss uses it to fold in d(total)/d(term_k). Undefined means 1.
// `acc_loss`: return the scalar loss(es) in the accumulation type (float for float/bf16/half)
// instead of the input dtype; joint_loss weighs the terms unrounded, as the CPU kernel does.

std::tuple<at::Tensor, at::Tensor> seg_ce_impl(const at::Tensor& logits, const at::Tensor& target,
                                               const c10::optional<at::Tensor>& weight,
                                               int64_t ignore_index, double label_smoothing,
                                               int64_t reduction, bool compute_grad,
                                               const at::Tensor& grad_scale, bool acc_loss = false);

// Returns (rec, kl, total, grad_recon, grad_mu, grad_logvar); kl grads are multiplied by
// grad_scale * kl_grad_factor (joint_loss passes beta: its VAE term is rec + beta * kl). The
// reconstruction runs in recon's dtype, the KL in mu's (as on the CPU).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> vae_loss_impl(
    const at::Tensor& recon, const at::Tensor& target, const at::Tensor& mu,
    const at::Tensor& logvar, double beta, int64_t recon_kind, bool compute_grad,
    const at::Tensor& grad_scale, double kl_grad_factor, bool acc_loss = false);

std::tuple<at::Tensor, at::Tensor> adv_loss_impl(const at::Tensor& logits, int64_t kind,
                                                 int64_t role, bool compute_grad,
                                                 const at::Tensor& grad_scale,
                                                 bool acc_loss = false);

// The grad_scale pointer for an accumulation type (nullptr when undefined).
template <typename acc_t>
inline const acc_t* scale_ptr(const at::Tensor& grad_scale, at::Tensor& holder) {
  if (!grad_scale.defined()) return nullptr;
  TORCH_CHECK(grad_scale.numel() == 1 && grad_scale.is_cuda(),
              "mtcore internal: grad_scale must be a 1-element CUDA tensor");
  holder = grad_scale.reshape({1}).to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  return holder.data_ptr<acc_t>();
}

}  // namespace mtcore::cuda_impl
