// The weight fold of upsample_conv2d on CPU (mtcore/kernels/ops/upsample_conv.py has the math):
// a 3x3 kernel w [Cout, Cin, 3, 3] -> the stride-2 transposed-convolution kernel K [Cin, Cout, 4, 4]
// with K[i, o, y, x] = sum_{a, b} F[y][a] F[x][b] w[o, i, a, b], F = the 4x3 0/1 tap map
// ([w2, w1 + w2, w0 + w1, w0] per axis); and its transpose, dw[o, i, a, b] = sum F[y][a] F[x][b]
// dK[i, o, y, x] (the fold's backward). Both are a few adds per value; through ATen (two batched
// 3x3 matrix products forward, two more backward) they cost ~0.1-0.5 ms a call at the decoders'
// sizes, more than the transposed convolution saves on a small layer.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace mtcore {
namespace {

void check_fold(const char* op, const at::Tensor& t, const char* name, int64_t k) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor for the cpp backend, got one on ",
                    t.device());
  auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, op, ": ", name,
                   " must be float32, float64, bfloat16 or float16, got ", st);
  TORCH_CHECK_VALUE(t.dim() == 4 && t.size(2) == k && t.size(3) == k, op, ": ", name, " must be [*, *, ", k, ", ", k,
                    "], got shape ", t.sizes());
}

// Per axis: the 3x3 tap(s) each of the 4 transposed taps sums (-1: none).
constexpr int kTapA[4] = {2, 1, 0, 0};
constexpr int kTapB[4] = {-1, 2, 1, -1};

at::Tensor upsample_fold_cpu(const at::Tensor& w_in) {
  check_fold("upsample_fold", w_in, "weight", 3);
  const at::Tensor w = w_in.contiguous();
  const int64_t O = w.size(0), I = w.size(1);
  at::Tensor k = at::empty({I, O, 4, 4}, w.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "mtcore_upsample_fold", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* kp = k.data_ptr<scalar_t>();
    at::parallel_for(0, O * I, 256, [&](int64_t b, int64_t e) {
      for (int64_t oi = b; oi < e; ++oi) {
        const int64_t o = oi / I, i = oi % I;
        const scalar_t* src = wp + oi * 9;
        A rows[4][3];  // the row fold: rows[y][col]
        for (int y = 0; y < 4; ++y)
          for (int c = 0; c < 3; ++c)
            rows[y][c] = static_cast<A>(src[kTapA[y] * 3 + c]) +
                         (kTapB[y] >= 0 ? static_cast<A>(src[kTapB[y] * 3 + c]) : A(0));
        scalar_t* dst = kp + (i * O + o) * 16;
        for (int y = 0; y < 4; ++y)
          for (int x = 0; x < 4; ++x)
            dst[y * 4 + x] = static_cast<scalar_t>(rows[y][kTapA[x]] + (kTapB[x] >= 0 ? rows[y][kTapB[x]] : A(0)));
      }
    });
  });
  return k;
}

at::Tensor upsample_fold_backward_cpu(const at::Tensor& dk_in) {
  check_fold("upsample_fold_backward", dk_in, "grad", 4);
  const at::Tensor dk = dk_in.contiguous();
  const int64_t I = dk.size(0), O = dk.size(1);
  at::Tensor dw = at::zeros({O, I, 3, 3}, dk.options().dtype(dk.scalar_type()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dk.scalar_type(), "mtcore_upsample_fold_bwd", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* gp = dk.const_data_ptr<scalar_t>();
    scalar_t* wp = dw.data_ptr<scalar_t>();
    at::parallel_for(0, O * I, 256, [&](int64_t b, int64_t e) {
      for (int64_t oi = b; oi < e; ++oi) {
        const int64_t o = oi / I, i = oi % I;
        const scalar_t* src = gp + (i * O + o) * 16;
        A acc[3][3] = {};
        for (int y = 0; y < 4; ++y)
          for (int x = 0; x < 4; ++x) {
            const A g = static_cast<A>(src[y * 4 + x]);
            for (int ra : {kTapA[y], kTapB[y]}) {
              if (ra < 0) continue;
              acc[ra][kTapA[x]] += g;
              if (kTapB[x] >= 0) acc[ra][kTapB[x]] += g;
            }
          }
        scalar_t* dst = wp + oi * 9;
        for (int a = 0; a < 3; ++a)
          for (int c = 0; c < 3; ++c) dst[a * 3 + c] = static_cast<scalar_t>(acc[a][c]);
      }
    });
  });
  return dw;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mtcore, m) {
  m.def("upsample_fold(Tensor weight) -> Tensor");
  m.def("upsample_fold_backward(Tensor grad) -> Tensor");
}

TORCH_LIBRARY_IMPL(mtcore, CPU, m) {
  m.impl("upsample_fold", &upsample_fold_cpu);
  m.impl("upsample_fold_backward", &upsample_fold_backward_cpu);
}

}  // namespace mtcore
