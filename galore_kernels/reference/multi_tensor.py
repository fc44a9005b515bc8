"""Many small plain-AdamW steps at once: the contract of ``kernels/multi_tensor.py``.

Each tensor takes exactly its own per-tensor step (``galore_adamw_step`` without a
projector, ``adamw8bit_step``), with its own non-finite skip: the multi-tensor
kernels differ only in launching once for all of them.
"""

from __future__ import annotations

from .adamw8bit import adamw8bit_step
from .galore_adamw import galore_adamw_step

MAX_NUMEL = 16384
"""Largest tensor the multi-tensor steps take: one GPU program streams each tensor alone
(``kernels/multi_tensor.py``). It covers the norms and biases of models up to hidden size
16384 (LLaMA-3-405B); larger tensors take the per-tensor steps."""


def multi_tensor_adamw_step(params, grads, exp_avgs, exp_avg_sqs, nonfinite_skips, flags, *, lr: float,
                            beta1: float, beta2: float, eps: float, weight_decay: float, step: int, stamp: int,
                            correct_bias: bool = True, bnb_eps: bool = False, table=None) -> None:
    """``galore_adamw_step`` (no projector) of every tensor; ``table`` is the kernels' cache, unused here."""
    for p, g, m, v, skips, flag in zip(params, grads, exp_avgs, exp_avg_sqs, nonfinite_skips, flags):
        galore_adamw_step(p, g, m, v, skips, proj_left=None, proj_right=None, lr=lr, beta1=beta1, beta2=beta2,
                          eps=eps, weight_decay=weight_decay, step=step, correct_bias=correct_bias,
                          bnb_eps=bnb_eps, flag=flag, stamp=stamp)


def multi_tensor_adamw8bit_step(params, grads, exp_avg_codes, exp_avg_absmaxes, exp_avg_sq_codes,
                                exp_avg_sq_absmaxes, nonfinite_skips, flags, *, lr: float, beta1: float,
                                beta2: float, eps: float, weight_decay: float, step: int, stamp: int,
                                table=None) -> None:
    """``adamw8bit_step`` of every tensor; ``table`` is the kernels' cache, unused here."""
    for p, g, *state, skips, flag in zip(params, grads, exp_avg_codes, exp_avg_absmaxes, exp_avg_sq_codes,
                                         exp_avg_sq_absmaxes, nonfinite_skips, flags):
        adamw8bit_step(p, g, *state, skips, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                       weight_decay=weight_decay, step=step, flag=flag, stamp=stamp)
