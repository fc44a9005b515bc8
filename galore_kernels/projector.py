"""When and how a GaLore projector is refreshed; owns the SVD choice.

A projector is one or two matrices with orthonormal columns (left: P, m×r) or
rows (right: Q, r×n) spanning the top-r singular subspace of a gradient, computed
in fp32 and kept in the parameter's ``projector_dtype``. The optimizer keeps them as
plain tensors in its state, so checkpoints load with ``torch.load(weights_only=True)``;
this module holds the stateless rules.
"""

from __future__ import annotations

import warnings

import torch

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
SVD_METHODS = ("randomized", "exact")

MATMUL_PRECISIONS = ("tf32x3", "ieee")
"""How the Triton kernels multiply fp32 operands of a projection (``tl.dot``'s
``input_precision``): "tf32x3" splits each operand into a TF32 head and tail and sums
three TF32 tensor-core products (about fp32's accuracy, several times IEEE's FMA
throughput on an H100); "ieee" is the FMA dot on the CUDA cores. 16-bit operands
always multiply in their dtype. The PyTorch reference multiplies in IEEE fp32 either way,
and so does Triton's interpreter (numpy), whatever is asked."""


def check_matmul_precision(matmul_precision) -> None:
    if matmul_precision not in MATMUL_PRECISIONS:
        raise ValueError(f"matmul_precision must be one of {MATMUL_PRECISIONS}, got {matmul_precision!r}")


