"""Natural GaLore's natural-gradient transform in three launches, with no host synchronization.

Implements ``reference/natural_galore.natural_gradient`` (same signature, same in-place
semantics; the math and its precision choices are documented there). For a k-value
low-rank gradient g, a history F of s ≤ 64 vectors (ring buffer, fp32 or bf16) and
its Gram FᵀF (fp64):

1. ``_history_dots_kernel``: h = g rounded to the history dtype, and the s + 1 dot
   products Fᵀh and h·h in fp64. Reads the history once. A fixed number of programs
   (at most ``MAX_PARTIALS``) each stride over k-chunks and write their partial sums;
   the solve adds them in a fixed order, so the result is bitwise reproducible with no
   atomics on data (the only atomic raises the non-finite flag, as in ``nonfinite.py``).
2. ``_solve_kernel`` (one program): sums the partials, writes row and column ``slot``
   of the Gram and advances the count when h is finite, then factors λI + FᵀF by
   Cholesky and solves for u, all on the s×s tile in registers (s ≤ 64: 64×64 fp64).
3. ``_combine_kernel``: ñ = (h − F u)/λ per k-chunk, with the slot's row taken as h;
   when h is finite it stores h into that row. Reads the history a second time.

bf16 histories are read and written as their 16-bit patterns and rounded to nearest
even explicitly, the same on a GPU and under the interpreter.

Not fused yet (the issue's stretch goals): Fᵀh into the projection's epilogue (k is
the projection's output, so launch 1 could read it from registers), and ñ straight
into the Adam update, so that it would never be written; here ñ goes through the
GaLore step functions with ``grad_is_projected=True``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import check_device, check_dtype, check_shape, on_param_device
from .nonfinite import _raise_flag_if_nonfinite

MAX_HISTORY = 64  # the s×s fp64 system lives in one program's registers
MAX_PARTIALS = 256  # programs of the dots pass: fixed, so the summation order is too


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
def _entering(grad_ptr, offs_k, mask_k, HISTORY_BF16: tl.constexpr):
    """``(h in fp32, h as stored)`` for a chunk of the gradient."""
    grad = tl.load(grad_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    if HISTORY_BF16:
        stored = _round_bf16_bits(grad)
        return _bf16_bits_to_fp32(stored), stored
    return grad, grad


@triton.jit
def _load_history(history_ptr, offs_s, offs_k, mask, stride_row, HISTORY_BF16: tl.constexpr):
    rows = tl.load(history_ptr + offs_s.to(tl.int64)[:, None] * stride_row + offs_k[None, :], mask=mask, other=0)
    if HISTORY_BF16:
        rows = _bf16_bits_to_fp32(rows)
    return rows.to(tl.float64)


@triton.jit
def _history_dots_kernel(
    # pointers
    grad_ptr, history_ptr, partial_ptr, flag_ptr,
    # sizes
    size, numel,
    # strides
    stride_row,
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
        entering, _ = _entering(grad_ptr, offs_k, mask_k, HISTORY_BF16)
        _raise_flag_if_nonfinite(entering, mask_k, flag_ptr)
        entering = entering.to(tl.float64)
        rows = _load_history(history_ptr, offs_s, offs_k, (offs_s < size)[:, None] & mask_k[None, :], stride_row, HISTORY_BF16)
        dots += tl.sum(rows * entering[None, :], axis=1)
        self_dot += entering * entering
    # Row 0: Fᵀh; row 1: h·h in its first entry.
    out = partial_ptr + pid * 2 * BLOCK_S
    tl.store(out + offs_s, dots)
    tl.store(out + BLOCK_S + offs_s, tl.where(offs_s == 0, tl.sum(self_dot, axis=0), 0.0))


@triton.jit
def _solve_kernel(
    # pointers
    partial_ptr, gram_ptr, count_ptr, flag_ptr, damping_ptr, solution_ptr, slot_ptr,
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
    finite = tl.load(flag_ptr) == 0
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
def _combine_kernel(
    # pointers
    grad_ptr, history_ptr, solution_ptr, slot_ptr, flag_ptr, damping_ptr, out_ptr,
    # sizes
    size, numel,
    # strides
    stride_row,
    # meta-parameters
    HISTORY_BF16: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_k = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < numel
    slot = tl.load(slot_ptr)
    finite = tl.load(flag_ptr) == 0
    damping = tl.load(damping_ptr)
    entering, stored = _entering(grad_ptr, offs_k, mask_k, HISTORY_BF16)
    entering = entering.to(tl.float64)
    rows = _load_history(history_ptr, offs_s, offs_k, (offs_s < size)[:, None] & mask_k[None, :], stride_row, HISTORY_BF16)
    rows = tl.where((offs_s == slot)[:, None] & finite, entering[None, :], rows)
    solution = tl.load(solution_ptr + offs_s)
    natural = (entering - tl.sum(rows * solution[:, None], axis=0)) / damping
    tl.store(out_ptr + offs_k, natural.to(tl.float32), mask=mask_k)
    if finite:
        tl.store(history_ptr + slot.to(tl.int64) * stride_row + offs_k, stored, mask=mask_k)


def _config(size: int, numel: int) -> tuple[int, int]:
    """``(BLOCK_S, BLOCK_K)``: an s×BLOCK_K fp64 tile of 4096 values per program."""
    block_s = max(triton.next_power_of_2(size), 2)
    block_k = min(max(4096 // block_s, 16), max(triton.next_power_of_2(numel), 16))
    return block_s, block_k


@on_param_device
def natural_gradient(
    low_rank_grad: torch.Tensor,
    grad_history: torch.Tensor,
    history_gram: torch.Tensor,
    history_count: torch.Tensor,
    *,
    damping: float,
) -> torch.Tensor:
    """Triton ``reference.natural_gradient``: enters g into the history, returns ñ (fp32)."""
    check_device(grad_history, low_rank_grad=low_rank_grad, history_gram=history_gram, history_count=history_count)
    check_dtype("low_rank_grad", low_rank_grad, (torch.float32, torch.bfloat16, torch.float16))
    check_dtype("grad_history", grad_history, (torch.float32, torch.bfloat16))
    check_dtype("history_gram", history_gram, (torch.float64,))
    check_dtype("history_count", history_count, (torch.int64,))
    size = grad_history.shape[0] if grad_history.dim() else 0
    if not 1 <= size <= MAX_HISTORY:
        raise ValueError(f"the Triton solve needs 1 <= natural_history <= {MAX_HISTORY}, got {size}")
    check_shape("low_rank_grad", low_rank_grad, tuple(grad_history.shape[1:]))
    check_shape("history_gram", history_gram, (size, size))
    check_shape("history_count", history_count, ())
    if not (grad_history.is_contiguous() and history_gram.is_contiguous()):
        raise ValueError("grad_history and history_gram must be contiguous (they are optimizer state)")
    if not damping > 0:
        raise ValueError(f"damping must be > 0, got {damping!r}")
    grad = low_rank_grad.contiguous()
    numel = grad.numel()
    history_bf16 = grad_history.dtype == torch.bfloat16
    history = grad_history.view(size, numel)
    if history_bf16:
        history = history.view(torch.int16)
    block_s, block_k = _config(size, numel)
    device = grad.device
    num_chunks = triton.cdiv(numel, block_k)
    num_partials = min(num_chunks, MAX_PARTIALS)
    partials = torch.empty((num_partials, 2, block_s), dtype=torch.float64, device=device)
    flag = torch.zeros((), dtype=torch.int32, device=device)
    # λ as an fp64 tensor: a Python float would reach the kernels as fp32.
    damping_value = torch.full((), damping, dtype=torch.float64, device=device)
    solution = torch.empty(block_s, dtype=torch.float64, device=device)
    slot = torch.empty((), dtype=torch.int32, device=device)
    natural = torch.empty(grad.shape, dtype=torch.float32, device=device)
    _history_dots_kernel[(num_partials,)](
        grad, history, partials, flag, size, numel, history.stride(0),
        HISTORY_BF16=history_bf16, BLOCK_S=block_s, BLOCK_K=block_k,
    )
    _solve_kernel[(1,)](
        partials, history_gram, history_count, flag, damping_value, solution, slot, size, num_partials,
        BLOCK_S=block_s,
    )
    _combine_kernel[(num_chunks,)](
        grad, history, solution, slot, flag, damping_value, natural, size, numel, history.stride(0),
        HISTORY_BF16=history_bf16, BLOCK_S=block_s, BLOCK_K=block_k,
    )
    return natural.view(low_rank_grad.shape)
