"""Reference: AdamW with blockwise 8-bit moments, bitsandbytes' semantics (pure PyTorch).

This is the contract that ``kernels/adamw8bit.py`` implements, and the inner step of
``reference/galore_adamw8bit.py``. Per element, with t the step (bitsandbytes' CUDA
kernel ``kOptimizerStatic8bit2StateBlockwise``)::

    s1 = beta1 * dequant(exp_avg) + (1 - beta1) * g
    s2 = beta2 * dequant(exp_avg_sq) + (1 - beta2) * g * g
    c1 = 1 - beta1^t ;  c2 = sqrt(1 - beta2^t)
    p  = p - lr * c2 / c1 * s1 / (sqrt(s2) + c2 * eps)
    p  = p * (1 - lr * weight_decay)            # decoupled decay, after the step
    exp_avg, exp_avg_sq = quantize(s1), quantize(s2)   # absmax of the updated state

A gradient with a NaN or Inf leaves the parameter and both moments exactly as they
were and adds one to ``nonfinite_skips``; nothing synchronizes with the host.
"""

from __future__ import annotations

import math

import torch

from ..quant import dequantize_blockwise, quantize_blockwise


def adam8bit_moments_update(
    grad: torch.Tensor,
    exp_avg_codes: torch.Tensor,
    exp_avg_absmax: torch.Tensor,
    exp_avg_sq_codes: torch.Tensor,
    exp_avg_sq_absmax: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    step: int,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One Adam update of quantized moments, without touching any parameter.

    ``grad`` is fp32 and shaped like the codes. Returns the additive parameter
    update ``-lr * c2/c1 * s1/(sqrt(s2) + c2*eps)`` (fp32, like ``grad``) and the
    new ``(exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax)``.
    """
    exp_avg = dequantize_blockwise(exp_avg_codes, exp_avg_absmax, signed=True)
    exp_avg_sq = dequantize_blockwise(exp_avg_sq_codes, exp_avg_sq_absmax, signed=False)
    exp_avg = exp_avg * beta1 + (1.0 - beta1) * grad
    exp_avg_sq = exp_avg_sq * beta2 + (1.0 - beta2) * grad * grad
    correction1 = 1.0 - beta1**step
    correction2 = math.sqrt(1.0 - beta2**step)
    step_size = -lr * correction2 / correction1
    update = step_size * (exp_avg / (exp_avg_sq.sqrt() + correction2 * eps))
    new_exp_avg = quantize_blockwise(exp_avg, signed=True)
    new_exp_avg_sq = quantize_blockwise(exp_avg_sq, signed=False)
    return update, (*new_exp_avg, *new_exp_avg_sq)


def commit_if_finite(finite: torch.Tensor, nonfinite_skips: torch.Tensor, pairs,
                     flag: torch.Tensor | None = None, stamp: int = 1) -> None:
    """Write each ``(destination, new value)`` pair only where ``finite`` holds.

    ``finite`` is a 0-d bool tensor; selecting on the device keeps the step free
    of host synchronization. A skipped step adds one to ``nonfinite_skips`` and sets
    the persistent non-finite ``flag`` (if given) to ``stamp``, as the kernels do
    (``kernels/nonfinite.py``).
    """
    for destination, value in pairs:
        destination.copy_(torch.where(finite, value.to(destination.dtype), destination))
    nonfinite_skips.add_((~finite).to(nonfinite_skips.dtype))
    if flag is not None:
        flag.copy_(torch.where(finite, flag, stamp))


@torch.no_grad()
def adamw8bit_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg_codes: torch.Tensor,
    exp_avg_absmax: torch.Tensor,
    exp_avg_sq_codes: torch.Tensor,
    exp_avg_sq_absmax: torch.Tensor,
    nonfinite_skips: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    flag: torch.Tensor | None = None,
    stamp: int = 1,
) -> None:
    """In-place 8-bit blockwise AdamW step of one parameter.

    param: any shape, fp32/bf16/fp16.  grad: same shape (any strides).
    exp_avg_codes, exp_avg_sq_codes: uint8, ``param.numel()`` values in blocks of
    256 consecutive elements of the flattened (row-major) parameter, exactly as
    bitsandbytes lays them out.  exp_avg_absmax, exp_avg_sq_absmax: fp32,
    ``ceil(numel / 256)``.  nonfinite_skips: integer 0-d tensor.
    flag, stamp: a 0-d int32 tensor set to ``stamp`` (an int that grows every step) when
    the step is skipped, or None.
    """
    g = grad.float().reshape(exp_avg_codes.shape)
    update, new_states = adam8bit_moments_update(
        g, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax,
        lr=lr, beta1=beta1, beta2=beta2, eps=eps, step=step,
    )
    new_param = param.float() + update.view(param.shape)
    if weight_decay > 0:
        new_param = new_param * (1.0 - lr * weight_decay)
    finite = torch.isfinite(g).all()
    states = (exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax)
    commit_if_finite(finite, nonfinite_skips, [(param, new_param), *zip(states, new_states)], flag, stamp)
