"""GaLore AdamW with blockwise 8-bit moments, as Triton kernels.

Implements ``reference/galore_adamw8bit.py`` (the contract; read it for the math):
bitsandbytes' 8-bit Adam on the low-rank gradient R, its update projected back.

The moments live in the direction-major layout D of ``quant.lowrank_layout``
(``(directions, length)``: R for left and full, Rᵀ for right), quantized in runs of
256 consecutive values of D, so each block holds one direction's values.

Launch structure (three launches for left/right, five for full; no host sync):

1. ``lowrank_matmul.project``: D (fp32 scratch), raising the non-finite flag in its
   epilogue.
2. ``adamw8bit.launch_adamw8bit(apply=False)``: the plain 8-bit Adam kernel over D's
   flat blocks (each program owns whole blocks, so a block's new absmax comes from
   registers): dequantize, update, requantize, and write
   N = s1 / (sqrt(s2) + c2·eps) in D's layout.
3. ``lowrank_matmul.back_project_apply``: W = (W + scale·step_size·back(N))·(1 - lr·wd),
   reading and writing W once with one rounding.

Every launch after the first returns at once when the flag holds the step's stamp,
which leaves the parameter, codes and absmaxes bit-identical; launch 2 counts the
skip (``nonfinite.py``).
"""

from __future__ import annotations

import torch

from ..projector import side_of
from ..quant import lowrank_layout
from ._launch import (
    PARAM_DTYPES, DeviceScalars, as_2d, check_device, check_dtype, check_matmul_precision, check_shape, check_skips,
    on_param_device,
)
from .adamw8bit import adam8bit_scalars, check_quantized_state, device_step_scalars, launch_adamw8bit
from .galore_adamw import check_projectors
from .lowrank_matmul import back_project_apply, folds_step_size, low_rank_input, normalized_dtype
from .nonfinite import checked_flag


@on_param_device
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
    device_scalars: DeviceScalars | None = None,
) -> None:
    """In-place GaLore 8-bit AdamW step of one parameter (``reference.galore_adamw8bit_step``).

    param: (m, n), fp32/bf16/fp16, any strides. grad: (m, n), any strides.
    proj_left: (m, r) or None; proj_right: (r, n) or None (at least one), fp32 or param's dtype.
    exp_avg_codes, exp_avg_sq_codes: contiguous uint8 of the shape ``quant.lowrank_layout``
    gives for the low-rank shape, ``(directions, length)``; exp_avg_absmax,
    exp_avg_sq_absmax: contiguous fp32 ``(ceil(directions * length / 256),)``.
    nonfinite_skips: 0-d integer tensor.
    grad_is_projected: ``grad`` is already the fp32 low-rank gradient.
    matmul_precision: how fp32 operands of the projections multiply (``_launch.MATMUL_PRECISIONS``).
    flag, stamp: the persistent non-finite flag and this step's stamp (``galore_adamw_step``).
    device_scalars: capturable steps, as ``galore_adamw_step``'s.
    """
    check_matmul_precision(matmul_precision)
    quantized = (exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax)
    side, layout_shape = check_galore8bit_operands(param, grad, quantized, nonfinite_skips, proj_left, proj_right,
                                                   grad_is_projected)
    flag = checked_flag(param, flag, stamp)
    moments_scalars, back_alpha, decay = galore8bit_launch_scalars(
        param, side, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step, scale=scale,
        device_scalars=device_scalars)
    if device_scalars is not None:
        stamp = device_scalars.stamp

    low_rank, flag = low_rank_input(grad, proj_left, proj_right, side, grad_is_projected, matmul_precision,
                                    flag=flag, stamp=stamp)
    normalized = torch.empty(layout_shape, dtype=normalized_dtype(param, side), device=param.device)
    launch_adamw8bit(normalized, as_2d(normalized), low_rank, as_2d(low_rank), quantized, flag,
                     apply=False, scalars=moments_scalars, stamp=stamp, nonfinite_skips=nonfinite_skips)
    back_project_apply(param, normalized, proj_left, proj_right, side, flag,
                       alpha=back_alpha, decay=decay, matmul_precision=matmul_precision, stamp=stamp)


def check_galore8bit_operands(param, grad, quantized, nonfinite_skips, proj_left, proj_right,
                              grad_is_projected: bool) -> tuple[str, tuple[int, int]]:
    """``galore_adamw8bit_step``'s operand checks; returns the side and the state's layout shape D."""
    side = side_of(proj_left, proj_right)
    if side is None:
        raise ValueError("a GaLore step needs proj_left, proj_right or both")
    exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax = quantized
    check_device(
        param, grad=grad, exp_avg_codes=exp_avg_codes, exp_avg_absmax=exp_avg_absmax,
        exp_avg_sq_codes=exp_avg_sq_codes, exp_avg_sq_absmax=exp_avg_sq_absmax, nonfinite_skips=nonfinite_skips,
        proj_left=proj_left, proj_right=proj_right,
    )
    check_dtype("param", param, PARAM_DTYPES)
    check_skips(nonfinite_skips)
    low_rank_shape = check_projectors(param, proj_left, proj_right)
    check_dtype("grad", grad, (torch.float32,) if grad_is_projected else PARAM_DTYPES)
    check_shape("grad", grad, low_rank_shape if grad_is_projected else tuple(param.shape))
    layout_shape = lowrank_layout(low_rank_shape, side)
    for name, codes in (("exp_avg_codes", exp_avg_codes), ("exp_avg_sq_codes", exp_avg_sq_codes)):
        check_shape(name, codes, layout_shape)
    check_quantized_state(quantized, low_rank_shape[0] * low_rank_shape[1])
    return side, layout_shape


def galore8bit_launch_scalars(param, side: str, *, lr, beta1, beta2, eps, weight_decay, step, scale,
                              device_scalars: DeviceScalars | None):
    """``(moments launch scalars, back-projection alpha, decay)`` of one step, by value or on the device."""
    scalars = adam8bit_scalars(lr=lr if device_scalars is None else 0.0, beta1=beta1, beta2=beta2, eps=eps,
                               weight_decay=weight_decay, step=step)
    folded = folds_step_size(param, side)
    # Without APPLY the kernel writes step_size·N: the folded α·N (fp16), or N itself.
    alpha, one = scale * scalars["step_size"], 1.0
    moments_scalars = dict(scalars, step_size=alpha if folded else one)
    if device_scalars is not None:
        alpha, one = device_scalars.scaled_step_size, device_scalars.one
        scalars = moments_scalars = device_step_scalars(scalars, device_scalars, step_size=alpha if folded else one)
    return moments_scalars, one if folded else alpha, scalars["decay"]
