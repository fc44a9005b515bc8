"""Natural GaLore AdamW steps (fp32 and 8-bit moments), with ñ formed inside the Adam kernel.

Implements ``reference/natural_galore_adamw.py`` (same signatures, same in-place
semantics). Launch structure, no host synchronization, for left/right (two more
launches for full, as in GaLore):

1. ``lowrank_matmul.project``: D (fp32 scratch), raising the non-finite flag; or, with
   ``grad_is_projected``, the flag pass over the given R.
2. ``natural_galore._history_dots_kernel``: Fᵀh and h·h; raises the flag for an h that is
   not finite as stored.
3. ``natural_galore._solve_kernel``: the Gram row/column and count, the Cholesky solve for u.
4. The Adam moment kernel with ``NATURAL=True``: ñ = (h − F u)/λ per tile, fed to the
   moments in registers, h written into the ring; N written for the back-projection
   (``galore_adamw._adamw_moments_kernel``, or ``adamw8bit._adamw8bit_kernel`` for 8-bit
   moments).
5. ``lowrank_matmul.back_project_apply``.

Against GaLore's step this adds launches 2 and 3 and, per step, reads the history
twice (s·k values each) and writes one row; ñ itself never reaches memory.
"""

from __future__ import annotations

import torch

from ..projector import side_of
from ..quant import lowrank_layout
from ._launch import PARAM_DTYPES, as_2d, check_device, check_dtype, check_shape, check_skips, on_param_device
from .adamw8bit import adam8bit_scalars, check_quantized_state, launch_adamw8bit
from .galore_adamw import adamw_scalars, check_projectors, launch_adamw_moments
from .lowrank_matmul import back_project_apply, folds_step_size, low_rank_input, normalized_dtype
from .natural_galore import check_history, solve_history
from .nonfinite import checked_flag


def _checked_low_rank_shape(param, grad, nonfinite_skips, proj_left, proj_right, grad_is_projected, history, damping):
    """Checks what both steps share; returns ``(side, low-rank shape)``."""
    side = side_of(proj_left, proj_right)
    if side is None:
        raise ValueError("a Natural GaLore step needs proj_left, proj_right or both")
    check_device(param, grad=grad, nonfinite_skips=nonfinite_skips, proj_left=proj_left, proj_right=proj_right,
                 grad_history=history[0])
    check_dtype("param", param, PARAM_DTYPES)
    check_skips(nonfinite_skips)
    low_rank_shape = check_projectors(param, proj_left, proj_right)
    check_dtype("grad", grad, (torch.float32,) if grad_is_projected else PARAM_DTYPES)
    check_shape("grad", grad, low_rank_shape if grad_is_projected else tuple(param.shape))
    check_history(*history, low_rank_shape, damping)
    return side, low_rank_shape


@on_param_device
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
    """In-place Natural GaLore AdamW step (``reference.natural_galore_adamw_step``).

    As ``galore_adamw_step`` with a projector, plus the history state of
    ``reference.natural_galore.new_history``: grad_history (s, *low-rank shape) fp32 or
    bf16, history_gram (s, s) fp64, history_count int64 0-d, all contiguous; 1 <= s <= 64.
    flag, stamp: the persistent non-finite flag and this step's stamp (``galore_adamw_step``).
    """
    history = (grad_history, history_gram, history_count)
    side, low_rank_shape = _checked_low_rank_shape(param, grad, nonfinite_skips, proj_left, proj_right,
                                                   grad_is_projected, history, damping)
    for name, moment in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        check_device(param, **{name: moment})
        check_dtype(name, moment, (torch.float32,))
        check_shape(name, moment, low_rank_shape)
    scalars = adamw_scalars(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step,
                            correct_bias=correct_bias, bnb_eps=bnb_eps)
    step_size, decay = scalars.pop("step_size"), scalars.pop("decay")

    flag = checked_flag(param, flag, stamp)
    low_rank, flag = low_rank_input(grad, proj_left, proj_right, side, grad_is_projected, matmul_precision,
                                    flag=flag, stamp=stamp)
    natural = solve_history(low_rank, side, *history, flag, damping=damping, stamp=stamp)
    exp_avg_d, exp_avg_sq_d = (exp_avg.t(), exp_avg_sq.t()) if side == "right" else (exp_avg, exp_avg_sq)
    normalized = torch.empty(low_rank.shape, dtype=normalized_dtype(param, side), device=param.device)
    alpha = -step_size * scale
    folded = folds_step_size(param, side)  # fp16: the moments kernel writes α·N, as in galore_adamw_step
    launch_adamw_moments(low_rank, exp_avg_d, exp_avg_sq_d, normalized, flag, apply=False,
                         alpha=alpha if folded else 1.0, scalars=scalars, natural=natural, stamp=stamp,
                         nonfinite_skips=nonfinite_skips)
    back_project_apply(param, normalized, proj_left, proj_right, side, flag, alpha=1.0 if folded else alpha,
                       decay=decay, matmul_precision=matmul_precision, stamp=stamp)


@on_param_device
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
    """In-place Natural GaLore 8-bit AdamW step (``reference.natural_galore_adamw8bit_step``).

    As ``galore_adamw8bit_step`` (``flag`` and ``stamp`` too), plus the history state of
    ``natural_galore_adamw_step``.
    """
    history = (grad_history, history_gram, history_count)
    side, low_rank_shape = _checked_low_rank_shape(param, grad, nonfinite_skips, proj_left, proj_right,
                                                   grad_is_projected, history, damping)
    quantized = (exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax)
    check_device(param, exp_avg_codes=exp_avg_codes, exp_avg_absmax=exp_avg_absmax,
                 exp_avg_sq_codes=exp_avg_sq_codes, exp_avg_sq_absmax=exp_avg_sq_absmax)
    layout_shape = lowrank_layout(low_rank_shape, side)
    for name, codes in (("exp_avg_codes", exp_avg_codes), ("exp_avg_sq_codes", exp_avg_sq_codes)):
        check_shape(name, codes, layout_shape)
    check_quantized_state(quantized, low_rank_shape[0] * low_rank_shape[1])
    scalars = adam8bit_scalars(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step)

    flag = checked_flag(param, flag, stamp)
    low_rank, flag = low_rank_input(grad, proj_left, proj_right, side, grad_is_projected, matmul_precision,
                                    flag=flag, stamp=stamp)
    natural = solve_history(low_rank, side, *history, flag, damping=damping, stamp=stamp)
    normalized = torch.empty(layout_shape, dtype=normalized_dtype(param, side), device=param.device)
    alpha = scale * scalars["step_size"]
    folded = folds_step_size(param, side)  # fp16: the kernel writes α·N, as in galore_adamw8bit_step
    launch_adamw8bit(normalized, as_2d(normalized), low_rank, as_2d(low_rank), quantized, flag,
                     apply=False, scalars=dict(scalars, step_size=alpha if folded else 1.0), natural=natural,
                     stamp=stamp, nonfinite_skips=nonfinite_skips)
    back_project_apply(param, normalized, proj_left, proj_right, side, flag, alpha=1.0 if folded else alpha,
                       decay=scalars["decay"], matmul_precision=matmul_precision, stamp=stamp)
