// The weight fold of upsample_conv2d on CUDA; csrc/cpu/upsample_fold.cpp has the math. One thread
// per (output, input) channel pair: 3x3 taps -> the 4x4 transposed-convolution taps, and back.
#include "common.cuh"

namespace mtcore::cuda_impl {
namespace {

__device__ __constant__ int kFoldA[4] = {2, 1, 0, 0};
__device__ __constant__ int kFoldB[4] = {-1, 2, 1, -1};

template <typename scalar_t, typename acc_t>
__global__ void fold_kernel(const scalar_t* __restrict__ w, int64_t O, int64_t I, scalar_t* __restrict__ k) {
  for (int64_t oi = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; oi < O * I;
       oi += (int64_t)gridDim.x * blockDim.x) {
    const int64_t o = oi / I, i = oi % I;
    const scalar_t* src = w + oi * 9;
    acc_t rows[4][3];
    for (int y = 0; y < 4; ++y)
      for (int c = 0; c < 3; ++c)
        rows[y][c] = static_cast<acc_t>(src[kFoldA[y] * 3 + c]) +
                     (kFoldB[y] >= 0 ? static_cast<acc_t>(src[kFoldB[y] * 3 + c]) : acc_t(0));
    scalar_t* dst = k + (i * O + o) * 16;
    for (int y = 0; y < 4; ++y)
      for (int x = 0; x < 4; ++x)
        dst[y * 4 + x] = static_cast<scalar_t>(rows[y][kFoldA[x]] + (kFoldB[x] >= 0 ? rows[y][kFoldB[x]] : acc_t(0)));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void unfold_kernel(const scalar_t* __restrict__ g, int64_t O, int64_t I, scalar_t* __restrict__ dw) {
  for (int64_t oi = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; oi < O * I;
       oi += (int64_t)gridDim.x * blockDim.x) {
    const int64_t o = oi / I, i = oi % I;
    const scalar_t* src = g + (i * O + o) * 16;
    acc_t acc[3][3] = {};
    for (int y = 0; y < 4; ++y)
      for (int x = 0; x < 4; ++x) {
        const acc_t v = static_cast<acc_t>(src[y * 4 + x]);
        for (int t = 0; t < 2; ++t) {
          const int ra = t == 0 ? kFoldA[y] : kFoldB[y];
          if (ra < 0) continue;
          acc[ra][kFoldA[x]] += v;
          if (kFoldB[x] >= 0) acc[ra][kFoldB[x]] += v;
        }
      }
    scalar_t* dst = dw + oi * 9;
    for (int a = 0; a < 3; ++a)
      for (int c = 0; c < 3; ++c) dst[a * 3 + c] = static_cast<scalar_t>(acc[a][c]);
  }
}

at::Tensor upsample_fold_cuda(const at::Tensor& w_in) {
  const at::Tensor w = float_input(w_in, "upsample_fold", "weight");
  TORCH_CHECK_VALUE(w.dim() == 4 && w.size(2) == 3 && w.size(3) == 3,
                    "upsample_fold: weight must be [*, *, 3, 3], got shape ", w.sizes());
  const c10::cuda::CUDAGuard guard(w.device());
  const int64_t O = w.size(0), I = w.size(1);
  at::Tensor k = at::empty({I, O, 4, 4}, w.options());
  if (O * I == 0) return k;
  MTCORE_DISPATCH_FLOATS(w.scalar_type(), "upsample_fold_cuda", [&] {
    fold_kernel<scalar_t, at::opmath_type<scalar_t>><<<num_blocks(O * I), kThreads, 0, stream()>>>(
        w.data_ptr<scalar_t>(), O, I, k.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return k;
}

at::Tensor upsample_fold_backward_cuda(const at::Tensor& g_in) {
  const at::Tensor g = float_input(g_in, "upsample_fold_backward", "grad");
  TORCH_CHECK_VALUE(g.dim() == 4 && g.size(2) == 4 && g.size(3) == 4,
                    "upsample_fold_backward: grad must be [*, *, 4, 4], got shape ", g.sizes());
  const c10::cuda::CUDAGuard guard(g.device());
  const int64_t I = g.size(0), O = g.size(1);
  at::Tensor dw = at::empty({O, I, 3, 3}, g.options());
  if (O * I == 0) return dw;
  MTCORE_DISPATCH_FLOATS(g.scalar_type(), "upsample_fold_backward_cuda", [&] {
    unfold_kernel<scalar_t, at::opmath_type<scalar_t>><<<num_blocks(O * I), kThreads, 0, stream()>>>(
        g.data_ptr<scalar_t>(), O, I, dw.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dw;
}

}  // namespace
}  // namespace mtcore::cuda_impl

TORCH_LIBRARY_IMPL(mtcore, CUDA, m) {
  m.impl("upsample_fold", &mtcore::cuda_impl::upsample_fold_cuda);
  m.impl("upsample_fold_backward", &mtcore::cuda_impl::upsample_fold_backward_cuda);
}
