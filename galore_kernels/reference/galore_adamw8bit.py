"""Reference: GaLore AdamW with blockwise 8-bit moments (pure PyTorch).

The contract of ``kernels/galore_adamw8bit.py``. It is galore-torch's ``GaLoreAdamW8bit``
step: bitsandbytes' 8-bit Adam runs on the low-rank gradient R against a zero
low-rank "parameter", so the low-rank parameter after it *is* the update::

    U = -lr * c2 / c1 * s1 / (sqrt(s2) + c2 * eps)      (reference/adamw8bit.py)
    W = W + scale * back_project(U)
    W = W * (1 - lr * weight_decay)                      (decoupled, after the step)

The moments are quantized in the direction-major layout D of ``quant.lowrank_layout``
(R for left and full, exactly galore-torch's row-major R; Rᵀ for right, so that a
block runs along one direction there too). galore-torch's ``p.data`` swap and its
``torch.cuda.synchronize()`` per parameter are not reproduced, only their math.
"""

from __future__ import annotations

import torch

from ..projector import check_matmul_precision, side_of
from ..quant import from_lowrank_layout, to_lowrank_layout
from .adamw8bit import adam8bit_moments_update, commit_if_finite
from .galore_adamw import project, project_back


@torch.no_grad()
def galore_adamw8bit_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg_codes: torch.Tensor,
    exp_avg_absmax: torch.Tensor,
    exp_avg_sq_codes: torch.Tensor,
    exp_avg_sq_absmax: torch.Tensor,
    nonfinite_skips: torch.Tensor,
    *,
    proj_left: torch.Tensor | None,
    proj_right: torch.Tensor | None,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    scale: float = 1.0,
    grad_is_projected: bool = False,
    matmul_precision: str = "tf32x3",
    flag: torch.Tensor | None = None,
    stamp: int = 1,
) -> None:
    """In-place GaLore 8-bit AdamW step of one parameter.

    param: (m, n), fp32/bf16/fp16. grad: (m, n), any strides.
    proj_left: (m, r) or None; proj_right: (r, n) or None (at least one), fp32 or param's dtype.
    exp_avg_codes, exp_avg_sq_codes: (directions, length) uint8, the shape
    ``quant.lowrank_layout`` gives for the low-rank shape; exp_avg_absmax,
    exp_avg_sq_absmax: (ceil(directions * length / 256),) fp32.
    nonfinite_skips: integer 0-d tensor.
    grad_is_projected: ``grad`` is already the low-rank gradient (accumulated or
    clipped by the optimizer), shaped like ``project(grad, ...)``.
    flag, stamp: set to ``stamp`` on a skipped step (``reference.adamw8bit_step``).
    """
    side = side_of(proj_left, proj_right)
    if side is None:
        raise ValueError("a GaLore step needs proj_left, proj_right or both")
    check_matmul_precision(matmul_precision)
    low_rank = grad.float() if grad_is_projected else project(grad, proj_left, proj_right)
    update, new_states = adam8bit_moments_update(
        to_lowrank_layout(low_rank, side), exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax,
        lr=lr, beta1=beta1, beta2=beta2, eps=eps, step=step,
    )
    low_rank_update = from_lowrank_layout(update, tuple(low_rank.shape), side)
    new_param = param.float() + project_back(low_rank_update, proj_left, proj_right) * scale
    if weight_decay > 0:
        new_param = new_param * (1.0 - lr * weight_decay)
    finite = torch.isfinite(low_rank).all()
    states = (exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax)
    commit_if_finite(finite, nonfinite_skips, [(param, new_param), *zip(states, new_states)], flag, stamp)
