"""Reference: GaLore Adafactor (pure PyTorch).

The contract of ``kernels/galore_adafactor.py``. It is galore-torch's ``GaLoreAdafactor``
step (transformers' Adafactor with the gradient projected) for one parameter W with
gradient G, after the optimizer has turned its step count into the relative step
size ``lr`` (``optim/galore_adafactor.py``)::

    R   = Pᵀ G  (left),  G Qᵀ  (right),  Pᵀ G Qᵀ  (full),  G  (no projector)
    lr_t = lr · max(eps2, RMS(W))      (lr if not scale_parameter; RMS(W) before the step)
    β2t = 1 − t^decay_rate
    factored (R has >= 2 dims):
        row = β2t·row + (1 − β2t)·mean_{-1}(R² + eps1)
        col = β2t·col + (1 − β2t)·mean_{-2}(R² + eps1)
        U   = R · rsqrt(row / mean_{-1}(row))[..., None] · rsqrt(col)[..., None, :]
    else:
        v   = β2t·v + (1 − β2t)·(R² + eps1);   U = R · rsqrt(v)
    U   = lr_t · U / max(1, RMS(U) / clip_threshold)
    m   = β1·m + (1 − β1)·U;  U = m                      (with beta1 only)
    W   = W + W·(−weight_decay·lr_t) − scale·back_project(U)

Deliberate differences from galore-torch, as in ``reference/galore_adamw.py``: the
state is fp32 for every parameter dtype, the projection runs in fp32, and a 16-bit
parameter is rounded once per step. A projected gradient with a NaN or Inf leaves
the parameter and the state exactly as they were and adds one to ``nonfinite_skips``.
"""

from __future__ import annotations

import torch

from ..projector import check_matmul_precision
from .adamw8bit import commit_if_finite
from .galore_adamw import project, project_back


def rms(tensor: torch.Tensor) -> torch.Tensor:
    """Root mean square, as transformers' Adafactor computes it."""
    return tensor.norm(2) / (tensor.numel() ** 0.5)


def step_lr(param: torch.Tensor, lr: float, eps2: float, scale_parameter: bool) -> torch.Tensor | float:
    """lr_t: the relative step size times the parameter's RMS (floored at eps2) with ``scale_parameter``."""
    if not scale_parameter:
        return lr
    return lr * torch.clamp(rms(param.float()), min=eps2)


@torch.no_grad()
def galore_adafactor_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg_sq_row: torch.Tensor | None,
    exp_avg_sq_col: torch.Tensor | None,
    exp_avg_sq: torch.Tensor | None,
    exp_avg: torch.Tensor | None,
    nonfinite_skips: torch.Tensor,
    *,
    proj_left: torch.Tensor | None,
    proj_right: torch.Tensor | None,
    lr: float,
    eps: tuple[float, float],
    clip_threshold: float,
    decay_rate: float,
    beta1: float | None,
    weight_decay: float,
    step: int,
    scale_parameter: bool,
    scale: float = 1.0,
    grad_is_projected: bool = False,
    matmul_precision: str = "tf32x3",
) -> None:
    """In-place GaLore Adafactor step of one parameter.

    param: any shape; (m, n) with a projector (N-d parameters are passed as their
    (m, -1) view), fp32/bf16/fp16. grad: param's shape, or the fp32 low-rank gradient
    with ``grad_is_projected``. proj_left: (m, r) or None; proj_right: (r, n), fp32
    or param's dtype.
    The state is fp32, shaped from the low-rank gradient R (param's shape without a
    projector): factored (R.dim() >= 2) ``exp_avg_sq_row`` R.shape[:-1] and
    ``exp_avg_sq_col`` R.shape[:-2] + R.shape[-1:], with ``exp_avg_sq`` None;
    otherwise ``exp_avg_sq`` like R and the factors None. ``exp_avg`` like R when
    ``beta1`` is given, else None. ``step`` (>= 1) sets β2t. nonfinite_skips: integer 0-d tensor.
    """
    check_matmul_precision(matmul_precision)
    projected = proj_left is not None or proj_right is not None
    low_rank = grad.float() if (grad_is_projected or not projected) else project(grad, proj_left, proj_right)
    eps1, eps2 = eps
    param_fp32 = param.float()
    lr_t = step_lr(param_fp32, lr, eps2, scale_parameter)
    beta2t = 1.0 - step**decay_rate
    squared = low_rank * low_rank + eps1
    pairs = []
    if exp_avg_sq_row is not None:
        new_row = exp_avg_sq_row * beta2t + (1.0 - beta2t) * squared.mean(dim=-1)
        new_col = exp_avg_sq_col * beta2t + (1.0 - beta2t) * squared.mean(dim=-2)
        row_factor = (new_row / new_row.mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1)
        update = row_factor * new_col.unsqueeze(-2).rsqrt() * low_rank
        pairs += [(exp_avg_sq_row, new_row), (exp_avg_sq_col, new_col)]
    else:
        new_exp_avg_sq = exp_avg_sq * beta2t + (1.0 - beta2t) * squared
        update = new_exp_avg_sq.rsqrt() * low_rank
        pairs.append((exp_avg_sq, new_exp_avg_sq))
    update = update / torch.clamp(rms(update) / clip_threshold, min=1.0) * lr_t
    if exp_avg is not None:
        update = exp_avg * beta1 + (1.0 - beta1) * update
        pairs.append((exp_avg, update))
    if projected:
        update = project_back(update, proj_left, proj_right) * scale
    # W + W·(−wd·lr_t), as transformers adds it: W·(1 − wd·lr_t) rounds 1 − wd·lr_t first.
    decayed = param_fp32 + param_fp32 * (-weight_decay * lr_t) if weight_decay != 0 else param_fp32
    new_param = decayed - update
    commit_if_finite(torch.isfinite(low_rank).all(), nonfinite_skips, [(param, new_param), *pairs])
