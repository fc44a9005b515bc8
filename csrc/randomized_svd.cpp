// Device-agnostic ATen implementation of the randomized SVD; only the Gaussian sketch is per device.
#include "randomized_svd.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/full.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/linalg_cholesky_ex.h>
#include <ATen/ops/linalg_qr.h>
#include <ATen/ops/linalg_solve_triangular.h>
#include <ATen/ops/linalg_svd.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/randn.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <limits>

namespace galore_kernels {
namespace {

// A CholeskyQR pass leaves an orthogonality error of about eps * cond(Y)^2, where cond is taken
// after scaling Y's columns to unit norm (Cholesky is insensitive to column scaling). The
// smallest pivot ratio L_jj / ||y_j|| (how much of column j is new) bounds 1/cond from above;
// at 1e-3 the fp32 error stays around 0.06 or below, which the second pass removes.
constexpr double kMinCholeskyPivotRatio = 1e-3;

// Y = Q R with Q orthonormal columns and R upper triangular.
struct QRFactors {
  at::Tensor q;
  at::Tensor r;
};

// CholeskyQR repeated `passes` times (two give orthonormality to working precision, one gives a
// well-conditioned basis of the same span), falling back to Householder QR when a Gram matrix is
// not safely positive definite: rank-deficient, zero or non-finite Y. Householder always returns
// orthonormal columns, so the degenerate cases still yield valid bases. CholeskyQR is the default
// because it is GEMM-shaped (Gram, Cholesky of a k x k, triangular solve), which GPUs run far
// faster than the column-sequential Householder panels.
QRFactors orthonormalize(const at::Tensor& y, int passes) {
  at::Tensor q = y;
  at::Tensor r;
  at::Tensor healthy;
  for (int pass = 0; pass < passes; ++pass) {
    const at::Tensor gram = at::mm(q.t(), q);
    auto [lower, info] = at::linalg_cholesky_ex(gram, /*upper=*/false, /*check_errors=*/false);
    const at::Tensor upper = lower.t();
    q = at::linalg_solve_triangular(upper, q, /*upper=*/true, /*left=*/false);
    r = r.defined() ? at::mm(upper, r) : upper;
    // NaN (a zero column, a non-finite Y) compares false, so it counts as unhealthy too.
    const at::Tensor pivot_ratio = lower.diagonal().div(gram.diagonal().sqrt());
    const at::Tensor pass_healthy = info.eq(0).logical_and(pivot_ratio.min().ge(kMinCholeskyPivotRatio));
    healthy = healthy.defined() ? healthy.logical_and(pass_healthy) : pass_healthy;
  }
  // One host sync per factorization, not per pass: the passes are cheap next to the GEMMs with A.
  if (healthy.item<bool>()) {
    return {q, r};
  }
  auto [householder_q, householder_r] = at::linalg_qr(y, "reduced");
  return {householder_q, householder_r};
}

// Which space a basis spans: the column space of A (m, k) or its row space (n, k).
enum class Side { kLeft, kRight };

Side other(Side side) {
  return side == Side::kLeft ? Side::kRight : Side::kLeft;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> randomized_svd(
    const at::Tensor& A,
    int64_t rank,
    int64_t oversample,
    int64_t power_iters,
    int64_t seed,
    const std::optional<at::Tensor>& init,
    const GaussianSketchFn& gaussian_sketch) {
  TORCH_CHECK(A.dim() == 2, "randomized_svd: A must be 2-D, got ", A.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(A.scalar_type()), "randomized_svd: A must be floating point, got ", A.scalar_type());
  const int64_t m = A.size(0);
  const int64_t n = A.size(1);
  TORCH_CHECK(
      rank >= 1 && rank <= std::min(m, n), "randomized_svd: rank must be in [1, min(m, n)] = [1, ", std::min(m, n),
      "], got ", rank);
  TORCH_CHECK(oversample >= 0, "randomized_svd: oversample must be >= 0, got ", oversample);
  TORCH_CHECK(power_iters >= 0, "randomized_svd: power_iters must be >= 0, got ", power_iters);

  at::Tensor a = A.to(at::kFloat);
  // BLAS takes A and A^T as they are when either is contiguous; anything else would be copied by
  // every one of the 2 + 2 * power_iters products, so copy once here.
  if (!a.is_contiguous() && !a.t().is_contiguous()) {
    a = a.contiguous();
  }
  const at::TensorOptions options = a.options();
  const int64_t k = std::min(rank + oversample, std::min(m, n));

  // A basis on the left maps to the right through A^T, one on the right to the left through A.
  auto image = [&a](Side side, const at::Tensor& basis) {
    return side == Side::kLeft ? at::mm(a.t(), basis) : at::mm(a, basis);
  };
  // New columns of a basis on `side`: A or A^T applied to Gaussian vectors from the other side.
  auto sketch = [&](Side side, int64_t columns) {
    const int64_t rows = side == Side::kLeft ? n : m;
    return image(other(side), gaussian_sketch(rows, columns, static_cast<uint64_t>(seed), options));
  };

  // The factor produced by the final product has been through one more multiplication by A than
  // the basis it came from, so it is the more accurate of U and Vh. Cold starts aim it at the
  // smaller dimension, the side GaLore's default ("std") projects on, as torch.svd_lowrank does;
  // warm starts aim it at the side of the previous basis, which is the side the caller uses.
  Side final_side = m <= n ? Side::kLeft : Side::kRight;
  Side side = other(final_side);
  int64_t half_steps = 2 * power_iters;
  at::Tensor start;
  if (init.has_value()) {
    const at::Tensor& previous = *init;
    TORCH_CHECK(previous.dim() == 2, "randomized_svd: init must be 2-D, got ", previous.dim(), "-D");
    TORCH_CHECK(
        previous.device() == a.device(), "randomized_svd: init is on ", previous.device(), " but A is on ", a.device());
    at::Tensor prior;
    if (previous.size(0) == m) {
      side = Side::kLeft;
      prior = previous.to(at::kFloat);
    } else if (previous.size(1) == n) {
      side = Side::kRight;
      prior = previous.to(at::kFloat).t();
    } else {
      TORCH_CHECK(
          false, "randomized_svd: init of shape ", previous.sizes(), " is neither (", m, ", k0) nor (k0, ", n, ")");
    }
    TORCH_CHECK(prior.size(1) >= 1, "randomized_svd: init has no basis vectors");
    final_side = side;
    // The previous basis replaces the sketch product, and one more half step brings the final
    // product back to its side: 2 + 2 * power_iters products, as many as a cold start.
    half_steps += 1;
    // The leading columns of a previous basis are its most important ones.
    prior = prior.narrow(1, 0, std::min(prior.size(1), k));
    const int64_t extra = k - prior.size(1);
    start = extra > 0 ? at::cat({prior, sketch(side, extra)}, 1) : prior;
  } else {
    start = sketch(side, k);
  }

  // Power iterations: each half step maps the basis through A or A^T and re-orthonormalizes so
  // that the small singular directions are not lost to rounding. Intermediate bases only need to
  // be well conditioned (one CholeskyQR pass); the last one becomes part of U or Vh (two passes).
  at::Tensor basis = orthonormalize(start, half_steps == 0 ? 2 : 1).q;
  for (int64_t step = 0; step < half_steps; ++step) {
    const at::Tensor mapped = image(side, basis);
    side = other(side);
    basis = orthonormalize(mapped, step + 1 == half_steps ? 2 : 1).q;
  }
  TORCH_INTERNAL_ASSERT(side == other(final_side));

  // A restricted to `basis` in factored form: for a left basis Q, A^T Q = P R so A ~ Q R^T P^T; for a
  // right basis P, A P = Q R so A ~ Q R P^T. This product is the B = Q^T A of Halko et al., and
  // factoring it leaves only a k x k SVD instead of a k x n one.
  const QRFactors last = orthonormalize(image(side, basis), 2);
  if (!at::isfinite(last.r).all().item<bool>()) {
    // Non-finite A: LAPACK's SVD would fail to converge and raise; return NaNs for the caller to see.
    const double nan = std::numeric_limits<double>::quiet_NaN();
    return {at::full({m, rank}, nan, options), at::full({rank}, nan, options), at::full({rank, n}, nan, options)};
  }
  auto [small_u, singular_values, small_vh] = at::linalg_svd(last.r, /*full_matrices=*/false);
  const at::Tensor lead_u = small_u.narrow(1, 0, rank);
  const at::Tensor lead_v = small_vh.narrow(0, 0, rank).t();
  const at::Tensor s = singular_values.narrow(0, 0, rank).contiguous();
  if (side == Side::kLeft) {
    // R^T = V_r S U_r^T, so U = Q V_r and Vh = U_r^T P^T.
    return {at::mm(basis, lead_v), s, at::mm(lead_u.t(), last.q.t())};
  }
  return {at::mm(last.q, lead_u), s, at::mm(lead_v.t(), basis.t())};
}

at::Tensor gaussian_sketch_cpu(int64_t rows, int64_t cols, uint64_t seed, const at::TensorOptions& options) {
  // A private generator: reproducible from the seed and independent of torch.manual_seed.
  // Drawn on the host and copied where it is needed, which is how a build without nvcc
  // still serves CUDA tensors (the sketch is small next to the products with A).
  at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::randn({rows, cols}, generator, options.device(at::kCPU)).to(options.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> randomized_svd_cpu(
    const at::Tensor& A,
    int64_t rank,
    int64_t oversample,
    int64_t power_iters,
    int64_t seed,
    const std::optional<at::Tensor>& init) {
  return randomized_svd(A, rank, oversample, power_iters, seed, init, gaussian_sketch_cpu);
}

}  // namespace galore_kernels
