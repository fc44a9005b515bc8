"""LOMO and AdaLomo updates of one parameter, in plain PyTorch: the oracle of ``kernels/lomo.py``.

The math is lomo-optim 0.1.1's (``Lomo.fuse_update``, ``AdaLomo.fuse_update``), in
its order of operations, so that the parity tests against lomo-optim are tight:

1. ``g = grad / loss_scale`` in fp32 (unscale), then ``clamp(g, ±clip_grad_value)``,
   then ``g * clip_coef`` (the global-norm coefficient from the first backward pass);
2. LOMO: ``p = p·(1 - lr·wd) - lr·g``;
3. AdaLomo (arXiv 2310.10195; Adafactor's factored second moment without momentum):
   with ``β = 1 - step^decay_rate`` and ``s = g² + eps1``, a matrix keeps
   ``row = β·row + (1-β)·mean_cols(s)`` (m,) and ``col = β·col + (1-β)·mean_rows(s)`` (n,),
   ``u = rsqrt(row / mean(row)) ⊗ rsqrt(col) · g``; a vector keeps ``v = β·v + (1-β)·s``,
   ``u = rsqrt(v)·g``. Then ``u /= max(rms(u) / clip_threshold, 1)`` (grouped update
   normalization), ``lr' = lr·max(eps2, rms(p))`` (rms of the parameter before the
   step), ``p = p·(1 - lr'·wd) - lr'·u``.

The parameter is updated in place with one rounding (round to nearest) at the end.
"""

from __future__ import annotations

import math

import torch


def _clipped_grad(grad: torch.Tensor, loss_scale: float, clip_grad_value: float | None,
                  clip_coef: torch.Tensor | float | None) -> torch.Tensor:
    """The gradient the update sees: fp32, unscaled, clipped by value, times the global-norm coefficient."""
    g = grad.to(torch.float32) / loss_scale
    if clip_grad_value is not None:
        g = g.clamp(min=-clip_grad_value, max=clip_grad_value)
    if clip_coef is not None:
        g = g * clip_coef
    return g


@torch.no_grad()
def lomo_step(param: torch.Tensor, grad: torch.Tensor, *, lr: float, weight_decay: float = 0.0,
              loss_scale: float = 1.0, clip_coef: torch.Tensor | float | None = None,
              clip_grad_value: float | None = None) -> None:
    """One LOMO (SGD) update of ``param`` in place. param, grad: any shape, same shape.

    clip_coef: the global-norm clip coefficient (a 0-d fp32 tensor on param's device, or None).
    """
    g = _clipped_grad(grad, loss_scale, clip_grad_value, clip_coef)
    updated = param.to(torch.float32)
    if weight_decay != 0.0:
        updated = updated * (1.0 - lr * weight_decay)
    param.copy_(updated - lr * g)


def adalomo_beta(step: int, decay_rate: float) -> float:
    """The second-moment decay ``1 - step^decay_rate`` of update number ``step`` (>= 1)."""
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    return 1.0 - math.pow(step, decay_rate)


@torch.no_grad()
def adalomo_step(param: torch.Tensor, grad: torch.Tensor, exp_avg_sq_row: torch.Tensor | None,
                 exp_avg_sq_col: torch.Tensor | None, exp_avg_sq: torch.Tensor | None, *,
                 lr: float, step: int, weight_decay: float = 0.0, loss_scale: float = 1.0,
                 clip_coef: torch.Tensor | float | None = None, clip_grad_value: float | None = None,
                 clip_threshold: float = 1.0, decay_rate: float = -0.8, eps1: float = 1e-30,
                 eps2: float = 1e-3) -> None:
    """One AdaLomo update of ``param`` in place; the second-moment state in place.

    param, grad: (m, n) with exp_avg_sq_row (m,) and exp_avg_sq_col (n,) fp32, exp_avg_sq None;
    or (n,) with exp_avg_sq (n,) fp32 and the row/col statistics None. step: this update's
    number, from 1.
    """
    beta = adalomo_beta(step, decay_rate)
    g = _clipped_grad(grad, loss_scale, clip_grad_value, clip_coef)
    second = g * g + eps1
    if param.dim() == 2:
        exp_avg_sq_row.mul_(beta).add_(second.mean(dim=-1), alpha=1.0 - beta)
        exp_avg_sq_col.mul_(beta).add_(second.mean(dim=-2), alpha=1.0 - beta)
        row_factor = (exp_avg_sq_row / exp_avg_sq_row.mean()).rsqrt().unsqueeze(-1)
        update = (row_factor * exp_avg_sq_col.rsqrt().unsqueeze(0)) * g
    else:
        exp_avg_sq.mul_(beta).add_(second, alpha=1.0 - beta)
        update = exp_avg_sq.rsqrt() * g
    numel_sqrt = math.sqrt(param.numel())
    update = update / (torch.linalg.vector_norm(update) / numel_sqrt / clip_threshold).clamp(min=1.0)
    updated = param.to(torch.float32)
    step_lr = lr * (torch.linalg.vector_norm(updated) / numel_sqrt).clamp(min=eps2)
    if weight_decay != 0.0:
        updated = updated * (1.0 - step_lr * weight_decay)
    # lomo-optim's form (p + alpha·u, alpha the fp32 step lr read back), so that bf16 runs round alike.
    param.copy_(updated.add_(update, alpha=-step_lr.item()))
