// CUDA parts of the randomized SVD: the Gaussian sketch, generated in place from the seed.
// at::randn with a seeded CUDA generator would also be reproducible, but its output depends on the
// generator's offset bookkeeping and launch shape across PyTorch versions; a counter-based kernel
// makes every sample a fixed function of (seed, index) and needs no generator object or lock.
#include "randomized_svd.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

namespace galore_kernels {
namespace {

constexpr int kThreadsPerBlock = 256;
// Enough blocks to fill any current GPU; the grid-stride loop covers larger sketches.
constexpr int64_t kMaxBlocks = 1 << 16;

// Philox4x32-10 (Salmon et al., SC'11), the generator behind cuRAND's and PyTorch's CUDA RNG.
__device__ __forceinline__ uint4 philox4x32_10(uint4 counter, uint2 key) {
  constexpr uint32_t kMul0 = 0xD2511F53u;
  constexpr uint32_t kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u;
  constexpr uint32_t kWeyl1 = 0xBB67AE85u;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = __umulhi(kMul0, counter.x);
    const uint32_t lo0 = kMul0 * counter.x;
    const uint32_t hi1 = __umulhi(kMul1, counter.z);
    const uint32_t lo1 = kMul1 * counter.z;
    counter = make_uint4(hi1 ^ counter.y ^ key.x, lo1, hi0 ^ counter.w ^ key.y, lo0);
    key.x += kWeyl0;
    key.y += kWeyl1;
  }
  return counter;
}

// Box-Muller on two 32-bit draws. The top 24 bits plus one half make u1 exact and strictly inside
// (0, 1), so the log never sees 0.
__device__ __forceinline__ float2 box_muller(uint32_t bits1, uint32_t bits2) {
  constexpr float kTwoPow24Inv = 1.0f / 16777216.0f;
  const float u1 = (static_cast<float>(bits1 >> 8) + 0.5f) * kTwoPow24Inv;
  const float u2 = static_cast<float>(bits2 >> 8) * kTwoPow24Inv;
  const float radius = sqrtf(-2.0f * logf(u1));
  float sin_theta;
  float cos_theta;
  sincospif(2.0f * u2, &sin_theta, &cos_theta);
  return make_float2(radius * cos_theta, radius * sin_theta);
}

// Each thread draws four normals from one Philox call, with the group index as the counter.
__global__ void gaussian_fill_kernel(float* __restrict__ out, int64_t numel, uint2 key) {
  const int64_t groups = (numel + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t group = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; group < groups; group += stride) {
    const uint4 bits = philox4x32_10(
        make_uint4(static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32), 0u, 0u), key);
    const float2 first = box_muller(bits.x, bits.y);
    const float2 second = box_muller(bits.z, bits.w);
    const int64_t base = group * 4;
    if (base + 4 <= numel) {
      // out comes from the caching allocator (256-byte aligned) and base is a multiple of 4.
      reinterpret_cast<float4*>(out)[group] = make_float4(first.x, first.y, second.x, second.y);
    } else {
      const float values[4] = {first.x, first.y, second.x, second.y};
      for (int64_t i = base; i < numel; ++i) {
        out[i] = values[i - base];
      }
    }
  }
}

}  // namespace

at::Tensor gaussian_sketch_cuda(int64_t rows, int64_t cols, uint64_t seed, const at::TensorOptions& options) {
  at::Tensor sketch = at::empty({rows, cols}, options.dtype(at::kFloat));
  const int64_t numel = sketch.numel();
  if (numel == 0) {
    return sketch;
  }
  const int64_t groups = (numel + 3) / 4;
  const int64_t blocks = std::min((groups + kThreadsPerBlock - 1) / kThreadsPerBlock, kMaxBlocks);
  const uint2 key = make_uint2(static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  gaussian_fill_kernel<<<static_cast<unsigned int>(blocks), kThreadsPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
      sketch.data_ptr<float>(), numel, key);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return sketch;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> randomized_svd_cuda(
    const at::Tensor& A,
    int64_t rank,
    int64_t oversample,
    int64_t power_iters,
    int64_t seed,
    const std::optional<at::Tensor>& init) {
  // Custom ops get no device guard from the dispatcher; the sketch kernel runs on the current device.
  const c10::cuda::CUDAGuard device_guard(A.device());
  return randomized_svd(A, rank, oversample, power_iters, seed, init, gaussian_sketch_cuda);
}

}  // namespace galore_kernels
