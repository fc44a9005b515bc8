"""LOMO and AdaLomo parameter updates as Triton kernels.

Implements ``reference/lomo.py`` (the contract; read it for the math). The launches
do the whole update: unscale by the loss scale, clip by value, the global-norm clip
coefficient (read from a device tensor: no host synchronization), for AdaLomo the
second-moment update, the update RMS and its normalization, the parameter RMS and
weight decay, and the parameter's single rounding (round to nearest) at the store.

Launch structure:

* LOMO is elementwise: one launch, a 1-D grid of 2048-element blocks.
* AdaLomo needs three reductions over the whole parameter, each feeding the next:
  the row/column sums of g² (the new statistics), the mean of the new row statistic,
  and the RMS of the update (with the parameter's RMS). Programs of one launch
  cannot wait for each other, so each reduction ends a launch. The grid tiles the
  parameter into (rows_per_program × BLOCK_C) blocks, at most about ``MAX_PROGRAMS``
  of them; each program writes its sums into slots of its own (no atomics), and a
  later launch adds the slots in a fixed order, so the result is bit-stable and does
  not depend on program order. A matrix takes four launches:

  1. ``_adalomo_statistics_kernel``: per block, the row sums and column sums of
     g² + eps1 and Σ p²;
  2. ``_adalomo_factor_kernel``: the row and column EMAs from those partials (a 1-D
     grid over rows, then columns), and per program the sum of its new row statistics;
  3. ``_adalomo_update_norm_kernel``: per block, Σ u² of the unnormalized update;
  4. ``_adalomo_apply_kernel``: every program adds up the partials (the update RMS,
     the parameter RMS, mean(row)), then normalizes, decays and writes its block.

  A vector's second moment is elementwise, so launch 1 updates it and takes Σ u²
  too, and the vector goes straight to launch 4: two launches. The gradient is read
  three times for a matrix (twice for a vector), the parameter twice. The partials
  are fp32, about one value per 128 of the parameter's (the row sums of each column
  strip dominate): 1.9 MB at 4096×11008, 16 MB at 128256×4096.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..reference.lomo import adalomo_beta
from ._launch import PARAM_DTYPES, check_device, check_dtype, check_shape, on_param_device, round_to

# At most about this many programs per AdaLomo launch: every program of the last launches
# sums all the partials (in the same order), so their number must stay small; 1024 is
# still ~8 programs per SM on an H100.
MAX_PROGRAMS = 1024
FACTOR_BLOCK = 1024  # rows or columns per program of the statistics' EMA
PARTIALS_BLOCK = 256


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
def _sum_partials(partial_ptr, count, BLOCK_P: tl.constexpr):
    """Σ partial[0:count], in the same fixed order in every program (so all agree to the bit)."""
    total = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for p0 in range(0, count, BLOCK_P):
        offs = p0 + tl.arange(0, BLOCK_P)
        total += tl.load(partial_ptr + offs, mask=offs < count, other=0.0)
    return tl.sum(total, axis=0)


@triton.jit
def _adalomo_update_tile(grad, offs_r, col_factor, row_ptr, row_mean, rows, clip_coef, loss_scale, clip_grad_value,
                         FACTORED: tl.constexpr, CLIP_BY_VALUE: tl.constexpr, CLIP_BY_NORM: tl.constexpr):
    """The unnormalized update of one tile: rsqrt(row / mean(row)) ⊗ col_factor · g (a vector: col_factor · g),
    col_factor = rsqrt(col) (a vector: rsqrt(v)) of the tile's columns."""
    g = _clipped_grad(grad, clip_coef, loss_scale, clip_grad_value, CLIP_BY_VALUE, CLIP_BY_NORM)
    if FACTORED:
        row_factor = tl.rsqrt(tl.load(row_ptr + offs_r, mask=offs_r < rows, other=1.0) / row_mean)
        return (row_factor[:, None] * col_factor[None, :]) * g
    return col_factor[None, :] * g


