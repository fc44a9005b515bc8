"""Reference: Natural GaLore's natural-gradient transform of the low-rank gradient (pure PyTorch).

The contract of ``kernels/natural_galore.py``. Natural GaLore (arXiv 2410.16029) replaces
the projected gradient g (k values, flattened row-major) by the damped natural gradient

    ñ = (λI + F Fᵀ)⁻¹ g,      F = [h_1 … h_s]  (k×s): the last s gradients, g included,

through Woodbury's identity, without a k×k matrix. The authors' code
(selfsupervised-ai/Natural-GaLore, ``GaLoreProjectorTensor._natural_gradient_transform``)
does, per step and per parameter:

    append g to the history, dropping the oldest beyond s        (first in, first out)
    S = I + λ⁻¹ FᵀF;  c = S⁻¹ (Fᵀg) by Cholesky
    ñ = λ⁻¹ g − λ⁻² F c                                         (λ = 1e-3, no 1/s factor)

and then ``SubSpaceAdamW`` runs GaLore's AdamW on ñ (same bias correction, scale and
decoupled weight decay). This module reproduces that with these deliberate changes, none
of which alters the exact-arithmetic result:

* **Storage.** The history is a ring buffer ``grad_history`` (s, *low-rank shape) in
  ``history_dtype`` (fp32 or bf16), zero-filled until s vectors have entered. A zero
  column adds nothing to F Fᵀ, so a partial history gives the authors' result with their
  shorter F. ``history_count`` (int64 0-d device tensor) counts the vectors entered; the
  newest sits in slot ``(count - 1) % s``. Nothing synchronizes with the host.
* **Gram kept incrementally.** ``history_gram`` = FᵀF (s×s, fp64). When h enters slot j,
  row and column j are overwritten with the s fresh dot products hᵢ·h: O(s·k), not
  O(s²·k). Every entry is the dot product of two stored vectors, computed once from the
  vectors themselves and never updated by accumulation, so there is no drift to re-
  orthogonalize: the Gram equals a full recomputation up to the summation order of one
  dot product (tested to 1e-12 after many wraps of the ring).
* **Precision of the s-sized parts.** The authors solve in the gradient's dtype. With
  λ = 1e-3 that loses everything once |g|²/λ approaches 1/ε: g is in span(F), so ñ is a
  small difference of large terms (for s = 1, ñ = g/(λ + |g|²) out of λ⁻¹g − …). Here the
  dot products are accumulated, the s×s system solved and the combination formed in fp64;
  only the k-sized data stays in ``history_dtype``/fp32 and ñ is rounded to fp32 once.
  Measured against a dense fp64 solve (k = 35, s = 4): the authors' fp32 arithmetic is off
  by 1e-6, 7.5e-5, 7.2e-3 and 1.0 relative for gradient entries of scale 0.01, 0.1, 1 and
  10; this form by under 5e-8 at every scale.
* **Scaling.** The system is solved as (λI + FᵀF) u = Fᵀg, so ñ = λ⁻¹(g − F u); that is
  the authors' S c = Fᵀg with c = λu.
* **bf16 history.** F holds the stored (rounded) vectors, and the current gradient enters
  the solve as stored too, so that it lies in span(F) as in exact arithmetic: the 2^-9
  part of an unrounded g outside span(F) would be multiplied by 1/λ (measured: ñ off by
  1.7e3 relative, against 3.2e-3 this way; test_natural_galore.py). For an fp32 history
  the stored g is g and this is exactly the formula above.
* **Non-finite gradients.** A g with a NaN or Inf does not enter the history (the ring,
  the Gram and the count stay bit-identical) and ñ is then non-finite, so the AdamW step
  that follows skips the update as for any non-finite gradient.

Refresh of the projector (``history_on_refresh``): ``keep`` (the authors': old vectors stay
in the old basis), ``reset`` (empty the history) or ``rotate`` (map every stored vector
into the new basis, h ← P_newᵀP_old h for a left projection, h ← h Q_old Q_newᵀ for a
right one, both for ``full``, then recompute the Gram): see ``on_refresh``.
"""

from __future__ import annotations

import torch

HISTORY_DTYPES = (torch.float32, torch.bfloat16)
HISTORY_ON_REFRESH = ("keep", "reset", "rotate")
# Columns of F per block when the Gram is recomputed in full: bounds the fp64 copy.
_GRAM_CHUNK = 1 << 16


