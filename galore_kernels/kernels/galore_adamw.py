"""GaLore AdamW with fp32 moments, as Triton kernels.

Implements ``reference/galore_adamw.py`` (the contract; read it for the math),
including the plain-AdamW case (no projector) and the ``correct_bias`` and
``bnb_eps`` switches.

Launch structure (no host synchronization; a non-finite low-rank gradient makes
every launch after the first return at once, and the moments launch counts the
skip in ``nonfinite_skips``, see ``nonfinite.py``):

* With a projector, three launches for left/right (five for full), all in the
  direction-major layout D of ``quant.lowrank_layout`` (R, or Rᵀ for right):
  1. ``lowrank_matmul.project``: R = Pᵀ G or G Qᵀ, fp32 accumulation, written as
     D (fp32 scratch), raising the non-finite flag in its epilogue.
  2. ``_adamw_moments_kernel``: elementwise over D: both moments updated in place
     and N = m / (sqrt(v) + eps) written to a scratch in the back-projection's dtype.
  3. ``lowrank_matmul.back_project_apply``: W = (W - step_size·scale·back(N))·(1 - lr·wd),
     the back-projection with the parameter update as its epilogue: W is read
     and written once, rounded once.
  Splitting 2 from 3 (rather than fusing the state update into the back-projection's
  column strips) lets the back-projection tile W in both dimensions, so a
  4096×4096 weight still fills all SMs; the price is writing and reading N,
  r/m of W's traffic.
* Without a projector (plain AdamW, any parameter shape): the gradient flag pass of
  ``nonfinite.py``, then ``_adamw_moments_kernel`` applying the update to the
  parameter directly.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ..projector import side_of
from ._launch import (
    PARAM_DTYPES, DeviceScalars, _member, _scalar, cdiv, check_device, check_dtype, check_matmul_precision, check_shape,
    check_skips, on_param_device, round_to,
)
from .lowrank_matmul import back_project_apply, folds_step_size, low_rank_input, normalized_dtype
from .natural_galore import NaturalOperands, _natural_tile, natural_kernel_args
from .nonfinite import _count_skip, _skipped, checked_flag, stamp_nonfinite


# A grouped launch's table row: grad, exp_avg, exp_avg_sq, out, flag, skips.
MOMENTS_TABLE_COLUMNS = tl.constexpr(6)


@triton.jit(do_not_specialize=["denom_eps", "alpha", "decay", "stamp"])
def _adamw_moments_kernel(
    # pointers
    grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, out_ptr, flag_ptr, skips_ptr,
    # sizes
    rows, cols,
    # strides
    stride_grad_r, stride_grad_c, stride_exp_avg_r, stride_exp_avg_c,
    stride_exp_avg_sq_r, stride_exp_avg_sq_c, stride_out_r, stride_out_c,
    # runtime hyperparameters (a scheduler changes them; constexpr would recompile)
    beta1, one_minus_beta1, beta2, one_minus_beta2, denom_eps, alpha, decay,
    # Natural GaLore (NATURAL): natural_galore.natural_kernel_args
    history_ptr, solution_ptr, slot_ptr, damping_ptr, history_size,
    stride_history_slot, stride_history_r, stride_history_c,
    # the step's non-finite stamp (``nonfinite.py``)
    stamp,
    # meta-parameters
    APPLY: tl.constexpr, COUNT_SKIPS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    NATURAL: tl.constexpr, HISTORY_BF16: tl.constexpr, STEP_ON_DEVICE: tl.constexpr = False,
    # a grouped launch (``grouped_steps.py``): program_id(1) is the member, whose six pointers
    # are at the offsets in its row of the int64 table, in the order of the pointer arguments
    table_ptr=None, GROUPED: tl.constexpr = False,
):
    """Adam moments over a (rows, cols) grid; N = m / (sqrt(v) + denom_eps).

    APPLY: out is the parameter, out = (out + alpha * N) * decay (plain AdamW).
    Otherwise out is the scratch that receives alpha * N for the back-projection
    (alpha 1 unless the launcher folds the step size into N, ``folds_step_size``).
    NATURAL: the moments see Natural GaLore's ñ of the gradient tile, not the tile.
    COUNT_SKIPS: a skipped step adds one to ``nonfinite_skips`` (program 0).
    STEP_ON_DEVICE (capturable steps): denom_eps, alpha, decay and stamp are the addresses
    of 0-d tensors holding them (``_launch.DeviceScalars``).
    Program order: a program reads and writes only its own tile of every operand;
    the flag it reads was written by an earlier launch; only program 0 touches the skips.
    GROUPED: every member has the sizes and strides given; each has its own flag and skips.
    """
    grad_ptr = _member(grad_ptr, table_ptr, 0, MOMENTS_TABLE_COLUMNS, GROUPED)
    exp_avg_ptr = _member(exp_avg_ptr, table_ptr, 1, MOMENTS_TABLE_COLUMNS, GROUPED)
    exp_avg_sq_ptr = _member(exp_avg_sq_ptr, table_ptr, 2, MOMENTS_TABLE_COLUMNS, GROUPED)
    out_ptr = _member(out_ptr, table_ptr, 3, MOMENTS_TABLE_COLUMNS, GROUPED)
    flag_ptr = _member(flag_ptr, table_ptr, 4, MOMENTS_TABLE_COLUMNS, GROUPED)
    skips_ptr = _member(skips_ptr, table_ptr, 5, MOMENTS_TABLE_COLUMNS, GROUPED)
    if _skipped(flag_ptr, _scalar(stamp, STEP_ON_DEVICE)):
        _count_skip(skips_ptr, COUNT_SKIPS)
        return
    pid = tl.program_id(0).to(tl.int64)
    num_col_tiles = tl.cdiv(cols, BLOCK_C)
    offs_r = (pid // num_col_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = (pid % num_col_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_r[:, None] < rows) & (offs_c[None, :] < cols)
    r, c = offs_r[:, None], offs_c[None, :]

    grad = tl.load(grad_ptr + r * stride_grad_r + c * stride_grad_c, mask=mask, other=0.0).to(tl.float32)
    if NATURAL:
        offs_history = (r * stride_history_r + c * stride_history_c).to(tl.int32)
        grad = _natural_tile(grad, mask, offs_history, history_ptr, solution_ptr, slot_ptr, damping_ptr,
                             history_size, stride_history_slot, HISTORY_BF16)
    exp_avg_ptrs = exp_avg_ptr + r * stride_exp_avg_r + c * stride_exp_avg_c
    exp_avg_sq_ptrs = exp_avg_sq_ptr + r * stride_exp_avg_sq_r + c * stride_exp_avg_sq_c
    # Same operation order as the reference, with (1 - beta) rounded on the host.
    exp_avg = tl.load(exp_avg_ptrs, mask=mask, other=0.0) * beta1 + one_minus_beta1 * grad
    exp_avg_sq = tl.load(exp_avg_sq_ptrs, mask=mask, other=0.0) * beta2 + (one_minus_beta2 * grad) * grad
    tl.store(exp_avg_ptrs, exp_avg, mask=mask)
    tl.store(exp_avg_sq_ptrs, exp_avg_sq, mask=mask)
    normalized = exp_avg / (tl.sqrt(exp_avg_sq) + _scalar(denom_eps, STEP_ON_DEVICE))
    alpha = _scalar(alpha, STEP_ON_DEVICE)

    out_ptrs = out_ptr + r * stride_out_r + c * stride_out_c
    if APPLY:
        param = tl.load(out_ptrs, mask=mask, other=0.0)
        new_param = (param.to(tl.float32) + alpha * normalized) * _scalar(decay, STEP_ON_DEVICE)
        tl.store(out_ptrs, round_to(new_param, param.dtype), mask=mask)
    else:
        tl.store(out_ptrs, round_to(alpha * normalized, out_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=None)
def _config(rows: int, cols: int) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_C, num_warps)``: 2048-element tiles, up to 128 wide along the columns.

    8 warps, 8 elements per thread: with 4 warps ptxas spills the plain bf16 step
    (sm_90 compile gate, Triton 3.8).
    """
    block_c = min(128, triton.next_power_of_2(max(cols, 1)))
    return 2048 // block_c, block_c, 8


