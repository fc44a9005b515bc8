"""Natural GaLore's natural gradient, fed straight into the Adam moment kernels.

Implements the transform of ``reference/natural_galore.natural_gradient`` (the math and
its precision choices are documented there) as two launches plus a tile helper that the
Adam kernels call, so that ñ is never written to memory. For a k-value low-rank gradient
g, a history F of s ≤ 64 vectors (ring buffer, fp32 or bf16) and its Gram FᵀF (fp64):

1. ``_history_dots_kernel``: h = g rounded to the history dtype, and the s + 1 dot
   products Fᵀh and h·h in fp64. Reads the history once. A fixed number of programs
   (at most ``MAX_PARTIALS``) each stride over k-chunks and write their partial sums;
   the solve adds them in a fixed order, so the result is bitwise reproducible with no
   atomics on data. It raises the step's non-finite flag when h as stored is not finite
   (a finite fp32 value can round to a bf16 Inf), so the Adam step is skipped.
2. ``_solve_kernel`` (one program): sums the partials, writes row and column ``slot``
   of the Gram and advances the count when h is finite, then factors λI + FᵀF by
   Cholesky and solves for u, all on the s×s tile in registers (s ≤ 64: 64×64 fp64).
3. ``_natural_tile``, inside ``galore_adamw._adamw_moments_kernel`` and
   ``adamw8bit._adamw8bit_kernel`` (``NATURAL=True``): ñ = (h − F u)/λ for the tile of
   the low-rank gradient that program updates, with the slot's row taken as h, and h
   stored into that row. Reads the history a second time. The Adam kernels return at
   once on a raised flag, so a non-finite h never enters the ring.

Every launch reads D, the direction-major layout of the low-rank gradient
(``quant.lowrank_layout``: R, or Rᵀ for ``right``), while the history stores R
flattened row-major (the reference's order); ``NaturalOperands`` carries the history's
strides along D's two axes, so element (i, j) of D meets its own history entries.

bf16 histories are read and written as their 16-bit patterns and rounded to nearest
even explicitly, the same on a GPU and under the interpreter.

Not fused: Fᵀh into the projection's epilogue (bench/NOTES.md has the numbers).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._launch import check_device, check_dtype, check_shape
from .nonfinite import _stamp_flag_if_nonfinite

MAX_HISTORY = 64  # the s×s fp64 system lives in one program's registers
MAX_PARTIALS = 256  # programs of the dots pass: fixed, so the summation order is too
# 8 warps: 8 to 16 fp64 products per thread; with 4 a bf16-history tile spilled (sm_90 gate, Triton 3.6).
DOTS_NUM_WARPS = 8


@triton.jit
def _round_bf16_bits(x):
    """fp32 ``x`` rounded to nearest-even bf16, as int16 bit patterns (Inf stays Inf, NaN non-finite)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + (0x7FFF + ((bits >> 16) & 1))
    return (bits >> 16).to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def _bf16_bits_to_fp32(bits):
    return (bits.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _entering(grad, HISTORY_BF16: tl.constexpr):
    """``(h in fp32, h as stored)`` for a fp32 tile of the gradient."""
    # An explicit else: Triton compiles a return after a constexpr if even when the if returned,
    # and the two returns' types differ (int16 bits against fp32) for a bf16 history.
    if HISTORY_BF16:
        stored = _round_bf16_bits(grad)
        entering = _bf16_bits_to_fp32(stored)
    else:
        stored = grad
        entering = grad
    return entering, stored


@triton.jit
def _load_history(history_ptr, offs_s, offs_k, mask, stride_row, HISTORY_BF16: tl.constexpr):
    rows = tl.load(history_ptr + offs_s.to(tl.int64)[:, None] * stride_row + offs_k[None, :], mask=mask, other=0)
    if HISTORY_BF16:
        rows = _bf16_bits_to_fp32(rows)
    return rows.to(tl.float64)


@triton.jit(do_not_specialize=["stamp"])
def _history_dots_kernel(
    # pointers
    grad_ptr, history_ptr, partial_ptr, flag_ptr,
    # the step's non-finite stamp (``nonfinite.py``)
    stamp,
    # sizes: s, k, and the columns of D
    size, numel, cols,
    # strides: D's, and the history's along D's axes
    stride_grad_r, stride_grad_c, stride_slot, stride_history_r, stride_history_c,
    # meta-parameters
    HISTORY_BF16: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    offs_s = tl.arange(0, BLOCK_S)
    dots = tl.zeros((BLOCK_S,), dtype=tl.float64)
    self_dot = tl.zeros((BLOCK_K,), dtype=tl.float64)
    for chunk in range(pid, tl.cdiv(numel, BLOCK_K), num_programs):
        offs_k = chunk * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < numel
        row, col = offs_k // cols, offs_k % cols
        grad = tl.load(grad_ptr + row * stride_grad_r + col * stride_grad_c, mask=mask_k, other=0.0)
        entering, _ = _entering(grad, HISTORY_BF16)
        _stamp_flag_if_nonfinite(entering, mask_k, flag_ptr, stamp)
        entering = entering.to(tl.float64)
        offs_history = row * stride_history_r + col * stride_history_c
        rows = _load_history(history_ptr, offs_s, offs_history, (offs_s < size)[:, None] & mask_k[None, :],
                             stride_slot, HISTORY_BF16)
        dots += tl.sum(rows * entering[None, :], axis=1)
        self_dot += entering * entering
    # Row 0: Fᵀh; row 1: h·h in its first entry.
    out = partial_ptr + pid * 2 * BLOCK_S
    tl.store(out + offs_s, dots)
    tl.store(out + BLOCK_S + offs_s, tl.where(offs_s == 0, tl.sum(self_dot, axis=0), 0.0))


@triton.jit(do_not_specialize=["stamp"])
def _solve_kernel(
    # pointers
    partial_ptr, gram_ptr, count_ptr, flag_ptr, damping_ptr, solution_ptr, slot_ptr,
    # the step's non-finite stamp
    stamp,
    # sizes
    size, num_partials,
    # meta-parameters
    BLOCK_S: tl.constexpr,
):
    offs = tl.arange(0, BLOCK_S)
    rows, cols = offs[:, None], offs[None, :]
    dots = tl.zeros((BLOCK_S,), dtype=tl.float64)
    self_dots = tl.zeros((BLOCK_S,), dtype=tl.float64)
    for index in range(num_partials):
        dots += tl.load(partial_ptr + index * 2 * BLOCK_S + offs)
        self_dots += tl.load(partial_ptr + index * 2 * BLOCK_S + BLOCK_S + offs)
    self_dot = tl.sum(self_dots, axis=0)
    damping = tl.load(damping_ptr)
    count = tl.load(count_ptr)
    slot = (count % size).to(tl.int32)
    finite = tl.load(flag_ptr) != stamp
    # The slot's old vector leaves as h enters: its entry is h·h, not the old dot.
    dots = tl.where(offs == slot, self_dot, dots)

    in_system = (rows < size) & (cols < size)
    gram = tl.load(gram_ptr + rows * size + cols, mask=in_system, other=0.0)
    if finite:
        gram = tl.where(rows == slot, dots[None, :], gram)
        gram = tl.where(cols == slot, dots[:, None], gram)
        tl.store(gram_ptr + rows * size + cols, gram, mask=in_system)
        tl.store(count_ptr, count + 1)
    # Padding rows get an identity block, so the padded system stays SPD and u is 0 there.
    system = tl.where(rows == cols, gram + tl.where(rows < size, damping, 1.0).to(tl.float64), gram)

    # Cholesky, one column per iteration: l = A[:, j] / sqrt(A[j, j]) below the diagonal,
    # then the rank-one downdate A -= l lᵀ of the trailing block.
    factor = tl.zeros((BLOCK_S, BLOCK_S), dtype=tl.float64)
    for j in range(BLOCK_S):
        column = tl.sum(tl.where(cols == j, system, 0.0), axis=1)
        pivot = tl.sum(tl.where(offs == j, column, 0.0), axis=0)
        column = tl.where(offs >= j, column / tl.sqrt(pivot), 0.0)
        factor = tl.where(cols == j, column[:, None], factor)
        system = system - column[:, None] * column[None, :]

    # L y = Fᵀh (forward), then Lᵀ u = y (backward), in place in `solution`.
    solution = dots
    for j in range(BLOCK_S):
        column = tl.sum(tl.where(cols == j, factor, 0.0), axis=1)
        value = tl.sum(tl.where(offs == j, solution, 0.0), axis=0) / tl.sum(tl.where(offs == j, column, 0.0), axis=0)
        solution = tl.where(offs == j, value, tl.where(offs > j, solution - column * value, solution))
    for step in range(BLOCK_S):
        j = BLOCK_S - 1 - step
        row = tl.sum(tl.where(rows == j, factor, 0.0), axis=0)
        value = tl.sum(tl.where(offs == j, solution, 0.0), axis=0) / tl.sum(tl.where(offs == j, row, 0.0), axis=0)
        solution = tl.where(offs == j, value, tl.where(offs < j, solution - row * value, solution))
    tl.store(solution_ptr + offs, solution)
    tl.store(slot_ptr, slot)


@triton.jit
def _natural_tile(
    grad, mask, offs_history,
    history_ptr, solution_ptr, slot_ptr, damping_ptr,
    size, stride_slot,
    HISTORY_BF16: tl.constexpr,
):
    """ñ = (h − F u)/λ (fp32) for a fp32 tile ``grad`` of D, and h stored into the ring's slot.

    ``offs_history``: the tile's int32 offsets within one history row (``NaturalOperands``'
    strides along D's axes; a row holds under 2^31 values): they stay live across the
    loop, and int64 ones cost registers the sm_90 gate found short. F's slot row is h
    itself, as in the reference. The caller runs only when the step's flag is clear, so h
    is finite as stored. Program order: the history entries read and written are the
    tile's own.
    """
    entering, stored = _entering(grad, HISTORY_BF16)
    slot = tl.load(slot_ptr)
    combination = tl.zeros(grad.shape, dtype=tl.float64)
    # Advanced by the stride, not index * stride: s·k may exceed int32.
    row_ptr = history_ptr
    for index in range(size):
        row = tl.load(row_ptr + offs_history, mask=mask, other=0)
        row_ptr += stride_slot
        if HISTORY_BF16:
            row = _bf16_bits_to_fp32(row)
        row = tl.where(index == slot, entering, row)
        combination += row.to(tl.float64) * tl.load(solution_ptr + index)
    natural = (entering.to(tl.float64) - combination) / tl.load(damping_ptr)
    tl.store(history_ptr + slot.to(tl.int64) * stride_slot + offs_history, stored, mask=mask)
    return natural.to(tl.float32)


class NaturalOperands(NamedTuple):
    """What an Adam kernel needs to form ñ in place of D: the solve's outputs and the history.

    history: the ring as (s, *D's shape), int16 bit patterns for bf16, so that its strides
    are those along D's axes. solution: u (fp64, BLOCK_S); slot: int32 0-d; damping: fp64 0-d.
    """

    history: torch.Tensor
    solution: torch.Tensor
    slot: torch.Tensor
    damping: torch.Tensor
    history_bf16: bool


def natural_kernel_args(natural: NaturalOperands | None, placeholder: torch.Tensor, *, flat: bool = False) -> dict:
    """The ``NATURAL`` keyword arguments of the Adam kernels; ``placeholder`` fills unused pointers.

    flat: the kernel walks D's elements in flat row-major order (the 8-bit kernel) and
    also takes D's column count, ``history_cols``, to find (row, column).
    """
    if natural is None:
        args = dict(history_ptr=placeholder, solution_ptr=placeholder, slot_ptr=placeholder, damping_ptr=placeholder,
                    history_size=0, stride_history_slot=0, stride_history_r=0, stride_history_c=0,
                    NATURAL=False, HISTORY_BF16=False)
    else:
        history = natural.history
        args = dict(history_ptr=history, solution_ptr=natural.solution, slot_ptr=natural.slot,
                    damping_ptr=natural.damping, history_size=history.shape[0], stride_history_slot=history.stride(0),
                    stride_history_r=history.stride(1), stride_history_c=history.stride(2),
                    NATURAL=True, HISTORY_BF16=natural.history_bf16)
    if flat:
        args["history_cols"] = natural.history.shape[2] if natural is not None else 1
    return args


def _config(size: int, numel: int) -> tuple[int, int]:
    """``(BLOCK_S, BLOCK_K)``: an s×BLOCK_K fp64 tile of 4096 values per program."""
    block_s = max(triton.next_power_of_2(size), 2)
    block_k = min(max(4096 // block_s, 16), max(triton.next_power_of_2(numel), 16))
    return block_s, block_k


def check_history(grad_history: torch.Tensor, history_gram: torch.Tensor, history_count: torch.Tensor,
                  low_rank_shape: tuple[int, ...], damping: float) -> None:
    """Checks Natural GaLore's state for a low-rank gradient of ``low_rank_shape`` (R's, not D's)."""
    check_device(grad_history, history_gram=history_gram, history_count=history_count)
    check_dtype("grad_history", grad_history, (torch.float32, torch.bfloat16))
    check_dtype("history_gram", history_gram, (torch.float64,))
    check_dtype("history_count", history_count, (torch.int64,))
    size = grad_history.shape[0] if grad_history.dim() else 0
    if not 1 <= size <= MAX_HISTORY:
        raise ValueError(f"the Triton solve needs 1 <= natural_history <= {MAX_HISTORY}, got {size}")
    check_shape("grad_history", grad_history, (size, *low_rank_shape))
    check_shape("history_gram", history_gram, (size, size))
    check_shape("history_count", history_count, ())
    if not (grad_history.is_contiguous() and history_gram.is_contiguous()):
        raise ValueError("grad_history and history_gram must be contiguous (they are optimizer state)")
    if not damping > 0:
        raise ValueError(f"damping must be > 0, got {damping!r}")
    if math.prod(low_rank_shape) >= 2**31:
        raise ValueError(f"the Adam kernels index a history row in int32: k must be < 2^31, got shape {low_rank_shape}")


@functools.lru_cache(maxsize=64)
def _damping_tensor(damping: float, device: torch.device) -> torch.Tensor:
    """λ as an fp64 0-d tensor (a Python float would reach the kernels as fp32), made once per
    value and device rather than by a fill launch per parameter and step. Read-only."""
    return torch.full((), damping, dtype=torch.float64, device=device)


def solve_history(low_rank: torch.Tensor, side: str, grad_history: torch.Tensor, history_gram: torch.Tensor,
                  history_count: torch.Tensor, flag: torch.Tensor, *, damping: float, stamp: int = 1) -> NaturalOperands:
    """Launches 1 and 2 for the fp32 low-rank gradient in the layout D (any strides).

    Updates the Gram and the count in place when h is finite and ``flag`` does not hold
    ``stamp`` (else raises it to ``stamp``: the persistent flag of ``nonfinite.py``);
    the history row itself is written by the Adam kernel that consumes the result.
    Inputs are checked by the step functions (``check_history``).
    """
    size = grad_history.shape[0]
    rows, cols = low_rank.shape
    numel = rows * cols
    history_bf16 = grad_history.dtype == torch.bfloat16
    # R's row-major ring seen along D's axes: Rᵀ for right.
    history = grad_history.view(size, *((cols, rows) if side == "right" else (rows, cols)))
    if side == "right":
        history = history.transpose(1, 2)
    if history_bf16:
        history = history.view(torch.int16)
    block_s, block_k = _config(size, numel)
    device = low_rank.device
    num_partials = min(triton.cdiv(numel, block_k), MAX_PARTIALS)
    partials = torch.empty((num_partials, 2, block_s), dtype=torch.float64, device=device)
    damping_value = _damping_tensor(damping, device)
    solution = torch.empty(block_s, dtype=torch.float64, device=device)
    slot = torch.empty((), dtype=torch.int32, device=device)
    _history_dots_kernel[(num_partials,)](
        low_rank, history, partials, flag, stamp, size, numel, cols,
        low_rank.stride(0), low_rank.stride(1), history.stride(0), history.stride(1), history.stride(2),
        HISTORY_BF16=history_bf16, BLOCK_S=block_s, BLOCK_K=block_k, num_warps=DOTS_NUM_WARPS,
    )
    _solve_kernel[(1,)](
        partials, history_gram, history_count, flag, damping_value, solution, slot, stamp, size, num_partials,
        BLOCK_S=block_s,
    )
    return NaturalOperands(history, solution, slot, damping_value, history_bf16)
