"""GaLore Adafactor, as Triton kernels.

Implements ``reference/galore_adafactor.py`` (the contract; read it for the math).
The factored update is three reductions deep (row and column means of R², the mean
of the row factor, the RMS of the update), so it is four deterministic launches
over the low-rank gradient R, each program reducing whole rows or columns itself
(no atomics: the result does not depend on program order):

1. ``_mean_square_ema_kernel`` on R: ``row = β2t·row + (1 − β2t)·mean_{-1}(R² + eps1)``;
   on Rᵀ (a transposed view, no copy): the same for ``col``.
2. ``_factored_update_kernel``: U = R · rsqrt(row / mean(row)) · rsqrt(col) into an
   fp32 scratch, and one partial sum of U² per program.
   (``_unfactored_update_kernel`` instead, for 0-d/1-D parameters: v and U = R · rsqrt(v).)
3. ``_finalize_kernel``: sums the partials (every program in the same order), clips
   U by its RMS, scales it by lr_t (read from device memory: no host sync for
   ``scale_parameter``), runs the first moment, and stores U, or (no projector)
   applies ``W + W·(−wd·lr_t) − U`` to the parameter directly.
4. With a projector, ``lowrank_matmul.back_project_apply`` writes
   ``W·(1 − wd·lr_t) − scale·back(U)`` as the matmul's epilogue. Its decay is a host
   scalar, so weight decay with ``scale_parameter`` costs one host read of lr_t.

N-d parameters without a projector are factored over their last two dims as a
batch of matrices (grid axis 0), as transformers' Adafactor does. The projection
and the non-finite rule are ``lowrank_matmul``'s and ``nonfinite.py``'s: a NaN/Inf
in R makes every launch after the projection return at once.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..projector import check_matmul_precision, side_of
from ._launch import (
    PARAM_DTYPES, check_contiguous, check_device, check_dtype, check_shape, check_skips, on_param_device, round_to,
)
from .galore_adamw import check_projectors
from .lowrank_matmul import back_project_apply, low_rank_input
from .nonfinite import nonfinite_flag

BLOCK_R, BLOCK_C, BLOCK = 16, 128, 1024


@triton.jit
def _mean_square_ema_kernel(
    # pointers
    x_ptr, state_ptr, flag_ptr,
    # sizes
    rows, cols,
    # strides (x: batch, row, col; state: batch, row)
    stride_xb, stride_xr, stride_xc, stride_sb, stride_sr,
    # runtime scalars
    eps1, beta2t, one_minus_beta2t,
    # meta-parameters
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """state[b, i] = β2t·state[b, i] + (1 − β2t)·mean_j(x[b, i, j]² + eps1)."""
    if tl.load(flag_ptr) != 0:
        return
    batch = tl.program_id(0).to(tl.int64)
    offs_r = tl.program_id(1).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < rows
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, cols, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        mask = mask_r[:, None] & (offs_c[None, :] < cols)
        x = tl.load(x_ptr + batch * stride_xb + offs_r[:, None] * stride_xr + offs_c[None, :] * stride_xc,
                    mask=mask, other=0.0)
        acc += tl.sum(tl.where(mask, x * x + eps1, 0.0), axis=1)
    state_ptrs = state_ptr + batch * stride_sb + offs_r * stride_sr
    state = tl.load(state_ptrs, mask=mask_r, other=0.0)
    tl.store(state_ptrs, state * beta2t + one_minus_beta2t * (acc / cols), mask=mask_r)


@triton.jit
def _factored_update_kernel(
    # pointers
    x_ptr, row_ptr, col_ptr, update_ptr, partial_ptr, flag_ptr,
    # sizes
    rows, cols,
    # strides (x and the contiguous update: batch, row, col; row and col states: batch, index)
    stride_xb, stride_xr, stride_xc, stride_rowb, stride_rowr, stride_colb, stride_colc,
    # meta-parameters
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """U = x · rsqrt(row / mean(row))[:, None] · rsqrt(col)[None, :]; partial[pid] = Σ U² of this program."""
    if tl.load(flag_ptr) != 0:
        return
    batch = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1)
    # Every program of a batch sums the row factor in the same order, so all agree on its mean.
    row_sum = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for r0 in range(0, rows, BLOCK_R):
        offs = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        row_sum += tl.load(row_ptr + batch * stride_rowb + offs * stride_rowr, mask=offs < rows, other=0.0)
    row_mean = tl.sum(row_sum, axis=0) / rows
    offs_r = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < rows
    row = tl.load(row_ptr + batch * stride_rowb + offs_r * stride_rowr, mask=mask_r, other=1.0)
    row_factor = tl.math.rsqrt(row / row_mean)
    sum_sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, cols, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        mask_c = offs_c < cols
        mask = mask_r[:, None] & mask_c[None, :]
        x = tl.load(x_ptr + batch * stride_xb + offs_r[:, None] * stride_xr + offs_c[None, :] * stride_xc,
                    mask=mask, other=0.0)
        col = tl.load(col_ptr + batch * stride_colb + offs_c * stride_colc, mask=mask_c, other=1.0)
        update = row_factor[:, None] * tl.math.rsqrt(col)[None, :] * x
        update = tl.where(mask, update, 0.0)
        tl.store(update_ptr + (batch * rows + offs_r[:, None]) * cols + offs_c[None, :], update, mask=mask)
        sum_sq += tl.sum(update * update, axis=1)
    tl.store(partial_ptr + batch * tl.num_programs(1) + pid_r, tl.sum(sum_sq, axis=0))


@triton.jit
def _unfactored_update_kernel(
    x_ptr, exp_avg_sq_ptr, update_ptr, partial_ptr, flag_ptr,
    numel,
    eps1, beta2t, one_minus_beta2t,
    BLOCK: tl.constexpr,
):
    """v = β2t·v + (1 − β2t)·(x² + eps1); U = x · rsqrt(v); partial[pid] = Σ U² of this program (contiguous)."""
    if tl.load(flag_ptr) != 0:
        return
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    exp_avg_sq = tl.load(exp_avg_sq_ptr + offs, mask=mask, other=1.0) * beta2t + one_minus_beta2t * (x * x + eps1)
    tl.store(exp_avg_sq_ptr + offs, exp_avg_sq, mask=mask)
    update = tl.where(mask, tl.math.rsqrt(exp_avg_sq) * x, 0.0)
    tl.store(update_ptr + offs, update, mask=mask)
    tl.store(partial_ptr + pid, tl.sum(update * update, axis=0))


# numel is not specialized: Triton makes an int argument equal to 1 a constant, which has
# no .to() (a rank-1 `full` projection has one low-rank value; the sm_90 gate found it).
@triton.jit(do_not_specialize=["numel"])
def _finalize_kernel(
    # pointers
    update_ptr, partial_ptr, exp_avg_ptr, out_ptr, param_rms_ptr, flag_ptr,
    # sizes
    numel, num_partials,
    # runtime scalars
    lr, eps2, clip_threshold, beta1, one_minus_beta1, neg_weight_decay,
    # meta-parameters
    SCALE_PARAMETER: tl.constexpr, HAS_EXP_AVG: tl.constexpr, APPLY: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """U ← lr_t·U / max(1, RMS(U)/clip); m = β1·m + (1 − β1)·U, U ← m; then U → out, or
    out (the parameter) ← out + out·(−wd·lr_t) − U with APPLY. Flat, contiguous operands."""
    if tl.load(flag_ptr) != 0:
        return
    total = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for p0 in range(0, num_partials, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        total += tl.load(partial_ptr + offs_p, mask=offs_p < num_partials, other=0.0)
    rms = tl.sqrt(tl.sum(total, axis=0)) / tl.sqrt(numel.to(tl.float32))
    lr_t = lr
    if SCALE_PARAMETER:
        lr_t = lr * tl.maximum(tl.load(param_rms_ptr), eps2)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    update = tl.load(update_ptr + offs, mask=mask, other=0.0) / tl.maximum(rms / clip_threshold, 1.0) * lr_t
    if HAS_EXP_AVG:
        update = tl.load(exp_avg_ptr + offs, mask=mask, other=0.0) * beta1 + one_minus_beta1 * update
        tl.store(exp_avg_ptr + offs, update, mask=mask)
    if APPLY:
        param = tl.load(out_ptr + offs, mask=mask, other=0.0)
        param_fp32 = param.to(tl.float32)
        new_param = param_fp32 + param_fp32 * (neg_weight_decay * lr_t) - update
        tl.store(out_ptr + offs, round_to(new_param, param.dtype), mask=mask)
    else:
        tl.store(out_ptr + offs, update, mask=mask)


def _batched(tensor: torch.Tensor) -> torch.Tensor:
    """(batch, rows, cols) view of a tensor with >= 2 dims (batch = product of the leading dims)."""
    return tensor.reshape(-1, *tensor.shape[-2:]) if tensor.dim() != 2 else tensor.unsqueeze(0)


def _check_state(name: str, tensor: torch.Tensor | None, shape: tuple[int, ...]) -> None:
    if tensor is None:
        raise ValueError(f"{name} is required here (a state of shape {shape})")
    check_dtype(name, tensor, (torch.float32,))
    check_shape(name, tensor, shape)
    check_contiguous(name, tensor)


@on_param_device
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
    """In-place GaLore Adafactor step of one parameter (``reference.galore_adafactor_step``).

    Shapes as the reference; the state tensors must be contiguous fp32, and without
    a projector the parameter must be contiguous too (the optimizer steps a
    contiguous copy of one that is not). matmul_precision: how fp32 operands of the
    projections multiply (``projector.MATMUL_PRECISIONS``).
    """
    check_matmul_precision(matmul_precision)
    check_device(param, grad=grad, exp_avg_sq_row=exp_avg_sq_row, exp_avg_sq_col=exp_avg_sq_col,
                 exp_avg_sq=exp_avg_sq, exp_avg=exp_avg, nonfinite_skips=nonfinite_skips,
                 proj_left=proj_left, proj_right=proj_right)
    check_dtype("param", param, PARAM_DTYPES)
    check_skips(nonfinite_skips)
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    if (beta1 is None) != (exp_avg is None):
        raise ValueError("exp_avg must be given exactly when beta1 is")
    side = side_of(proj_left, proj_right)
    low_rank_shape = tuple(param.shape) if side is None else check_projectors(param, proj_left, proj_right)
    projected = grad_is_projected and side is not None
    check_dtype("grad", grad, (torch.float32,) if projected else PARAM_DTYPES)
    check_shape("grad", grad, low_rank_shape if projected else tuple(param.shape))
    factored = len(low_rank_shape) >= 2
    if factored:
        _check_state("exp_avg_sq_row", exp_avg_sq_row, low_rank_shape[:-1])
        _check_state("exp_avg_sq_col", exp_avg_sq_col, low_rank_shape[:-2] + low_rank_shape[-1:])
    else:
        _check_state("exp_avg_sq", exp_avg_sq, low_rank_shape)
    if exp_avg is not None:
        _check_state("exp_avg", exp_avg, low_rank_shape)
    if side is None:
        check_contiguous("param (without a projector)", param)

    eps1, eps2 = eps
    beta2t = 1.0 - step**decay_rate
    device = param.device
    if side is None:
        # A plain parameter's gradient in fp32 (a copy only for 16-bit), so the kernels square in fp32.
        low_rank = grad.float()
        flag = nonfinite_flag(low_rank)
    else:
        layout, flag = low_rank_input(grad, proj_left, proj_right, side, projected, matmul_precision)
        low_rank = layout.t() if side == "right" else layout  # R, a view of the layout
    numel = math.prod(low_rank_shape)
    update = torch.empty(low_rank_shape, dtype=torch.float32, device=device)
    if factored:
        batched = _batched(low_rank)
        batch, rows, cols = batched.shape
        row_state = exp_avg_sq_row.view(batch, rows)
        col_state = exp_avg_sq_col.view(batch, cols)
        # The column EMA is the row EMA of Rᵀ, a transposed view.
        passes = ((batched, row_state, rows, cols), (batched.transpose(1, 2), col_state, cols, rows))
        for x, state, length, width in passes:
            _mean_square_ema_kernel[(batch, triton.cdiv(length, BLOCK_R))](
                x, state, flag, length, width, x.stride(0), x.stride(1), x.stride(2), state.stride(0), state.stride(1),
                eps1, beta2t, 1.0 - beta2t, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C,
            )
        partials = torch.empty(batch * triton.cdiv(rows, BLOCK_R), dtype=torch.float32, device=device)
        _factored_update_kernel[(batch, triton.cdiv(rows, BLOCK_R))](
            batched, row_state, col_state, update, partials, flag, rows, cols,
            batched.stride(0), batched.stride(1), batched.stride(2), row_state.stride(0), row_state.stride(1),
            col_state.stride(0), col_state.stride(1), BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C,
        )
    else:
        flat = low_rank.reshape(-1).contiguous()
        partials = torch.empty(triton.cdiv(numel, BLOCK), dtype=torch.float32, device=device)
        _unfactored_update_kernel[(triton.cdiv(numel, BLOCK),)](
            flat, exp_avg_sq, update, partials, flag, numel, eps1, beta2t, 1.0 - beta2t, BLOCK=BLOCK,
        )
    param_rms = (torch.linalg.vector_norm(param, dtype=torch.float32) / math.sqrt(param.numel())).reshape(1)
    apply = side is None
    _finalize_kernel[(triton.cdiv(numel, BLOCK),)](
        update, partials, exp_avg if exp_avg is not None else update, param if apply else update, param_rms, flag,
        numel, partials.numel(),
        lr, eps2, clip_threshold, beta1 or 0.0, 1.0 - (beta1 or 0.0), -weight_decay,
        SCALE_PARAMETER=scale_parameter, HAS_EXP_AVG=exp_avg is not None, APPLY=apply, BLOCK=BLOCK, BLOCK_P=256,
    )
    if not apply:
        decay = 1.0
        if weight_decay != 0:
            lr_t = lr * max(float(param_rms), eps2) if scale_parameter else lr
            decay = 1.0 - weight_decay * lr_t
            if decay == 0.0:
                raise ValueError("weight_decay * lr_t == 1 zeroes the parameter; the back-projection cannot fold it")
        normalized = update.t() if side == "right" else update  # the layout D back_project_apply expects
        back_project_apply(param, normalized, proj_left, proj_right, side, flag, alpha=-scale / decay, decay=decay,
                           matmul_precision=matmul_precision)
    nonfinite_skips.add_(flag)