def launch_adamw_moments(grad, exp_avg, exp_avg_sq, out, flag, *, apply: bool, alpha: float = 1.0,
                         decay: float = 1.0, scalars: dict, natural: NaturalOperands | None = None, stamp: int = 1,
                         nonfinite_skips: torch.Tensor | None = None, table: torch.Tensor | None = None) -> None:
    """Launch ``_adamw_moments_kernel`` over 2-D views that all have ``grad``'s shape.

    ``nonfinite_skips``: counted in the kernel when the flag holds ``stamp``; None counts nothing.
    ``table``: a grouped launch (``grouped_steps.py``), an int64 (members, 6) device tensor of every
    member's six pointers as element offsets from the tensors given here, the first member's.
    A tensor ``stamp`` (capturable steps) comes with 0-d tensors ``alpha``, ``decay`` and
    ``scalars["denom_eps"]``, read on the device (``_launch.DeviceScalars``).
    """
    rows, cols = grad.shape
    if rows * cols == 0:
        return
    block_r, block_c, num_warps = _config(rows, cols)
    if natural is not None:  # ñ's fp64 sum per element: half the tile, or ptxas spills (sm_90 gate)
        block_r = max(block_r // 2, 1)
    grid = (cdiv(rows, block_r) * cdiv(cols, block_c), 1 if table is None else table.shape[0])
    _adamw_moments_kernel[grid](
        grad, exp_avg, exp_avg_sq, out, flag, flag if nonfinite_skips is None else nonfinite_skips,
        rows, cols,
        grad.stride(0), grad.stride(1), exp_avg.stride(0), exp_avg.stride(1),
        exp_avg_sq.stride(0), exp_avg_sq.stride(1), out.stride(0), out.stride(1),
        scalars["beta1"], scalars["one_minus_beta1"], scalars["beta2"], scalars["one_minus_beta2"],
        scalars["denom_eps"], alpha, decay, stamp=stamp,
        APPLY=apply, COUNT_SKIPS=nonfinite_skips is not None, BLOCK_R=block_r, BLOCK_C=block_c,
        STEP_ON_DEVICE=torch.is_tensor(stamp), num_warps=num_warps, table_ptr=table, GROUPED=table is not None,
        **natural_kernel_args(natural, grad),
    )


def adamw_scalars(*, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
                  correct_bias: bool, bnb_eps: bool) -> dict:
    """Host-side (float64) scalars of the fp32-moment step, as the reference rounds them."""
    if correct_bias and step < 1:
        raise ValueError(f"step must be >= 1 with correct_bias, got {step}")
    correction2 = math.sqrt(1.0 - beta2**step)
    return dict(
        beta1=beta1, one_minus_beta1=1.0 - beta1, beta2=beta2, one_minus_beta2=1.0 - beta2,
        denom_eps=eps * correction2 if bnb_eps else eps,
        step_size=lr * correction2 / (1.0 - beta1**step) if correct_bias else lr,
        decay=1.0 - lr * weight_decay if weight_decay > 0 else 1.0,
    )


def adamw_launch_scalars(*, lr, beta1, beta2, eps, weight_decay, step, scale, correct_bias, bnb_eps,
                         device_scalars: DeviceScalars | None):
    """``(moments launch scalars, (plain α, scaled α, 1), decay)`` of one step, by value or (capturable)
    on the device; α is the step size, scaled by ``scale`` for a GaLore back-projection."""
    scalars = adamw_scalars(lr=lr if device_scalars is None else 0.0, beta1=beta1, beta2=beta2, eps=eps,
                            weight_decay=weight_decay, step=step, correct_bias=correct_bias, bnb_eps=bnb_eps)
    step_size, decay = scalars.pop("step_size"), scalars.pop("decay")
    alphas = (-step_size, -step_size * scale, 1.0)
    if device_scalars is not None:
        alphas = (device_scalars.step_size, device_scalars.scaled_step_size, device_scalars.one)
        decay = device_scalars.decay
        scalars["denom_eps"] = device_scalars.denom_eps
    return scalars, alphas, decay


def check_projectors(param: torch.Tensor, proj_left: torch.Tensor | None,
                     proj_right: torch.Tensor | None) -> tuple[int, int]:
    """Checks a GaLore parameter and its projectors (fp32, or the parameter's dtype); returns the low-rank shape."""
    if param.dim() != 2:
        raise ValueError(f"a GaLore param must be 2-D (pass N-d as its (m, -1) view), got shape {tuple(param.shape)}")
    m, n = param.shape
    low_rank_shape = [m, n]
    if proj_left is not None:
        check_dtype("proj_left", proj_left, (torch.float32, param.dtype))
        if proj_left.dim() != 2 or proj_left.shape[0] != m:
            raise ValueError(f"proj_left must have shape ({m}, r), got {tuple(proj_left.shape)}")
        low_rank_shape[0] = proj_left.shape[1]
    if proj_right is not None:
        check_dtype("proj_right", proj_right, (torch.float32, param.dtype))
        if proj_right.dim() != 2 or proj_right.shape[1] != n:
            raise ValueError(f"proj_right must have shape (r, {n}), got {tuple(proj_right.shape)}")
        low_rank_shape[1] = proj_right.shape[0]
    return tuple(low_rank_shape)


def check_galore_operands(param, grad, exp_avg, exp_avg_sq, nonfinite_skips, proj_left, proj_right,
                          grad_is_projected: bool) -> tuple[str | None, bool]:
    """``galore_adamw_step``'s operand checks; returns the side and whether ``grad`` is R itself."""
    check_device(
        param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, nonfinite_skips=nonfinite_skips,
        proj_left=proj_left, proj_right=proj_right,
    )
    check_dtype("param", param, PARAM_DTYPES)
    check_skips(nonfinite_skips)
    side = side_of(proj_left, proj_right)
    low_rank_shape = tuple(param.shape) if side is None else check_projectors(param, proj_left, proj_right)
    projected = grad_is_projected and side is not None
    check_dtype("grad", grad, (torch.float32,) if projected else PARAM_DTYPES)
    check_shape("grad", grad, low_rank_shape if projected else tuple(param.shape))
    for name, moment in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        check_dtype(name, moment, (torch.float32,))
        check_shape(name, moment, low_rank_shape)
    return side, projected


@on_param_device
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
    correct_bias: bool = True,
    bnb_eps: bool = False,
    grad_is_projected: bool = False,
    matmul_precision: str = "tf32x3",
    flag: torch.Tensor | None = None,
    stamp: int = 1,
    device_scalars: DeviceScalars | None = None,
) -> None:
    """In-place GaLore AdamW step of one parameter (``reference.galore_adamw_step``).

    param: (m, n) with a projector (any strides), any shape without one (its
    elements must form a strided (prod(shape[:-1]), shape[-1]) view); fp32/bf16/fp16.
    grad: param's shape, any strides. proj_left: (m, r) or None; proj_right: (r, n)
    or None, fp32 or param's dtype. exp_avg, exp_avg_sq: fp32, shaped like the low-rank
    gradient (like param without a projector), any strides.
    nonfinite_skips: 0-d int64 tensor, incremented on a skipped step.
    grad_is_projected: ``grad`` is already the fp32 low-rank gradient.
    matmul_precision: how fp32 operands of the projections multiply (``_launch.MATMUL_PRECISIONS``).
    flag, stamp: a persistent 0-d int32 non-finite flag and this step's stamp, an int
    that grows with every step (``nonfinite.py``); the flag is set to ``stamp`` when
    the step is skipped. None: a fresh flag.
    device_scalars: capturable steps (no reference counterpart): the kernels read lr's, the
    step's and scale's contributions from these device tensors instead (``_launch.DeviceScalars``).
    """
    check_matmul_precision(matmul_precision)
    side, projected = check_galore_operands(param, grad, exp_avg, exp_avg_sq, nonfinite_skips, proj_left, proj_right,
                                            grad_is_projected)
    flag = checked_flag(param, flag, stamp)
    scalars, (plain_alpha, scaled_alpha, one), decay = adamw_launch_scalars(
        lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step, scale=scale,
        correct_bias=correct_bias, bnb_eps=bnb_eps, device_scalars=device_scalars)
    if device_scalars is not None:
        stamp = device_scalars.stamp

    if side is None:
        shape_2d = (-1, param.shape[-1]) if param.dim() > 0 else (1, 1)
        try:
            views = [t.view(shape_2d) for t in (param, exp_avg, exp_avg_sq)]
        except RuntimeError as error:
            raise ValueError(f"param and moments must form strided 2-D views: {error}") from None
        # reshape copies only a gradient layout no autograd produces.
        grad_2d = grad.reshape(views[0].shape)
        stamp_nonfinite(grad_2d, flag, stamp)
        launch_adamw_moments(grad_2d, views[1], views[2], views[0], flag, apply=True,
                             alpha=plain_alpha, decay=decay, scalars=scalars, stamp=stamp,
                             nonfinite_skips=nonfinite_skips)
    else:
        low_rank, flag = low_rank_input(grad, proj_left, proj_right, side, projected, matmul_precision,
                                        flag=flag, stamp=stamp)
        # The moments (shaped like R) as views in low_rank's layout D.
        exp_avg_d, exp_avg_sq_d = (exp_avg.t(), exp_avg_sq.t()) if side == "right" else (exp_avg, exp_avg_sq)
        normalized = torch.empty(low_rank.shape, dtype=normalized_dtype(param, side), device=param.device)
        folded = folds_step_size(param, side)
        launch_adamw_moments(low_rank, exp_avg_d, exp_avg_sq_d, normalized, flag, apply=False,
                             alpha=scaled_alpha if folded else one, scalars=scalars, stamp=stamp,
                             nonfinite_skips=nonfinite_skips)
        back_project_apply(param, normalized, proj_left, proj_right, side, flag,
                           alpha=one if folded else scaled_alpha, decay=decay, matmul_precision=matmul_precision,
                           stamp=stamp)
