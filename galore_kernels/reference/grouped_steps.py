"""Many same-shape GaLore steps at once: the contract of ``kernels/grouped_steps.py``.

Each member takes exactly its own ``galore_adamw_step`` / ``galore_adamw8bit_step``,
with its own non-finite skip: the grouped kernels differ only in launching once
for all of them (per ``SCRATCH_BYTES`` of low-rank scratch).
"""

from __future__ import annotations

from .galore_adamw import galore_adamw_step
from .galore_adamw8bit import galore_adamw8bit_step


def _projectors(proj_lefts, proj_rights, count: int):
    if (proj_lefts is None) == (proj_rights is None):
        raise ValueError("a grouped step takes proj_lefts or proj_rights, one of them (the full side is per parameter)")
    return zip(proj_lefts or [None] * count, proj_rights or [None] * count)


def grouped_galore_adamw_step(params, grads, exp_avgs, exp_avg_sqs, nonfinite_skips, flags, *, proj_lefts=None,
                              proj_rights=None, lr: float, beta1: float, beta2: float, eps: float,
                              weight_decay: float, step: int, stamp: int, scale: float = 1.0,
                              correct_bias: bool = True, bnb_eps: bool = False, matmul_precision: str = "tf32x3",
                              table=None) -> None:
    """``galore_adamw_step`` of every member; ``table`` is the kernels' cache, unused here."""
    for (p, g, m, v, skips, flag), (left, right) in zip(
            zip(params, grads, exp_avgs, exp_avg_sqs, nonfinite_skips, flags),
            _projectors(proj_lefts, proj_rights, len(params))):
        galore_adamw_step(p, g, m, v, skips, proj_left=left, proj_right=right, lr=lr, beta1=beta1, beta2=beta2,
                          eps=eps, weight_decay=weight_decay, step=step, scale=scale, correct_bias=correct_bias,
                          bnb_eps=bnb_eps, matmul_precision=matmul_precision, flag=flag, stamp=stamp)


def grouped_galore_adamw8bit_step(params, grads, exp_avg_codes, exp_avg_absmaxes, exp_avg_sq_codes,
                                  exp_avg_sq_absmaxes, nonfinite_skips, flags, *, proj_lefts=None,
                                  proj_rights=None, lr: float, beta1: float, beta2: float, eps: float,
                                  weight_decay: float, step: int, stamp: int, scale: float = 1.0,
                                  matmul_precision: str = "tf32x3", table=None) -> None:
    """``galore_adamw8bit_step`` of every member; ``table`` is the kernels' cache, unused here."""
    for (p, g, *state, skips, flag), (left, right) in zip(
            zip(params, grads, exp_avg_codes, exp_avg_absmaxes, exp_avg_sq_codes, exp_avg_sq_absmaxes,
                nonfinite_skips, flags),
            _projectors(proj_lefts, proj_rights, len(params))):
        galore_adamw8bit_step(p, g, *state, skips, proj_left=left, proj_right=right, lr=lr, beta1=beta1,
                              beta2=beta2, eps=eps, weight_decay=weight_decay, step=step, scale=scale,
                              matmul_precision=matmul_precision, flag=flag, stamp=stamp)