@triton.jit
def _adalomo_statistics_kernel(
    # pointers
    param_ptr, grad_ptr, col_ptr, row_partial_ptr, col_partial_ptr, param_partial_ptr, update_partial_ptr,
    clip_coef_ptr,
    # sizes
    rows, cols, rows_per_program,
    # strides
    stride_param_r, stride_param_c, stride_grad_r, stride_grad_c,
    # runtime hyperparameters
    loss_scale, clip_grad_value, beta, one_minus_beta, eps1,
    # meta-parameters
    FACTORED: tl.constexpr, CLIP_BY_VALUE: tl.constexpr, CLIP_BY_NORM: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Launch 1, per program (rows_per_program rows × BLOCK_C columns), each sum into a slot of its own.

    FACTORED: row_partial[pid_c, i] = Σ_{j in the block} (g² + eps1) for each of its rows i,
    col_partial[pid_r, j] = Σ_{i in the block} (g² + eps1) for each of its columns j.
    Otherwise (a vector, one row): v = β·v + (1-β)·(g² + eps1) in col_ptr, elementwise, and
    update_partial[pid] = Σ (rsqrt(v)·g)². Always param_partial[pid] = Σ p².
    """
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid = pid_r * tl.num_programs(1) + pid_c
    clip_coef = 1.0
    if CLIP_BY_NORM:
        clip_coef = tl.load(clip_coef_ptr)
    offs_c = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < cols
    row_begin = pid_r.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_begin + rows_per_program, rows)
    col_sum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    param_sq = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    update_sq = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for row_start in range(row_begin, row_end, BLOCK_R):
        offs_r = row_start + tl.arange(0, BLOCK_R)
        mask_r = offs_r < row_end
        mask = mask_r[:, None] & mask_c[None, :]
        grad = tl.load(grad_ptr + offs_r[:, None] * stride_grad_r + offs_c[None, :] * stride_grad_c, mask=mask, other=0.0)
        g = _clipped_grad(grad, clip_coef, loss_scale, clip_grad_value, CLIP_BY_VALUE, CLIP_BY_NORM)
        second = tl.where(mask, g * g + eps1, 0.0)
        param = tl.load(param_ptr + offs_r[:, None] * stride_param_r + offs_c[None, :] * stride_param_c,
                        mask=mask, other=0.0).to(tl.float32)
        param_sq += param * param
        if FACTORED:
            tl.store(row_partial_ptr + pid_c * rows + offs_r, tl.sum(second, axis=1), mask=mask_r)
            col_sum += tl.sum(second, axis=0)
        else:
            # A vector is one row and BLOCK_R is 1: these (1, BLOCK_C) pointers are its elements. Each
            # has one owner program, and the launcher's vector blocks hold at least one element per
            # thread, so no replicated lane can load v after another lane stored it.
            vector_ptrs = col_ptr + offs_c[None, :]
            vector = tl.load(vector_ptrs, mask=mask, other=1.0) * beta + one_minus_beta * second
            tl.store(vector_ptrs, vector, mask=mask)
            update = tl.where(mask, tl.rsqrt(tl.where(mask, vector, 1.0)) * g, 0.0)
            update_sq += update * update
    if FACTORED:
        tl.store(col_partial_ptr + pid_r * cols + offs_c, col_sum, mask=mask_c)
    else:
        tl.store(update_partial_ptr + pid, tl.sum(tl.sum(update_sq, axis=1), axis=0))
    tl.store(param_partial_ptr + pid, tl.sum(tl.sum(param_sq, axis=1), axis=0))


@triton.jit
def _adalomo_factor_kernel(
    # pointers
    row_ptr, col_ptr, row_partial_ptr, col_partial_ptr, row_state_partial_ptr,
    # sizes
    rows, cols, col_strips, row_groups, row_programs,
    # runtime hyperparameters
    beta, one_minus_beta,
    # meta-parameters
    BLOCK: tl.constexpr,
):
    """Launch 2 (matrices): the row and column statistics' EMAs from launch 1's partials.

    Programs [0, row_programs) own BLOCK rows each: row = β·row + (1-β)·Σ_strips partial / cols,
    and row_state_partial[pid] = Σ of their new row statistics (for mean(row)); the rest own
    BLOCK columns: col = β·col + (1-β)·Σ_groups partial / rows. Partials are summed in strip
    (group) order, so the result does not depend on which program ran first.
    """
    pid = tl.program_id(0)
    if pid < row_programs:
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < rows
        total = tl.zeros((BLOCK,), dtype=tl.float32)
        for strip in range(0, col_strips):
            total += tl.load(row_partial_ptr + strip * rows + offs, mask=mask, other=0.0)
        state = tl.load(row_ptr + offs, mask=mask, other=0.0) * beta + one_minus_beta * (total / cols)
        tl.store(row_ptr + offs, state, mask=mask)
        tl.store(row_state_partial_ptr + pid, tl.sum(tl.where(mask, state, 0.0), axis=0))
    else:
        offs = (pid - row_programs).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < cols
        total = tl.zeros((BLOCK,), dtype=tl.float32)
        for group in range(0, row_groups):
            total += tl.load(col_partial_ptr + group * cols + offs, mask=mask, other=0.0)
        state = tl.load(col_ptr + offs, mask=mask, other=0.0) * beta + one_minus_beta * (total / rows)
        tl.store(col_ptr + offs, state, mask=mask)


@triton.jit
def _adalomo_update_norm_kernel(
    # pointers
    grad_ptr, row_ptr, col_ptr, row_state_partial_ptr, update_partial_ptr, clip_coef_ptr,
    # sizes
    rows, cols, rows_per_program, row_programs,
    # strides
    stride_grad_r, stride_grad_c,
    # runtime hyperparameters
    loss_scale, clip_grad_value,
    # meta-parameters
    CLIP_BY_VALUE: tl.constexpr, CLIP_BY_NORM: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Launch 3 (matrices): update_partial[pid] = Σ u² over launch 1's block of this program."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    clip_coef = 1.0
    if CLIP_BY_NORM:
        clip_coef = tl.load(clip_coef_ptr)
    row_mean = _sum_partials(row_state_partial_ptr, row_programs, BLOCK_P) / rows
    offs_c = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_factor = tl.rsqrt(tl.load(col_ptr + offs_c, mask=offs_c < cols, other=1.0))
    row_begin = pid_r.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_begin + rows_per_program, rows)
    update_sq = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for row_start in range(row_begin, row_end, BLOCK_R):
        offs_r = row_start + tl.arange(0, BLOCK_R)
        mask = (offs_r[:, None] < row_end) & (offs_c[None, :] < cols)
        grad = tl.load(grad_ptr + offs_r[:, None] * stride_grad_r + offs_c[None, :] * stride_grad_c, mask=mask, other=0.0)
        update = _adalomo_update_tile(grad, offs_r, col_factor, row_ptr, row_mean, rows, clip_coef, loss_scale,
                                      clip_grad_value, True, CLIP_BY_VALUE, CLIP_BY_NORM)
        update = tl.where(mask, update, 0.0)
        update_sq += update * update
    tl.store(update_partial_ptr + pid_r * tl.num_programs(1) + pid_c, tl.sum(tl.sum(update_sq, axis=1), axis=0))


@triton.jit
def _adalomo_apply_kernel(
    # pointers
    param_ptr, grad_ptr, row_ptr, col_ptr, row_state_partial_ptr, update_partial_ptr, param_partial_ptr,
    clip_coef_ptr,
    # sizes
    rows, cols, rows_per_program, row_programs, num_partials, sqrt_numel,
    # strides
    stride_param_r, stride_param_c, stride_grad_r, stride_grad_c,
    # runtime hyperparameters
    lr, weight_decay, loss_scale, clip_grad_value, eps2, clip_threshold,
    # meta-parameters
    FACTORED: tl.constexpr, CLIP_BY_VALUE: tl.constexpr, CLIP_BY_NORM: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Last launch: the grouped update normalization, the parameter-RMS-scaled step and weight decay, the write."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    clip_coef = 1.0
    if CLIP_BY_NORM:
        clip_coef = tl.load(clip_coef_ptr)
    row_mean = 1.0
    if FACTORED:
        row_mean = _sum_partials(row_state_partial_ptr, row_programs, BLOCK_P) / rows
    update_rms = tl.sqrt(_sum_partials(update_partial_ptr, num_partials, BLOCK_P)) / sqrt_numel
    inv_denom = 1.0 / tl.maximum(update_rms / clip_threshold, 1.0)
    param_rms = tl.sqrt(_sum_partials(param_partial_ptr, num_partials, BLOCK_P)) / sqrt_numel
    step_lr = lr * tl.maximum(param_rms, eps2)
    decay = 1.0 - step_lr * weight_decay
    offs_c = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_factor = tl.rsqrt(tl.load(col_ptr + offs_c, mask=offs_c < cols, other=1.0))
    row_begin = pid_r.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_begin + rows_per_program, rows)
    for row_start in range(row_begin, row_end, BLOCK_R):
        offs_r = row_start + tl.arange(0, BLOCK_R)
        mask = (offs_r[:, None] < row_end) & (offs_c[None, :] < cols)
        grad = tl.load(grad_ptr + offs_r[:, None] * stride_grad_r + offs_c[None, :] * stride_grad_c, mask=mask, other=0.0)
        update = _adalomo_update_tile(grad, offs_r, col_factor, row_ptr, row_mean, rows, clip_coef, loss_scale,
                                      clip_grad_value, FACTORED, CLIP_BY_VALUE, CLIP_BY_NORM) * inv_denom
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
    """``reference.adalomo_step`` in four launches for a matrix, two for a vector (see the module doc)."""
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
    if factored:
        block_c, block_r = min(128, triton.next_power_of_2(cols)), min(16, triton.next_power_of_2(rows))
    else:  # one row; at least one element per thread (4 warps), so no lane holds a replica
        block_c, block_r = max(128, min(1024, triton.next_power_of_2(cols))), 1
    col_strips, row_tiles = triton.cdiv(cols, block_c), triton.cdiv(rows, block_r)
    # A program walks several row tiles of its column strip once the tiles outnumber
    # MAX_PROGRAMS, so that the sums over per-program partials stay short.
    tiles_per_program = triton.cdiv(row_tiles * col_strips, MAX_PROGRAMS)
    row_groups = triton.cdiv(row_tiles, tiles_per_program)
    rows_per_program = tiles_per_program * block_r
    grid = (row_groups, col_strips)
    num_partials = row_groups * col_strips
    row_programs = triton.cdiv(rows, FACTOR_BLOCK) if factored else 0
    col_programs = triton.cdiv(cols, FACTOR_BLOCK) if factored else 0
    # One allocation for every partial (the caching allocator: no sync); each slot has one writer.
    factor_sizes = [row_programs, col_strips * rows, row_groups * cols] if factored else []
    workspace = torch.empty(2 * num_partials + sum(factor_sizes), dtype=torch.float32, device=param.device)
    update_partials, param_partials, *factor_partials = workspace.split([num_partials, num_partials, *factor_sizes])
    # A vector's launches never touch the factor partials: any valid pointer will do.
    row_state_partials, row_partials, col_partials = factor_partials if factored else (workspace,) * 3
    clips = dict(CLIP_BY_VALUE=clip_grad_value is not None, CLIP_BY_NORM=clip_coef is not None)
    coef = _coef_arg(clip_coef, param)
    value_clip = 0.0 if clip_grad_value is None else clip_grad_value
    strides = (param_2d.stride(0), param_2d.stride(1), grad_2d.stride(0), grad_2d.stride(1))
    _adalomo_statistics_kernel[grid](
        param_2d, grad_2d, col_state, row_partials, col_partials, param_partials, update_partials, coef,
        rows, cols, rows_per_program, *strides,
        loss_scale, value_clip, beta, 1.0 - beta, eps1,
        FACTORED=factored, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4, **clips,
    )
    if factored:
        _adalomo_factor_kernel[(row_programs + col_programs,)](
            row_state, col_state, row_partials, col_partials, row_state_partials,
            rows, cols, col_strips, row_groups, row_programs, beta, 1.0 - beta,
            BLOCK=FACTOR_BLOCK, num_warps=4,
        )
        _adalomo_update_norm_kernel[grid](
            grad_2d, row_state, col_state, row_state_partials, update_partials, coef,
            rows, cols, rows_per_program, row_programs, grad_2d.stride(0), grad_2d.stride(1),
            loss_scale, value_clip,
            BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_P=PARTIALS_BLOCK, num_warps=4, **clips,
        )
    _adalomo_apply_kernel[grid](
        param_2d, grad_2d, row_state, col_state, row_state_partials, update_partials, param_partials, coef,
        rows, cols, rows_per_program, row_programs, num_partials, math.sqrt(param.numel()), *strides,
        lr, weight_decay, loss_scale, value_clip, eps2, clip_threshold,
        FACTORED=factored, BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_P=PARTIALS_BLOCK, num_warps=4, **clips,
    )
