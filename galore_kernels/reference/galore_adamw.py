"""Reference: GaLore AdamW with fp32 moments (pure PyTorch).

The contract of ``kernels/galore_adamw.py``. It is galore-torch's ``GaLoreAdamW`` step
for one parameter W (m×n) with gradient G::

    R  = Pᵀ G  (left),  G Qᵀ  (right),  Pᵀ G Qᵀ  (full),  G  (no projector)
    m  = beta1 * m + (1 - beta1) * R ;  v = beta2 * v + (1 - beta2) * R²
    step_size = lr * sqrt(1 - beta2^t) / (1 - beta1^t)      (lr if not correct_bias)
    N  = m / (sqrt(v) + eps)
    W  = W - step_size * scale * back_project(N)
    W  = W * (1 - lr * weight_decay)                           (decoupled, after the step)

``bnb_eps=True`` instead puts eps as bitsandbytes' 32-bit Adam does,
``sqrt(v) + eps * sqrt(1 - beta2^t)``: that is the step of galore-torch's
``GaLoreAdamW8bit`` for states under ``min_8bit_size``.

Deliberate differences from galore-torch: the moments are fp32 for every parameter
dtype (galore-torch keeps them in the gradient's dtype), the projection runs in
fp32, and a 16-bit parameter is rounded once per step rather than twice.

A projected gradient with a NaN or Inf leaves the parameter and the moments exactly
as they were and adds one to ``nonfinite_skips`` (see ``reference/adamw8bit.py``).
"""

from __future__ import annotations

import math

import torch

from ..projector import check_matmul_precision
from .adamw8bit import commit_if_finite


def project(grad: torch.Tensor, proj_left: torch.Tensor | None, proj_right: torch.Tensor | None,
            *, matmul_precision: str = "tf32x3") -> torch.Tensor:
    """The fp32 low-rank gradient. grad: (m, n); proj_left: (m, r); proj_right: (r, n).

    Everything is computed in fp32 (a no-op ``.float()`` for fp32 projectors; exact
    for a 16-bit parameter's 16-bit ones). matmul_precision, the kernels' choice for fp32
    operands (``projector.MATMUL_PRECISIONS``), is checked and otherwise unused: this
    reference multiplies in IEEE fp32, which "tf32x3" matches to about fp32's rounding.
    """
    check_matmul_precision(matmul_precision)
    low_rank = grad.float()
    if proj_left is not None:
        low_rank = proj_left.t().float() @ low_rank
    if proj_right is not None:
        low_rank = low_rank @ proj_right.t().float()
    return low_rank


def project_back(low_rank: torch.Tensor, proj_left: torch.Tensor | None, proj_right: torch.Tensor | None) -> torch.Tensor:
    """Inverse map of ``project`` onto the full (m, n) space, in fp32."""
    full = low_rank
    if proj_left is not None:
        full = proj_left.float() @ full
    if proj_right is not None:
        full = full @ proj_right.float()
    return full


@torch.no_grad()
def galore_adamw_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
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
    correct_bias: bool = True,
    bnb_eps: bool = False,
    matmul_precision: str = "tf32x3",
    flag: torch.Tensor | None = None,
    stamp: int = 1,
) -> None:
    """In-place GaLore AdamW step of one parameter.

    param: (m, n), fp32/bf16/fp16 (N-d parameters are passed as their (m, -1) view).
    grad: (m, n), any strides. proj_left: (m, r) or None; proj_right: (r, n) or None,
    fp32 or param's dtype; with neither it is plain AdamW and ``scale`` is ignored.
    exp_avg, exp_avg_sq: fp32, shaped like the low-rank gradient.
    nonfinite_skips: integer 0-d tensor.
    grad_is_projected: ``grad`` is already the low-rank gradient (accumulated or
    clipped by the optimizer), shaped like ``project(grad, ...)``.
    flag, stamp: set to ``stamp`` on a skipped step (``reference.adamw8bit_step``).
    """
    check_matmul_precision(matmul_precision)
    low_rank = grad.float() if grad_is_projected else project(grad, proj_left, proj_right)
    new_exp_avg = exp_avg * beta1 + (1.0 - beta1) * low_rank
    new_exp_avg_sq = exp_avg_sq * beta2 + (1.0 - beta2) * low_rank * low_rank
    correction1 = 1.0 - beta1**step
    correction2 = math.sqrt(1.0 - beta2**step)
    step_size = lr * correction2 / correction1 if correct_bias else lr
    denom_eps = eps * correction2 if bnb_eps else eps
    normalized = new_exp_avg / (new_exp_avg_sq.sqrt() + denom_eps)
    if proj_left is None and proj_right is None:
        update = normalized
    else:
        update = project_back(normalized, proj_left, proj_right) * scale
    new_param = param.float() - step_size * update
    if weight_decay > 0:
        new_param = new_param * (1.0 - lr * weight_decay)
    finite = torch.isfinite(low_rank).all()
    commit_if_finite(
        finite, nonfinite_skips, [(param, new_param), (exp_avg, new_exp_avg), (exp_avg_sq, new_exp_avg_sq)],
        flag, stamp,
    )
