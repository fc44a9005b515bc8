// The operator schemas of torch.ops.galore_kernels and their per-device kernels, in one place.
#include "randomized_svd.h"

#include <torch/library.h>

TORCH_LIBRARY(galore_kernels, m) {
  m.def(
      "randomized_svd(Tensor A, int rank, int oversample, int power_iters, int seed, Tensor? init)"
      " -> (Tensor U, Tensor S, Tensor Vh)");
}

TORCH_LIBRARY_IMPL(galore_kernels, CPU, m) {
  m.impl("randomized_svd", &galore_kernels::randomized_svd_cpu);
}

// A CUDA torch without nvcc (a plain pip install) still gets a working refresh: the
// device-agnostic algorithm with the host-drawn sketch. The CUDA build draws it on the device.
TORCH_LIBRARY_IMPL(galore_kernels, CUDA, m) {
#ifdef WITH_CUDA
  m.impl("randomized_svd", &galore_kernels::randomized_svd_cuda);
#else
  m.impl("randomized_svd", &galore_kernels::randomized_svd_cpu);
#endif
}
