"""Randomized truncated SVD for GaLore projector refreshes: torch.ops.galore_kernels.randomized_svd.

Halko, Martinsson & Tropp (2011), Alg. 4.4 + 5.1: a Gaussian sketch of rank + oversample columns,
power iterations re-orthonormalized with CholeskyQR2 (Householder QR when CholeskyQR is unsafe),
then the SVD of a small (rank + oversample)^2 factor. The op lives in csrc/randomized_svd.cpp
(device-agnostic ATen code) and csrc/randomized_svd_cuda.cu (the counter-based Gaussian sketch).
"""

import operator
import warnings

import torch

# Chosen by measurement (2-core AMD EPYC, fp32, torch.set_num_threads(2); energy = captured energy
# of the rank-r basis, 1.0 for the exact truncated SVD; bench/bench_svd.py, bench/results/svd-cpu-*):
#   2048x5504, rank 256, singular values i^-0.5 + noise floor (slow decay, the hard case):
#     power_iters=1, oversample=8:   158 ms, energy 0.9840  (torch.svd_lowrank q=r+8 niter=1: 175 ms, 0.9836)
#     power_iters=2, oversample=8:   225 ms, energy 0.9932  (torch.svd_lowrank q=r+8 niter=2: 249 ms, 0.9932)
#     power_iters=2, oversample=32:  242 ms, energy 0.9953  (torch.linalg.svd: 3.8 s)
#     warm start, power_iters=0:     107 ms, energy 0.9978  (init = projector of a 5%-drifted matrix)
#   Weight gradients of small transformers (hidden 128 and 256, rank hidden/4 and hidden/16), whose
#   spectra are flat (sigma_r / sigma_2r of 1.1 to 1.6); energy of the worst layer (an LM head),
#   a one-off measurement while choosing the defaults (no results file holds it):
#     power_iters=1, oversample=8: 0.906   power_iters=2, oversample=8: 0.953
#     power_iters=3, oversample=8: 0.973   power_iters=2, oversample=32: 0.989
# Two power iterations are needed for 0.99 on slowly decaying spectra; past that, extra sketch
# columns buy more energy than a third iteration, for a quarter of its cost: +8% time at rank 256
# for oversample 32, about +33% (two more products of six) for power_iters 3. A warm start
# (init=previous projector) reaches higher energy still with power_iters=0: two products with A.
DEFAULT_OVERSAMPLE = 32
DEFAULT_POWER_ITERS = 2
# seed=None uses this fixed seed: refreshes are reproducible run to run unless asked otherwise.
DEFAULT_SEED = 0


def _load_extension():
    """Import galore_kernels._C, which registers torch.ops.galore_kernels.*; returns the error, if any."""
    try:
        from galore_kernels import _C  # noqa: F401
    except ImportError as error:
        return ImportError(
            f"galore_kernels._C, the compiled extension, is missing or was built for another torch ({error}); "
            f"build it against the installed torch {torch.__version__} from the repository root with "
            "`pip install --no-build-isolation -e .`"
        )
    return None


# Registered on import, as torchvision and torchao do, so that torch.ops users,
# torch.library introspection and torch.compile tracing see the operator at once.
_EXTENSION_ERROR = _load_extension()
if _EXTENSION_ERROR is not None:
    warnings.warn(f"{_EXTENSION_ERROR} randomized_svd is unavailable; svd='exact' still works.", stacklevel=2)
else:

    @torch.library.register_fake("galore_kernels::randomized_svd")
    def _randomized_svd_fake(A, rank, oversample, power_iters, seed, init):
        """Shapes and dtypes only, for tracing (FakeTensor, meta, torch.compile)."""
        m, n = A.shape
        return (A.new_empty((m, rank), dtype=torch.float32), A.new_empty((rank,), dtype=torch.float32),
                A.new_empty((rank, n), dtype=torch.float32))


def _load_ops():
    if _EXTENSION_ERROR is not None:
        raise _EXTENSION_ERROR
    return torch.ops.galore_kernels