def new_history(
    low_rank_shape: tuple[int, ...], natural_history: int, history_dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    """Empty history state: ``grad_history`` (s, *shape), ``history_gram`` (s, s) fp64, ``history_count``."""
    return {
        "grad_history": torch.zeros((natural_history, *low_rank_shape), dtype=history_dtype, device=device),
        "history_gram": torch.zeros((natural_history, natural_history), dtype=torch.float64, device=device),
        "history_count": torch.zeros((), dtype=torch.int64, device=device),
    }


def gram_of(grad_history: torch.Tensor) -> torch.Tensor:
    """FᵀF (s×s, fp64) recomputed from the stored vectors, in column blocks."""
    vectors = grad_history.reshape(grad_history.shape[0], -1)
    gram = torch.zeros((vectors.shape[0],) * 2, dtype=torch.float64, device=vectors.device)
    for start in range(0, vectors.shape[1], _GRAM_CHUNK):
        block = vectors[:, start : start + _GRAM_CHUNK].double()
        gram += block @ block.t()
    return gram


@torch.no_grad()
def natural_gradient(
    low_rank_grad: torch.Tensor,
    grad_history: torch.Tensor,
    history_gram: torch.Tensor,
    history_count: torch.Tensor,
    *,
    damping: float,
) -> torch.Tensor:
    """Enters ``low_rank_grad`` into the history (in place) and returns ñ = (λI + FFᵀ)⁻¹ g.

    low_rank_grad: any float dtype, shape ``grad_history.shape[1:]`` (k values).
    grad_history: (s, *low_rank_shape) fp32 or bf16. history_gram: (s, s) fp64 = FᵀF.
    history_count: int64 0-d tensor, vectors entered so far. damping: λ > 0.
    Returns ñ in fp32, shaped like ``low_rank_grad``.
    """
    size = grad_history.shape[0]
    grad = low_rank_grad.float().reshape(-1)
    vectors = grad_history.view(size, -1)
    slot = (history_count % size).view(1)
    entering = grad.to(grad_history.dtype)
    finite = torch.isfinite(entering).all()  # a finite fp32 value can round to a bf16 Inf
    # Fᵀh against the vectors as they were; slot j's entry is then replaced by h·h.
    dots = vectors.double() @ entering.double()
    dots = dots.index_copy(0, slot, (entering.double() @ entering.double()).view(1))

    vectors.index_copy_(0, slot, torch.where(finite, entering, vectors.index_select(0, slot)[0]).view(1, -1))
    row = torch.where(finite, dots, history_gram.index_select(0, slot)[0])
    history_gram.index_copy_(0, slot, row.view(1, -1))
    history_gram.index_copy_(1, slot, row.view(-1, 1))
    history_count.add_(finite.to(history_count.dtype))

    system = history_gram + damping * torch.eye(size, dtype=torch.float64, device=history_gram.device)
    factor, _ = torch.linalg.cholesky_ex(system)
    coefficients = torch.cholesky_solve(dots.view(-1, 1), factor).view(-1)
    combination = vectors.double().t() @ coefficients
    natural = (entering.double() - combination) / damping
    return natural.float().view(low_rank_grad.shape)


@torch.no_grad()
def on_refresh(
    policy: str,
    grad_history: torch.Tensor,
    history_gram: torch.Tensor,
    history_count: torch.Tensor,
    *,
    old_projectors: tuple[torch.Tensor | None, torch.Tensor | None],
    new_projectors: tuple[torch.Tensor | None, torch.Tensor | None],
) -> None:
    """Apply ``history_on_refresh`` after a projector refresh, in place.

    old_projectors, new_projectors: ``(proj_left (m, r) | None, proj_right (r, n) | None)``.
    ``keep`` leaves the history alone; ``reset`` empties it; ``rotate`` maps each stored
    vector into the new basis (computed in fp32, stored in ``history_dtype``) and recomputes
    the Gram, whose entries the rotation changes (P_newᵀP_old is not orthogonal).
    """
    if policy not in HISTORY_ON_REFRESH:
        raise ValueError(f"history_on_refresh must be one of {HISTORY_ON_REFRESH}, got {policy!r}")
    if policy == "keep":
        return
    if policy == "reset":
        grad_history.zero_()
        history_gram.zero_()
        history_count.zero_()
        return
    (old_left, old_right), (new_left, new_right) = old_projectors, new_projectors
    rotated = grad_history.float()
    if new_left is not None:
        rotated = (new_left.t().float() @ old_left.float()) @ rotated
    if new_right is not None:
        rotated = rotated @ (old_right.float() @ new_right.t().float())
    grad_history.copy_(rotated)
    history_gram.copy_(gram_of(grad_history))
