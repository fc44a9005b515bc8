// Randomized truncated SVD (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1) for GaLore projector refreshes.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <tuple>

namespace galore_kernels {

// Fills a (rows, cols) fp32 tensor on `options`' device with standard normal samples that are a
// pure function of `seed` (bitwise reproducible on one device, no global RNG state touched).
using GaussianSketchFn =
    std::function<at::Tensor(int64_t rows, int64_t cols, uint64_t seed, const at::TensorOptions& options)>;

// A: (m, n), any floating dtype; the work and the outputs are fp32.
// Returns U: (m, rank), S: (rank,) descending, Vh: (rank, n), with U and Vh^T orthonormal columns.
// init: optional warm start, a previous left basis (m, k0) or right basis (k0, n); a square A
// with an init that fits both ways is treated as a left basis.
std::tuple<at::Tensor, at::Tensor, at::Tensor> randomized_svd(
    const at::Tensor& A,
    int64_t rank,
    int64_t oversample,
    int64_t power_iters,
    int64_t seed,
    const std::optional<at::Tensor>& init,
    const GaussianSketchFn& gaussian_sketch);

at::Tensor gaussian_sketch_cpu(int64_t rows, int64_t cols, uint64_t seed, const at::TensorOptions& options);

std::tuple<at::Tensor, at::Tensor, at::Tensor> randomized_svd_cpu(
    const at::Tensor& A,
    int64_t rank,
    int64_t oversample,
    int64_t power_iters,
    int64_t seed,
    const std::optional<at::Tensor>& init);

#ifdef WITH_CUDA
at::Tensor gaussian_sketch_cuda(int64_t rows, int64_t cols, uint64_t seed, const at::TensorOptions& options);

std::tuple<at::Tensor, at::Tensor, at::Tensor> randomized_svd_cuda(
    const at::Tensor& A,
    int64_t rank,
    int64_t oversample,
    int64_t power_iters,
    int64_t seed,
    const std::optional<at::Tensor>& init);
#endif

}  // namespace galore_kernels
