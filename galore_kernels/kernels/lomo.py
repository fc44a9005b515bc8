"""LOMO and AdaLomo parameter updates as Triton kernels, one launch per parameter.

Implements ``reference/lomo.py`` (the contract; read it for the math). Each launch
does the whole update: unscale by the loss scale, clip by value, the global-norm
clip coefficient (read from a device tensor: no host synchronization), for AdaLomo
the second-moment update, the update RMS and its normalization, the parameter RMS
and weight decay, and the parameter's single rounding (round to nearest) at the store.

Launch structure:

* LOMO is elementwise: a 1-D grid of 2048-element blocks.
* AdaLomo needs three reductions over the whole parameter that each feed the next
  step: the row/column means of g² (the new statistics), the mean of the new row
  statistic, and the RMS of the update (with the parameter's RMS). Blocks of one
  launch cannot wait for each other (a grid-wide barrier deadlocks when not every
  program is resident), so the launch is a single program that walks the parameter
  in BLOCK_R×BLOCK_C tiles, in four sweeps: rows (row statistic, parameter sum of
  squares), columns (column statistic; a second read of the gradient instead of
  read-modify-writes of partial column sums, which replicated lanes would race
  on), the update's sum of squares, and the write. ``tl.debug_barrier`` orders the
  statistics' stores before the sweeps that read them, and each
  statistic's load before its store (lanes may hold replicas of one element). The price is one SM per
  parameter: the update costs ~4 reads of the gradient at one SM's bandwidth instead
  of the GPU's, on the backward pass's own stream, so it is not hidden: estimated
  (not measured) at a few ms per 4096×4096 bf16 matrix on an H100. Splitting it into
  launches with per-program partial sums, as ``galore_adafactor.py`` does, is the fix
  a GPU measurement should decide.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..reference.lomo import adalomo_beta
from ._launch import PARAM_DTYPES, check_device, check_dtype, check_shape, on_param_device, round_to


@triton.jit
def _clipped_grad(grad, clip_coef, loss_scale, clip_grad_value,
                  CLIP_BY_VALUE: tl.constexpr, CLIP_BY_NORM: tl.constexpr):
    """fp32 gradient, unscaled, clipped by value, times the global-norm coefficient (the reference's order)."""
    g = grad.to(tl.float32) / loss_scale
    if CLIP_BY_VALUE:
        g = tl.minimum(tl.maximum(g, -clip_grad_value), clip_grad_value)
    if CLIP_BY_NORM:
        g = g * clip_coef
    return g


@triton.jit
def _lomo_kernel(
    # pointers
    param_ptr, grad_ptr, clip_coef_ptr,
    # sizes
    numel,
    # runtime hyperparameters
    lr, decay, loss_scale, clip_grad_value,
    # meta-parameters
    CLIP_BY_VALUE: tl.constexpr, CLIP_BY_NORM: tl.constexpr, BLOCK: tl.constexpr,
):
    """p = p·decay - lr·g over contiguous param and grad."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    clip_coef = 1.0
    if CLIP_BY_NORM:
        clip_coef = tl.load(clip_coef_ptr)
    g = _clipped_grad(tl.load(grad_ptr + offs, mask=mask, other=0.0), clip_coef, loss_scale, clip_grad_value,
                      CLIP_BY_VALUE, CLIP_BY_NORM)
    param = tl.load(param_ptr + offs, mask=mask, other=0.0)
    updated = param.to(tl.float32) * decay - lr * g
    tl.store(param_ptr + offs, round_to(updated, param.dtype), mask=mask)


@triton.jit
def _adalomo_kernel(
    # pointers
    param_ptr, grad_ptr, row_ptr, col_ptr, clip_coef_ptr,
    # sizes
    rows, cols, sqrt_numel,
    # strides
    stride_param_r, stride_param_c, stride_grad_r, stride_grad_c,
    # runtime hyperparameters
    lr, weight_decay, loss_scale, clip_grad_value, beta, one_minus_beta, eps1, eps2, clip_threshold,
    # meta-parameters
    FACTORED: tl.constexpr, CLIP_BY_VALUE: tl.constexpr, CLIP_BY_NORM: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The whole AdaLomo update of a (rows, cols) parameter by one program.

    FACTORED: row (rows,) and column (cols,) statistics. Otherwise the parameter is a
    vector seen as one row, col_ptr holds its full second moment, and the row factor is 1.
    """
    clip_coef = 1.0
    if CLIP_BY_NORM:
        clip_coef = tl.load(clip_coef_ptr)
    arange_r = tl.arange(0, BLOCK_R)
    arange_c = tl.arange(0, BLOCK_C)

    # Sweep 1, by rows: the row statistic and the parameter's sum of squares.
    param_sq = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    row_total = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for row_start in range(0, rows, BLOCK_R):
        offs_r = row_start + arange_r
        row_sum = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for col_start in range(0, cols, BLOCK_C):
            offs_c = col_start + arange_c
            mask = (offs_r[:, None] < rows) & (offs_c[None, :] < cols)
            grad = tl.load(grad_ptr + offs_r[:, None] * stride_grad_r + offs_c[None, :] * stride_grad_c, mask=mask, other=0.0)
            g = _clipped_grad(grad, clip_coef, loss_scale, clip_grad_value, CLIP_BY_VALUE, CLIP_BY_NORM)
            row_sum += tl.sum(tl.where(mask, g * g + eps1, 0.0), axis=1)
            param = tl.load(param_ptr + offs_r[:, None] * stride_param_r + offs_c[None, :] * stride_param_c,
                            mask=mask, other=0.0).to(tl.float32)
            param_sq += param * param
        if FACTORED:
            row_mask = offs_r < rows
            row_old = tl.load(row_ptr + offs_r, mask=row_mask, other=0.0)
            # Lanes holding replicas of an element must all have loaded it before one stores it.
            tl.debug_barrier()
            row_state = row_old * beta + one_minus_beta * (row_sum / cols)
            tl.store(row_ptr + offs_r, row_state, mask=row_mask)
            row_total += tl.where(row_mask, row_state, 0.0)

    # Sweep 2, by columns: the column statistic (for a vector, its second moment).
    for col_start in range(0, cols, BLOCK_C):
        offs_c = col_start + arange_c
        col_sum = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for row_start in range(0, rows, BLOCK_R):
            offs_r = row_start + arange_r
            mask = (offs_r[:, None] < rows) & (offs_c[None, :] < cols)
            grad = tl.load(grad_ptr + offs_r[:, None] * stride_grad_r + offs_c[None, :] * stride_grad_c, mask=mask, other=0.0)
            g = _clipped_grad(grad, clip_coef, loss_scale, clip_grad_value, CLIP_BY_VALUE, CLIP_BY_NORM)
            col_sum += tl.sum(tl.where(mask, g * g + eps1, 0.0), axis=0)
        col_mask = offs_c < cols
        col_old = tl.load(col_ptr + offs_c, mask=col_mask, other=0.0)
        tl.debug_barrier()
        col_state = col_old * beta + one_minus_beta * (col_sum / rows)
        tl.store(col_ptr + offs_c, col_state, mask=col_mask)
    # The statistics stored above are read back by other lanes below.
    tl.debug_barrier()
    row_mean = tl.sum(row_total, axis=0) / rows

    # Sweep 3: the update's sum of squares.
    update_sq = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for row_start in range(0, rows, BLOCK_R):
        offs_r = row_start + arange_r
        row_factor = tl.full((BLOCK_R,), 1.0, dtype=tl.float32)
        if FACTORED:
            row_factor = tl.rsqrt(tl.load(row_ptr + offs_r, mask=offs_r < rows, other=1.0) / row_mean)
        for col_start in range(0, cols, BLOCK_C):
            offs_c = col_start + arange_c
            mask = (offs_r[:, None] < rows) & (offs_c[None, :] < cols)
            grad = tl.load(grad_ptr + offs_r[:, None] * stride_grad_r + offs_c[None, :] * stride_grad_c, mask=mask, other=0.0)
            g = _clipped_grad(grad, clip_coef, loss_scale, clip_grad_value, CLIP_BY_VALUE, CLIP_BY_NORM)
            col_factor = tl.rsqrt(tl.load(col_ptr + offs_c, mask=offs_c < cols, other=1.0))
            update = tl.where(mask, (row_factor[:, None] * col_factor[None, :]) * g, 0.0)
            update_sq += update * update

    # Grouped update normalization and the parameter-RMS-scaled step.
    update_rms = tl.sqrt(tl.sum(tl.sum(update_sq, axis=1), axis=0)) / sqrt_numel
    inv_denom = 1.0 / tl.maximum(update_rms / clip_threshold, 1.0)
    param_rms = tl.sqrt(tl.sum(tl.sum(param_sq, axis=1), axis=0)) / sqrt_numel
    step_lr = lr * tl.maximum(param_rms, eps2)
    decay = 1.0 - step_lr * weight_decay

    # Sweep 4: the write.
    for row_start in range(0, rows, BLOCK_R):
        offs_r = row_start + arange_r
        row_factor = tl.full((BLOCK_R,), 1.0, dtype=tl.float32)
        if FACTORED:
            row_factor = tl.rsqrt(tl.load(row_ptr + offs_r, mask=offs_r < rows, other=1.0) / row_mean)
        for col_start in range(0, cols, BLOCK_C):
            offs_c = col_start + arange_c
            mask = (offs_r[:, None] < rows) & (offs_c[None, :] < cols)
            grad = tl.load(grad_ptr + offs_r[:, None] * stride_grad_r + offs_c[None, :] * stride_grad_c, mask=mask, other=0.0)
            g = _clipped_grad(grad, clip_coef, loss_scale, clip_grad_value, CLIP_BY_VALUE, CLIP_BY_NORM)
            col_factor = tl.rsqrt(tl.load(col_ptr + offs_c, mask=offs_c < cols, other=1.0))
            update = ((row_factor[:, None] * col_factor[None, :]) * g) * inv_denom
            param_ptrs = param_ptr + offs_r[:, None] * stride_param_r + offs_c[None, :] * stride_param_c
            param = tl.load(param_ptrs, mask=mask, other=0.0)
            updated = param.to(tl.float32) * decay - step_lr * update
            tl.store(param_ptrs, round_to(updated, param.dtype), mask=mask)


def _check_common(param, grad, clip_coef, loss_scale, clip_grad_value):
    check_device(param, grad=grad, clip_coef=clip_coef)
    check_dtype("param", param, PARAM_DTYPES)
    check_dtype("grad", grad, PARAM_DTYPES)
    check_shape("grad", grad, tuple(param.shape))
    if clip_coef is not None:
        check_dtype("clip_coef", clip_coef, (torch.float32,))
        if clip_coef.numel() != 1:
            raise ValueError(f"clip_coef must hold one value, got shape {tuple(clip_coef.shape)}")
    if not loss_scale > 0:
        raise ValueError(f"loss_scale must be > 0, got {loss_scale}")
    if clip_grad_value is not None and not clip_grad_value > 0:
        raise ValueError(f"clip_grad_value must be > 0 or None, got {clip_grad_value}")


def _coef_arg(clip_coef, param):
    """The pointer the kernels read the coefficient from (param when unused: never read)."""
    return param if clip_coef is None else clip_coef


@on_param_device
@torch.no_grad()
def lomo_step(param: torch.Tensor, grad: torch.Tensor, *, lr: float, weight_decay: float = 0.0,
              loss_scale: float = 1.0, clip_coef: torch.Tensor | None = None,
              clip_grad_value: float | None = None) -> None:
    """``reference.lomo_step`` in one launch. param, grad: contiguous, same shape."""
    _check_common(param, grad, clip_coef, loss_scale, clip_grad_value)
    for name, tensor in (("param", param), ("grad", grad)):
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if param.numel() == 0:
        return
    block = 2048
    _lomo_kernel[(triton.cdiv(param.numel(), block),)](
        param, grad, _coef_arg(clip_coef, param),
        param.numel(),
        lr, 1.0 - lr * weight_decay, loss_scale, 0.0 if clip_grad_value is None else clip_grad_value,
        CLIP_BY_VALUE=clip_grad_value is not None, CLIP_BY_NORM=clip_coef is not None, BLOCK=block, num_warps=8,
    )


@on_param_device
@torch.no_grad()
def adalomo_step(param: torch.Tensor, grad: torch.Tensor, exp_avg_sq_row: torch.Tensor | None,
                 exp_avg_sq_col: torch.Tensor | None, exp_avg_sq: torch.Tensor | None, *,
                 lr: float, step: int, weight_decay: float = 0.0, loss_scale: float = 1.0,
                 clip_coef: torch.Tensor | None = None, clip_grad_value: float | None = None,
                 clip_threshold: float = 1.0, decay_rate: float = -0.8, eps1: float = 1e-30,
                 eps2: float = 1e-3) -> None:
    """``reference.adalomo_step`` in one launch (a single program, see the module doc)."""
    _check_common(param, grad, clip_coef, loss_scale, clip_grad_value)
    factored = param.dim() == 2
    if factored:
        rows, cols = param.shape
        if exp_avg_sq is not None:
            raise ValueError("a matrix takes exp_avg_sq_row and exp_avg_sq_col, not exp_avg_sq")
        statistics = (("exp_avg_sq_row", exp_avg_sq_row, rows), ("exp_avg_sq_col", exp_avg_sq_col, cols))
    elif param.dim() == 1:
        rows, cols = 1, param.shape[0]
        if exp_avg_sq_row is not None or exp_avg_sq_col is not None:
            raise ValueError("a vector takes exp_avg_sq, not row/column statistics")
        statistics = (("exp_avg_sq", exp_avg_sq, cols),)
    else:
        raise ValueError(f"AdaLomo steps vectors and matrices only, got shape {tuple(param.shape)}")
    for name, tensor, size in statistics:
        if tensor is None:
            raise ValueError(f"{name} is required for a parameter of shape {tuple(param.shape)}")
        check_device(param, **{name: tensor})
        check_dtype(name, tensor, (torch.float32,))
        check_shape(name, tensor, (size,))
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if not clip_threshold > 0:
        raise ValueError(f"clip_threshold must be > 0, got {clip_threshold}")
    beta = adalomo_beta(step, decay_rate)
    if param.numel() == 0:
        return
    param_2d, grad_2d = param.view(rows, cols), grad.view(rows, cols)
    row_state = exp_avg_sq_row if factored else param  # never read when not factored
    col_state = exp_avg_sq_col if factored else exp_avg_sq
    block_c = min(128, triton.next_power_of_2(cols))
    block_r = min(2048 // block_c, triton.next_power_of_2(rows))
    _adalomo_kernel[(1,)](
        param_2d, grad_2d, row_state, col_state, _coef_arg(clip_coef, param),
        rows, cols, math.sqrt(param.numel()),
        param_2d.stride(0), param_2d.stride(1), grad_2d.stride(0), grad_2d.stride(1),
        lr, weight_decay, loss_scale, 0.0 if clip_grad_value is None else clip_grad_value, beta, 1.0 - beta,
        eps1, eps2, clip_threshold,
        FACTORED=factored, CLIP_BY_VALUE=clip_grad_value is not None, CLIP_BY_NORM=clip_coef is not None,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=8,
    )
