"""GaLore AdamW with blockwise 8-bit moments, as Triton kernels.

Implements ``reference/galore_adamw8bit.py`` (the contract; read it for the math):
bitsandbytes' 8-bit Adam on the low-rank gradient R, its update projected back.

The moments live in the layout L of ``quant.lowrank_layout``: ``(rows, padded_rank)``
with the rank dimension last (L = Rᵀ for left and full, R for right), each row
zero-padded to ``padded_rank`` (a power of two below 256, a multiple of 256 above),
so that a 256-value quantization block is either ``256 / padded_rank`` whole rows
or one aligned run of 256 within a row.

Launch structure (three launches for left/right, five for full; no host sync):

1. ``lowrank_matmul.project``: R, written as L (fp32 scratch, unpadded), raising
   the non-finite flag in its epilogue.
2. ``_lowrank_adam8bit_kernel``: each program owns a ``BLOCK_R × BLOCK_C`` tile of L
   that holds whole quantization blocks (``BLOCK_C = min(padded_rank, 256)``, and
   ``BLOCK_R·BLOCK_C`` a multiple of 256, so a tile viewed as ``(-1, 256)`` is a set
   of complete blocks), so each block's new absmax comes from registers. It
   dequantizes, updates, requantizes (``adamw8bit._adam8bit_blocks``) and writes
   N = s1 / (sqrt(s2) + c2·eps) for the columns below the rank. Padding columns get
   a zero gradient but keep their state, exactly as the reference treats them.
3. ``lowrank_matmul.back_project_apply``: W = (W + scale·step_size·back(N))·(1 - lr·wd),
   reading and writing W once with one rounding.

Every launch after the first returns at once when the flag is set, which leaves
the parameter, codes and absmaxes bit-identical (``nonfinite.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..projector import side_of
from ..quant import BLOCK_SIZE, lowrank_layout
from ._launch import (
    PARAM_DTYPES, bf16_by_bits, check_device, check_dtype, check_shape, check_skips, on_param_device, round_to,
)
from .adamw8bit import _adam8bit_blocks, adam8bit_scalars, qmaps
from .galore_adamw import check_projectors
from .lowrank_matmul import back_project_apply, low_rank_input, normalized_dtype


@triton.jit
def _lowrank_adam8bit_kernel(
    # pointers
    low_rank_ptr, normalized_ptr,
    exp_avg_codes_ptr, exp_avg_absmax_ptr, exp_avg_sq_codes_ptr, exp_avg_sq_absmax_ptr,
    qmap_signed_ptr, qmap_unsigned_ptr, midpoints_signed_ptr, midpoints_unsigned_ptr,
    flag_ptr,
    # sizes of L
    rows, rank, padded_rank,
    # strides
    stride_low_rank_r, stride_low_rank_c, stride_normalized_r, stride_normalized_c,
    stride_exp_avg_codes_r, stride_exp_avg_codes_c, stride_exp_avg_sq_codes_r, stride_exp_avg_sq_codes_c,
    stride_exp_avg_absmax, stride_exp_avg_sq_absmax,
    # runtime hyperparameters (a scheduler changes them; constexpr would recompile)
    beta1, one_minus_beta1, beta2, one_minus_beta2, denom_eps,
    # meta-parameters
    QBLOCK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BF16_BY_BITS: tl.constexpr,
):
    if tl.load(flag_ptr) != 0:
        return
    NUM_BLOCKS: tl.constexpr = BLOCK_R * BLOCK_C // QBLOCK
    pid = tl.program_id(0).to(tl.int64)
    num_col_tiles = padded_rank // BLOCK_C
    offs_r = (pid // num_col_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = (pid % num_col_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    r, c = offs_r[:, None], offs_c[None, :]
    valid = (r < rows) & (c < padded_rank)
    in_rank = valid & (c < rank)

    grad = tl.load(low_rank_ptr + r * stride_low_rank_r + c * stride_low_rank_c, mask=in_rank, other=0.0)
    exp_avg_codes_ptrs = exp_avg_codes_ptr + r * stride_exp_avg_codes_r + c * stride_exp_avg_codes_c
    exp_avg_sq_codes_ptrs = exp_avg_sq_codes_ptr + r * stride_exp_avg_sq_codes_r + c * stride_exp_avg_sq_codes_c
    exp_avg_codes = tl.load(exp_avg_codes_ptrs, mask=valid, other=0)
    exp_avg_sq_codes = tl.load(exp_avg_sq_codes_ptrs, mask=valid, other=0)

    # The tile as complete quantization blocks, one per row of a (NUM_BLOCKS, 256) view.
    block_valid = tl.max(tl.reshape(valid.to(tl.int32), (NUM_BLOCKS, QBLOCK)), axis=1) > 0
    block_ids = tl.max(tl.reshape((r * padded_rank + c) // QBLOCK, (NUM_BLOCKS, QBLOCK)), axis=1)
    exp_avg_absmax_ptrs = exp_avg_absmax_ptr + block_ids * stride_exp_avg_absmax
    exp_avg_sq_absmax_ptrs = exp_avg_sq_absmax_ptr + block_ids * stride_exp_avg_sq_absmax
    normalized, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax = _adam8bit_blocks(
        tl.reshape(grad, (NUM_BLOCKS, QBLOCK)), tl.reshape(valid, (NUM_BLOCKS, QBLOCK)),
        tl.reshape(exp_avg_codes, (NUM_BLOCKS, QBLOCK)),
        tl.load(exp_avg_absmax_ptrs, mask=block_valid, other=0.0),
        tl.reshape(exp_avg_sq_codes, (NUM_BLOCKS, QBLOCK)),
        tl.load(exp_avg_sq_absmax_ptrs, mask=block_valid, other=0.0),
        qmap_signed_ptr, qmap_unsigned_ptr, midpoints_signed_ptr, midpoints_unsigned_ptr,
        beta1, one_minus_beta1, beta2, one_minus_beta2, denom_eps,
    )
    tl.store(exp_avg_codes_ptrs, tl.reshape(exp_avg_codes, (BLOCK_R, BLOCK_C)).to(tl.uint8), mask=valid)
    tl.store(exp_avg_sq_codes_ptrs, tl.reshape(exp_avg_sq_codes, (BLOCK_R, BLOCK_C)).to(tl.uint8), mask=valid)
    tl.store(exp_avg_absmax_ptrs, exp_avg_absmax, mask=block_valid)
    tl.store(exp_avg_sq_absmax_ptrs, exp_avg_sq_absmax, mask=block_valid)
    normalized = round_to(tl.reshape(normalized, (BLOCK_R, BLOCK_C)), normalized_ptr.dtype.element_ty, BF16_BY_BITS)
    tl.store(normalized_ptr + r * stride_normalized_r + c * stride_normalized_c, normalized, mask=in_rank)


def _config(rows: int, padded_rank: int) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_C, num_warps)``: 2048-value tiles of whole blocks, 8 values per thread.

    ``BLOCK_C = min(padded_rank, 256)`` divides padded_rank; ``BLOCK_R = 2048 / BLOCK_C``
    is then a multiple of ``256 / padded_rank`` below 256, so tiles hold whole blocks.
    """
    block_c = min(padded_rank, BLOCK_SIZE)
    return 2048 // block_c, block_c, 8


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
) -> None:
    """In-place GaLore 8-bit AdamW step of one parameter (``reference.galore_adamw8bit_step``).

    param: (m, n), fp32/bf16/fp16, any strides. grad: (m, n), any strides.
    proj_left: (m, r) fp32 or None; proj_right: (r, n) fp32 or None (at least one).
    exp_avg_codes, exp_avg_sq_codes: (rows, padded_rank) uint8 and exp_avg_absmax,
    exp_avg_sq_absmax: (ceil(rows * padded_rank / 256),) fp32, as
    ``quant.lowrank_layout`` gives for the low-rank shape; any strides.
    nonfinite_skips: 0-d integer tensor.
    grad_is_projected: ``grad`` is already the fp32 low-rank gradient.
    """
    side = side_of(proj_left, proj_right)
    if side is None:
        raise ValueError("a GaLore step needs proj_left, proj_right or both")
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
    _, rows, padded_rank = lowrank_layout(low_rank_shape, side)
    num_blocks = -(-rows * padded_rank // BLOCK_SIZE)
    for name, codes in (("exp_avg_codes", exp_avg_codes), ("exp_avg_sq_codes", exp_avg_sq_codes)):
        check_dtype(name, codes, (torch.uint8,))
        check_shape(name, codes, (rows, padded_rank))
    for name, absmax in (("exp_avg_absmax", exp_avg_absmax), ("exp_avg_sq_absmax", exp_avg_sq_absmax)):
        check_dtype(name, absmax, (torch.float32,))
        check_shape(name, absmax, (num_blocks,))
    scalars = adam8bit_scalars(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step)

    low_rank, flag = low_rank_input(grad, proj_left, proj_right, side, grad_is_projected)
    normalized = torch.empty(low_rank.shape, dtype=normalized_dtype(param, side), device=param.device)
    if rows * padded_rank > 0:
        block_r, block_c, num_warps = _config(rows, padded_rank)
        grid = (triton.cdiv(rows, block_r) * (padded_rank // block_c),)
        _lowrank_adam8bit_kernel[grid](
            low_rank, normalized,
            exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax,
            *qmaps(param.device), flag,
            rows, low_rank.shape[1], padded_rank,
            low_rank.stride(0), low_rank.stride(1), normalized.stride(0), normalized.stride(1),
            exp_avg_codes.stride(0), exp_avg_codes.stride(1), exp_avg_sq_codes.stride(0), exp_avg_sq_codes.stride(1),
            exp_avg_absmax.stride(0), exp_avg_sq_absmax.stride(0),
            scalars["beta1"], scalars["one_minus_beta1"], scalars["beta2"], scalars["one_minus_beta2"],
            scalars["denom_eps"],
            QBLOCK=BLOCK_SIZE, BLOCK_R=block_r, BLOCK_C=block_c, BF16_BY_BITS=bf16_by_bits(),
            num_warps=num_warps,
        )
    back_project_apply(param, normalized, proj_left, proj_right, side, flag,
                       alpha=scale * scalars["step_size"], decay=scalars["decay"])
    nonfinite_skips.add_(flag)
