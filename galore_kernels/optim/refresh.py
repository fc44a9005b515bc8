"""What happens to the moments when a projector is refreshed (``moments_on_refresh``).

The moments of a GaLore parameter live in the coordinates of its projector: row i
of ``m`` (left) is the momentum along the old direction i. After a refresh the
step reads them against the new directions, the mismatch of galore-torch #54.
Three policies:

* ``"keep"``: read them as they are (galore-torch's behaviour);
* ``"reset"``: zero them and restart their bias correction;
* ``"rotate"``: carry them into the new basis through the transitions
  ``T_left = P_newᵀ P_old`` (r×r) and ``T_right = Q_new Q_oldᵀ`` (r×r), i.e.
  ``m' = T_left m T_rightᵀ`` (SubTrack++ arXiv 2502.01586, LDAdam arXiv 2410.16103).

The second moment is not linear in the basis, so it needs a rule that keeps it
non-negative. Two are implemented (``SECOND_MOMENT_RULES``); the quality study
(``bench/bench_quality.py``) found ``"square"`` the better, and the optimizers use it:

* ``"subtrack"`` (SubTrack++): ``v' = T²(v − m²)⁺ + (T m)²``, rotating the
  variance ``v − m²`` as uncorrelated coordinates and the mean exactly; the
  variance is clamped at 0 because EMAs with different betas do not guarantee
  ``v ≥ m²``. Both terms are non-negative.
* ``"square"``: ``v' = T² v`` (element-wise squares of T): each new coordinate
  mixes the old ones' second moments with the squared weights, non-negative.

For ``full`` both sides apply: ``T²`` means ``T_left² · (·) · (T_right²)ᵀ``.
8-bit moments are dequantized, rotated in fp32 and requantized with fresh
absmaxes (``rotate_adam_state``). Cost: a few r×r by r×n products per parameter
per refresh, negligible beside the SVD that made the new projector.
"""

from __future__ import annotations

import torch

from .. import quant

MOMENT_POLICIES = ("keep", "reset", "rotate")
SECOND_MOMENT_RULES = ("subtrack", "square")


def transitions(old: tuple, new: tuple) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(T_left = P_newᵀ P_old | None, T_right = Q_new Q_oldᵀ | None)`` from (proj_left, proj_right) pairs."""
    (old_left, old_right), (new_left, new_right) = old, new
    left = new_left.t().float() @ old_left.float() if new_left is not None else None
    right = new_right.float() @ old_right.t().float() if new_right is not None else None
    return left, right


def _apply(moment: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None) -> torch.Tensor:
    if left is not None:
        moment = left @ moment
    if right is not None:
        moment = moment @ right.t()
    return moment


def rotate_first_moment(exp_avg: torch.Tensor, left: torch.Tensor | None, right: torch.Tensor | None) -> torch.Tensor:
    """``T_left m T_rightᵀ``. exp_avg: the low-rank (r×n, m×r or r×r) fp32 first moment."""
    return _apply(exp_avg, left, right)


def rotate_second_moment(
    exp_avg_sq: torch.Tensor,
    exp_avg: torch.Tensor,
    left: torch.Tensor | None,
    right: torch.Tensor | None,
    rule: str = "subtrack",
) -> torch.Tensor:
    """The rotated second moment, non-negative for any input (see the module docstring)."""
    if rule not in SECOND_MOMENT_RULES:
        raise ValueError(f"second-moment rule must be one of {SECOND_MOMENT_RULES}, got {rule!r}")
    left_sq = left.square() if left is not None else None
    right_sq = right.square() if right is not None else None
    if rule == "square":
        return _apply(exp_avg_sq, left_sq, right_sq)
    variance = (exp_avg_sq - exp_avg.square()).clamp_(min=0.0)
    return _apply(variance, left_sq, right_sq) + _apply(exp_avg, left, right).square()


def subspace_overlap(old: tuple, new: tuple) -> float:
    """‖P_newᵀ P_old‖²_F / r in [0, 1]: 1 for the same subspace, about r/m for unrelated ones.

    Sign- and order-invariant, unlike a cosine of the flattened projectors. For
    ``full`` it is the product of both sides' overlaps, the overlap of the r×r
    core subspace. One host synchronization, on refresh steps only.
    """
    left, right = transitions(old, new)
    overlap = torch.ones((), dtype=torch.float32, device=(left if left is not None else right).device)
    for transition in (left, right):
        if transition is not None:
            overlap = overlap * transition.square().sum() / transition.shape[0]
    return float(overlap)


def rotate_adam_state(state: dict, side: str, left, right, rule: str) -> None:
    """Rotate an Adam state's moments: fp32 ``exp_avg``/``exp_avg_sq``, or their 8-bit codes.

    The rotated moments are new tensors put into ``state``, never written into the old
    ones: a shallow copy of a state (two-pass clipping's first pass) rotates alone.
    """
    if "exp_avg" in state:
        rotated_sq = rotate_second_moment(state["exp_avg_sq"], state["exp_avg"], left, right, rule)
        state["exp_avg"] = rotate_first_moment(state["exp_avg"], left, right)
        state["exp_avg_sq"] = rotated_sq
        return
    low_rank_shape = _low_rank_shape(state["exp_avg_codes"], side)

    def load(name: str, signed: bool) -> torch.Tensor:
        layout = quant.dequantize_blockwise(state[f"{name}_codes"], state[f"{name}_absmax"], signed=signed)
        return quant.from_lowrank_layout(layout, low_rank_shape, side)

    def store(name: str, values: torch.Tensor, signed: bool) -> None:
        new_codes, new_absmax = quant.quantize_blockwise(quant.to_lowrank_layout(values, side), signed=signed)
        state[f"{name}_codes"], state[f"{name}_absmax"] = new_codes, new_absmax

    exp_avg, exp_avg_sq = load("exp_avg", True), load("exp_avg_sq", False)
    store("exp_avg_sq", rotate_second_moment(exp_avg_sq, exp_avg, left, right, rule), False)
    store("exp_avg", rotate_first_moment(exp_avg, left, right), True)


def _low_rank_shape(layout: torch.Tensor, side: str) -> tuple[int, int]:
    """R's shape from D's (``quant.lowrank_layout`` transposes only for ``right``)."""
    rows, cols = layout.shape
    return (cols, rows) if side == "right" else (rows, cols)


def rotate_adafactor_state(state: dict, left, right) -> None:
    """Rotate a GaLore Adafactor state (new tensors put into ``state``, as ``rotate_adam_state``).

    Its first moment (``exp_avg``, with beta1) averages clipped updates, not
    gradients, so ``v − m²`` means nothing and the second moment takes the
    ``"square"`` rule. The factored second moment is expanded to Adafactor's own
    estimate ``v̂ = row colᵀ / mean(row)`` (r×n, the low-rank size), rotated, and
    factored again by its row and column means. Both factors are EMAs of means of
    the same R², so mean(row) = mean(col), and the identity rotation returns them.
    """
    if "exp_avg" in state:
        state["exp_avg"] = rotate_first_moment(state["exp_avg"], left, right)
    if "exp_avg_sq" in state:
        state["exp_avg_sq"] = rotate_second_moment(state["exp_avg_sq"], None, left, right, "square")
        return
    row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
    mean_row = row.mean()
    estimate = torch.outer(row, col) / torch.where(mean_row > 0, mean_row, torch.ones_like(mean_row))
    rotated = rotate_second_moment(estimate, None, left, right, "square")
    state["exp_avg_sq_row"], state["exp_avg_sq_col"] = rotated.mean(dim=-1), rotated.mean(dim=-2)
