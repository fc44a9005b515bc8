// CPU checks of torch.ops.galore_kernels.randomized_svd, called through the dispatcher so the
// schema and the CPU registration in ops.cpp are exercised too. No test framework: it cannot be
// downloaded here, and each check prints what failed and sets the exit status.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/eye.h>
#include <ATen/ops/linalg_qr.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/zeros.h>
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <optional>
#include <tuple>

namespace {

using SvdResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

int failures = 0;

void check(bool condition, const char* what) {
  std::printf("%s: %s\n", condition ? "ok  " : "FAIL", what);
  failures += condition ? 0 : 1;
}

SvdResult randomized_svd(
    const at::Tensor& a, int64_t rank, int64_t oversample, int64_t power_iters, int64_t seed,
    const std::optional<at::Tensor>& init) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("galore_kernels::randomized_svd", "")
          .typed<SvdResult(const at::Tensor&, int64_t, int64_t, int64_t, int64_t, const std::optional<at::Tensor>&)>();
  return op.call(a, rank, oversample, power_iters, seed, init);
}

// max |X^T X - I| for X with orthonormal columns.
double orthonormality_error(const at::Tensor& columns) {
  const at::Tensor gram = at::mm(columns.t(), columns);
  return gram.sub(at::eye(gram.size(0), gram.options())).abs().max().item<double>();
}

// A (m, n) with singular values decaying as i^-1, built from random orthonormal factors.
at::Tensor decaying_matrix(int64_t m, int64_t n, uint64_t seed) {
  at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(seed);
  const int64_t p = std::min(m, n);
  const at::Tensor left = std::get<0>(at::linalg_qr(at::randn({m, p}, generator, at::kFloat)));
  const at::Tensor right = std::get<0>(at::linalg_qr(at::randn({n, p}, generator, at::kFloat)));
  const at::Tensor spectrum = at::arange(1, p + 1, at::kFloat).reciprocal();
  return at::mm(left.mul(spectrum), right.t());
}

}  // namespace

int main() {
  // Orthonormality, ordering and the leading singular values, m < n and m > n.
  for (const auto& [m, n] : {std::pair<int64_t, int64_t>{96, 160}, {160, 96}}) {
    const at::Tensor a = decaying_matrix(m, n, 1);
    const int64_t rank = 12;
    const auto [u, s, vh] = randomized_svd(a, rank, 8, 2, 0, std::nullopt);
    check(u.sizes() == at::IntArrayRef({m, rank}) && s.sizes() == at::IntArrayRef({rank}) &&
              vh.sizes() == at::IntArrayRef({rank, n}),
          "output shapes");
    // fp32 CholeskyQR2 reaches orthogonality of a few ulps times sqrt(k).
    check(orthonormality_error(u) < 1e-5, "U has orthonormal columns");
    check(orthonormality_error(vh.t()) < 1e-5, "Vh^T has orthonormal columns");
    const at::Tensor steps = s.slice(0, 1).sub(s.slice(0, 0, -1));
    check(steps.le(0).all().item<bool>() && s.ge(0).all().item<bool>(), "S is descending and non-negative");
    // The exact spectrum is 1/i; with 8 extra columns and 2 power iterations the top values are tight.
    check(std::abs(s[0].item<double>() - 1.0) < 1e-4 && std::abs(s[rank - 1].item<double>() - 1.0 / rank) < 1e-2,
          "leading singular values match 1/i");
  }

  // Bitwise determinism for one seed; a different seed gives a different sketch.
  const at::Tensor a = at::randn({64, 80}, at::make_generator<at::CPUGeneratorImpl>(7), at::kFloat);
  const auto first = randomized_svd(a, 8, 4, 1, 123, std::nullopt);
  const auto again = randomized_svd(a, 8, 4, 1, 123, std::nullopt);
  const auto other = randomized_svd(a, 8, 4, 1, 124, std::nullopt);
  check(std::get<0>(first).equal(std::get<0>(again)) && std::get<1>(first).equal(std::get<1>(again)) &&
            std::get<2>(first).equal(std::get<2>(again)),
        "same seed gives identical bits");
  check(!std::get<0>(first).equal(std::get<0>(other)), "a different seed gives a different result");

  // A zero matrix takes the Householder fallback and still returns orthonormal bases.
  const auto [zero_u, zero_s, zero_vh] = randomized_svd(at::zeros({40, 30}, at::kFloat), 5, 3, 1, 0, std::nullopt);
  check(zero_s.abs().max().item<double>() == 0.0, "zero matrix has zero singular values");
  check(orthonormality_error(zero_u) < 1e-5 && orthonormality_error(zero_vh.t()) < 1e-5,
        "zero matrix still gives orthonormal bases");

  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
