"""Reference: the Natural GaLore AdamW steps (fp32 and 8-bit moments), pure PyTorch.

The contract of ``kernels/natural_galore_adamw.py``: the low-rank gradient g enters the
history and is replaced by ñ (``natural_galore.natural_gradient``), which then takes
GaLore's AdamW step exactly as g would (``grad_is_projected=True``): same bias correction,
scale, weight decay, 8-bit moments and non-finite skip (a non-finite g gives a
non-finite ñ and leaves the history alone).
"""

from __future__ import annotations

import torch

from .galore_adamw import galore_adamw_step, project
from .galore_adamw8bit import galore_adamw8bit_step
from .natural_galore import natural_gradient


def _natural(grad, grad_history, history_gram, history_count, proj_left, proj_right, damping, grad_is_projected,
             matmul_precision):
    if proj_left is None and proj_right is None:
        raise ValueError("a Natural GaLore step needs proj_left, proj_right or both")
    low_rank = grad if grad_is_projected else project(grad, proj_left, proj_right, matmul_precision=matmul_precision)
    return natural_gradient(low_rank, grad_history, history_gram, history_count, damping=damping)


@torch.no_grad()
def natural_galore_adamw_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    nonfinite_skips: torch.Tensor,
    grad_history: torch.Tensor,
    history_gram: torch.Tensor,
    history_count: torch.Tensor,
    *,
    damping: float,
    proj_left: torch.Tensor | None,
    proj_right: torch.Tensor | None,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    scale: float = 1.0,
    correct_bias: bool = True,
    bnb_eps: bool = False,
    grad_is_projected: bool = False,
    matmul_precision: str = "tf32x3",
    flag: torch.Tensor | None = None,
    stamp: int = 1,
) -> None:
    """``galore_adamw_step`` on ñ. The history state is ``natural_galore.new_history``'s, updated in place."""
    natural = _natural(grad, grad_history, history_gram, history_count, proj_left, proj_right, damping,
                       grad_is_projected, matmul_precision)
    galore_adamw_step(
        param, natural, exp_avg, exp_avg_sq, nonfinite_skips, proj_left=proj_left, proj_right=proj_right, lr=lr,
        beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step, scale=scale,
        correct_bias=correct_bias, bnb_eps=bnb_eps, grad_is_projected=True, matmul_precision=matmul_precision,
        flag=flag, stamp=stamp,
    )


@torch.no_grad()
def natural_galore_adamw8bit_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg_codes: torch.Tensor,
    exp_avg_absmax: torch.Tensor,
    exp_avg_sq_codes: torch.Tensor,
    exp_avg_sq_absmax: torch.Tensor,
    nonfinite_skips: torch.Tensor,
    grad_history: torch.Tensor,
    history_gram: torch.Tensor,
    history_count: torch.Tensor,
    *,
    damping: float,
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
    """``galore_adamw8bit_step`` on ñ. The history state is ``natural_galore.new_history``'s, updated in place."""
    natural = _natural(grad, grad_history, history_gram, history_count, proj_left, proj_right, damping,
                       grad_is_projected, matmul_precision)
    galore_adamw8bit_step(
        param, natural, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax, nonfinite_skips,
        proj_left=proj_left, proj_right=proj_right, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
        weight_decay=weight_decay, step=step, scale=scale, grad_is_projected=True, matmul_precision=matmul_precision,
        flag=flag, stamp=stamp,
    )