def _as_int(name, value):
    """value as a Python int; numpy and 0-d integer tensors pass, floats and bools do not."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"randomized_svd: {name} must be an int, got {type(value).__name__}")


def randomized_svd(
    A,
    rank,
    *,
    oversample=DEFAULT_OVERSAMPLE,
    power_iters=DEFAULT_POWER_ITERS,
    seed=None,
    init=None,
):
    """Rank-`rank` truncated SVD of A, A ~ U @ diag(S) @ Vh.

    A: (m, n) floating tensor (fp32, bf16, fp16; CPU or CUDA). The work is done in fp32 and the
        outputs are fp32.
    rank: number of singular triplets, 1 <= rank <= min(m, n).
    oversample: extra sketch columns, k = min(rank + oversample, min(m, n)).
    power_iters: subspace iterations; each costs two products with A (m * n * k flops each).
    seed: the Gaussian sketch is a pure function of it, so the same A, seed and device give the
        same bits. None means DEFAULT_SEED (not a fresh random seed): refreshes stay deterministic.
        The global torch RNG is neither used nor advanced.
    init: warm start from a previous projector, which beats a cold start when the subspace drifts
        slowly (gradients between GaLore refreshes): a left basis (m, k0) such as a previous U, or a
        right basis (k0, n) such as a previous Vh; only its first rank + oversample vectors are used
        and any missing ones come from the Gaussian sketch. The shape decides the side; for a square
        A an init that fits both ways is taken as a left basis.

    Returns U: (m, rank), S: (rank,) descending and >= 0, Vh: (rank, n); U and Vh^T have
    orthonormal columns even for a zero or rank-deficient A. A non-finite A gives NaN outputs.
    """
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"randomized_svd: A must be a torch.Tensor, got {type(A).__name__}")
    if A.layout != torch.strided:
        raise TypeError(f"randomized_svd: A must be a dense (strided) tensor, got layout {A.layout}")
    if A.dim() != 2:
        raise ValueError(f"randomized_svd: A must be 2-D, got shape {tuple(A.shape)}")
    if not A.is_floating_point():
        raise TypeError(f"randomized_svd: A must be floating point, got {A.dtype}")
    m, n = A.shape
    rank = _as_int("rank", rank)
    oversample = _as_int("oversample", oversample)
    power_iters = _as_int("power_iters", power_iters)
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"randomized_svd: rank must be in [1, min(m, n)] = [1, {min(m, n)}], got {rank}")
    if oversample < 0:
        raise ValueError(f"randomized_svd: oversample must be >= 0, got {oversample}")
    if power_iters < 0:
        raise ValueError(f"randomized_svd: power_iters must be >= 0, got {power_iters}")
    seed = DEFAULT_SEED if seed is None else _as_int("seed", seed)
    if not -(2**63) <= seed < 2**63:
        raise ValueError(f"randomized_svd: seed must fit in a signed 64-bit int, got {seed}")
    if init is not None:
        if not isinstance(init, torch.Tensor):
            raise TypeError(f"randomized_svd: init must be a torch.Tensor or None, got {type(init).__name__}")
        if init.layout != torch.strided:
            raise TypeError(f"randomized_svd: init must be a dense (strided) tensor, got layout {init.layout}")
        if not init.is_floating_point():
            raise TypeError(f"randomized_svd: init must be floating point, got {init.dtype}")
        if init.dim() != 2 or not (init.shape[0] == m or init.shape[1] == n) or init.numel() == 0:
            raise ValueError(
                f"randomized_svd: init must be a left basis ({m}, k0) or a right basis (k0, {n}) with "
                f"k0 >= 1, got shape {tuple(init.shape)}"
            )
        if init.device != A.device:
            raise ValueError(f"randomized_svd: init is on {init.device} but A is on {A.device}")
    ops = _load_ops()
    return ops.randomized_svd(A, rank, oversample, power_iters, seed, init)