def projector_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype a projector is kept in: a 16-bit parameter's own, as galore-torch does, else fp32.

    The kernels multiply a 16-bit parameter's gradient and update with the projector
    rounded to that dtype anyway; rounding it once per refresh instead of in every tile
    halves its reads and shared memory and the state it takes. The SVD runs in fp32.
    """
    return param_dtype if param_dtype in (torch.bfloat16, torch.float16) else torch.float32

_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Warn the first time ``key`` is seen in this process, and never again."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def projection_side(proj_type: str, shape: tuple[int, int]) -> str:
    """galore-torch's side rule: 'left' (R = PᵀG), 'right' (R = G Qᵀ) or 'full'.

    ``std`` projects the larger dimension away (right when m >= n), ``reverse_std``
    the smaller one; ``left``, ``right`` and ``full`` force it.
    """
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("left", "right", "full"):
        return proj_type
    raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")


def side_of(proj_left, proj_right) -> str | None:
    """'left', 'right' or 'full' from which projectors a step is given; None without any."""
    if proj_left is not None and proj_right is not None:
        return "full"
    if proj_left is not None:
        return "left"
    if proj_right is not None:
        return "right"
    return None


def low_rank_shape(shape: tuple[int, int], side: str, rank: int) -> tuple[int, int]:
    """Shape of the projected gradient of an (m, n) matrix."""
    m, n = shape
    return {"left": (rank, n), "right": (m, rank), "full": (rank, rank)}[side]


def refresh_due(step: int, update_proj_gap: int, offset: int = 0) -> bool:
    """galore-torch refreshes when ``step % gap == 0`` (step counted before the update).

    ``offset`` staggers parameters across the gap so no single step pays for all.
    """
    return (step + offset) % update_proj_gap == 0


def stagger_offset(param_index: int, num_params: int, update_proj_gap: int) -> int:
    """Evenly spaced refresh phases: parameter i refreshes at steps ≡ -i·gap/N (mod gap)."""
    return (param_index * update_proj_gap) // max(num_params, 1)


def refresh_seed(base_seed: int, param_index: int, step: int) -> int:
    """A 63-bit seed from (optimizer seed, parameter index, step), splitmix64-mixed.

    Derived, never stored: a resumed run draws the same sketch as the uninterrupted one.
    """
    mask = (1 << 64) - 1
    z = (base_seed * 0x9E3779B97F4A7C15 + param_index * 0xBF58476D1CE4E5B9 + step * 0x94D049BB133111EB) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def _identity_basis(rows: int, rank: int, device: torch.device) -> torch.Tensor:
    return torch.eye(rows, rank, dtype=torch.float32, device=device)


def _align_signs(U: torch.Tensor, Vh: torch.Tensor, prev_left: torch.Tensor | None, prev_right: torch.Tensor | None):
    """Fix the sign of each singular pair, which an SVD leaves arbitrary.

    Against the previous projector when there is one, so that a moment row keeps
    its meaning across a refresh where the subspace barely moved; otherwise by
    making each left vector's largest entry positive. Either way the result is a
    continuous function of the gradient: a randomized SVD's signs otherwise depend
    on its internal basis, and a rounding-level change of the input can flip them.
    """
    if prev_left is not None and prev_left.shape == U.shape:
        agreement = (U * prev_left).sum(dim=0)
    elif prev_right is not None and prev_right.shape == Vh.shape:
        agreement = (Vh * prev_right).sum(dim=1)
    else:
        agreement = U.gather(0, U.abs().argmax(dim=0, keepdim=True)).squeeze(0)
    signs = torch.where(agreement < 0, -1.0, 1.0)
    return U * signs, Vh * signs[:, None]


def _singular_bases(matrix: torch.Tensor, rank: int, svd: str, seed: int, previous):
    if svd == "exact":
        # galore-torch's call, kept exactly: a full thin SVD of the fp32 gradient.
        U, _, Vh = torch.linalg.svd(matrix, full_matrices=False)
        return U[:, :rank], Vh[:rank]
    from .svd import DEFAULT_POWER_ITERS, randomized_svd

    # A 16-bit parameter's projectors are stored in its dtype; the SVD works in fp32.
    prev_left, prev_right = (None if t is None else t.float() for t in previous)
    init = prev_left if prev_left is not None else prev_right
    # Gradient subspaces drift slowly, so starting from the previous projector is
    # worth more than an iteration: at 2048×5504, rank 256, warm with one iteration
    # captures 0.9988 of the energy in 176 ms, cold with two 0.9953 in 242 ms
    # (bench/results/svd-cpu-2026-11-25.md).
    power_iters = DEFAULT_POWER_ITERS if init is None else DEFAULT_POWER_ITERS - 1
    U, _, Vh = randomized_svd(matrix, rank, seed=seed, init=init, power_iters=power_iters)
    return _align_signs(U, Vh, prev_left, prev_right)


def compute_projectors(
    grad: torch.Tensor,
    rank: int,
    side: str,
    *,
    svd: str = "randomized",
    seed: int = 0,
    previous: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """New ``(proj_left (m, r) | None, proj_right (r, n) | None)`` for an (m, n) gradient.

    The randomized SVD warm-starts from the previous projector when there is one,
    and its singular vectors' signs are aligned with it (see ``_align_signs``).
    A gradient with NaN/Inf, or an SVD that fails to converge, never raises: the
    previous projector is kept (at the first refresh, the leading coordinate axes,
    a valid orthonormal basis), with one warning per process.
    """
    if svd not in SVD_METHODS:
        raise ValueError(f"svd must be one of {SVD_METHODS}, got {svd!r}")
    if side not in ("left", "right", "full"):
        raise ValueError(f"side must be one of ('left', 'right', 'full'), got {side!r}")
    if grad.dim() != 2:
        raise ValueError(f"the gradient must be a matrix, got shape {tuple(grad.shape)}")
    m, n = grad.shape
    # The optimizers clamp rank to min(m, n); an exact SVD would silently return fewer directions.
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be an int in [1, {min(m, n)}] for a {m}x{n} gradient, got {rank!r}")
    matrix = grad.detach().float()
    prev_left, prev_right = previous

    def fallback(reason: str):
        warn_once(
            f"projector-{reason}",
            f"GaLore projector refresh skipped ({reason}); keeping the previous projector "
            "(the coordinate axes at the first refresh). This warning is shown once.",
        )
        left = prev_left if prev_left is not None else _identity_basis(m, rank, matrix.device)
        right = prev_right if prev_right is not None else _identity_basis(n, rank, matrix.device).t().contiguous()
        return (left if side in ("left", "full") else None), (right if side in ("right", "full") else None)

    # One host synchronization, on refresh steps only.
    if not bool(torch.isfinite(matrix).all()):
        return fallback("non-finite gradient")
    try:
        U, Vh = _singular_bases(matrix, rank, svd, seed, previous)
    except torch.linalg.LinAlgError:
        return fallback("SVD did not converge")
    left = U.contiguous() if side in ("left", "full") else None
    right = Vh.contiguous() if side in ("right", "full") else None
    return left, right


# ------------------------------------------------------------- the schedule

REFRESH_SCHEDULES = ("fixed", "adaptive")

ADAPTIVE_THRESHOLD = 0.16
"""Q-GaLore (arXiv 2407.08296) doubles the gap while the cosine similarity of consecutive
projectors stays >= 0.4; a cosine c per direction is an overlap c², so 0.4² here."""

MAX_GAP_FACTOR = 8
"""``max_update_proj_gap`` defaults to this times ``update_proj_gap``: three doublings."""


def adaptive_gap(gap: int, overlap: float, *, threshold: float, min_gap: int, max_gap: int) -> int:
    """The next gap of the adaptive schedule: doubled (up to ``max_gap``) while the new
    projector's overlap with the old one exceeds ``threshold``, halved (down to ``min_gap``) otherwise."""
    if overlap > threshold:
        return min(2 * gap, max_gap)
    return max(gap // 2, min_gap)


def first_adaptive_refresh(step: int, gap: int, offset: int) -> int:
    """The step of the second refresh after the first one at ``step``: the next point of the
    fixed (staggered) schedule, so that staggered parameters start their doublings out of phase."""
    return step + gap - (step + offset) % gap


def fixed_refresh_count(steps: int, update_proj_gap: int, offset: int = 0) -> int:
    """Refreshes the fixed schedule makes in updates 0..steps-1: the first update, then every
    ``refresh_due`` step (``offset`` as in ``refresh_due``)."""
    if steps <= 0:
        return 0
    first_due = (-offset) % update_proj_gap
    due = 0 if first_due >= steps else (steps - 1 - first_due) // update_proj_gap + 1
    return due + (1 if first_due != 0 else 0)
