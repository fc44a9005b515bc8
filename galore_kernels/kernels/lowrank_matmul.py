"""The projection and back-projection matmuls of the GaLore steps.

One tiled matmul kernel ``out (M×N) = X (M×K) @ Y (K×N)`` with fp32 accumulation,
explicit strides for every operand (so transposed views cost nothing), and three
epilogues:

* ``"project"``: store the fp32 product and raise the non-finite flag when any of
  its elements is NaN or Inf. This is how the GaLore steps learn, for free, whether
  the low-rank gradient is finite (``nonfinite.py`` explains the flag).
* ``"store"``: store the fp32 product; return at once if the flag is set (an
  intermediate of the ``full`` back-projection, useless on a skipped step).
* ``"apply"``: ``out = (out + alpha * X@Y) * decay`` into the parameter, read and
  written once, with one rounding to its dtype; return at once if the flag is set.

Precision: 16-bit operands multiply on the tensor cores in that dtype (fp32 operands
are rounded to it, e.g. a fp32 projector against a bf16 gradient; the optimizers keep
a 16-bit parameter's projector in its dtype, so that rounding is done once per
refresh, not in every tile of every step), fp32 operands at ``matmul_precision``:
"tf32x3" (the default, tensor cores, about fp32's accuracy) or "ieee" (CUDA-core FMA),
see ``projector.MATMUL_PRECISIONS``.

The whole K dimension is reduced inside one program: split-K would need atomics
(non-deterministic) and would hand the nonlinear epilogue partial sums. Block sizes
come from ``_config`` (no autotuning: one config keeps the interpreter working and
the results bitwise reproducible).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..projector import side_of
from ._launch import (
    _member, _scalar, cdiv, check_matmul_precision, dot, dot_operand_dtype, interpreting, on_param_device, round_to,
)
from .nonfinite import _skipped, _stamp_flag_if_nonfinite, stamp_nonfinite

# EPILOGUE values; "store" is the remaining case, 0.
_PROJECT = tl.constexpr(1)
_APPLY = tl.constexpr(2)
_EPILOGUES = {"store": 0, "project": 1, "apply": 2}
# A grouped launch's table row: the offsets of x, y, out and the flag (``_launch._member``).
MATMUL_TABLE_COLUMNS = tl.constexpr(4)


@triton.jit(do_not_specialize=["alpha", "decay", "stamp"])
def _lowrank_matmul_kernel(
    # pointers
    x_ptr, y_ptr, out_ptr, flag_ptr,
    # sizes
    M, N, K,
    # strides
    stride_xm, stride_xk, stride_yk, stride_yn, stride_om, stride_on,
    # runtime epilogue scalars ("apply": out = (out + alpha * X@Y) * decay)
    alpha, decay,
    # the step's non-finite stamp (``nonfinite.py``; not specialized, so a new step compiles nothing)
    stamp,
    # meta-parameters
    EPILOGUE: tl.constexpr, OPERAND_DTYPE: tl.constexpr, FP32_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    STEP_ON_DEVICE: tl.constexpr = False,
    # a grouped launch (``grouped_steps.py``): program_id(1) is the member, whose x, y, out and flag
    # are at the offsets in its row of the int64 table (``_launch._member``)
    table_ptr=None, GROUPED: tl.constexpr = False,
):
    """``out = X @ Y`` with the epilogue of the module docstring, one output tile per program.

    Program order: a program writes only its own output tile and reads X and Y, which no
    program writes; "project" only raises the flag (an atomic max) and never reads it,
    the other epilogues read a flag from an earlier launch.
    STEP_ON_DEVICE (capturable steps): stamp, and alpha and decay of "apply", are the
    addresses of 0-d tensors holding them (``_launch.DeviceScalars``).
    GROUPED: every member has the sizes and strides given; members touch disjoint memory.
    """
    x_ptr = _member(x_ptr, table_ptr, 0, MATMUL_TABLE_COLUMNS, GROUPED)
    y_ptr = _member(y_ptr, table_ptr, 1, MATMUL_TABLE_COLUMNS, GROUPED)
    out_ptr = _member(out_ptr, table_ptr, 2, MATMUL_TABLE_COLUMNS, GROUPED)
    flag_ptr = _member(flag_ptr, table_ptr, 3, MATMUL_TABLE_COLUMNS, GROUPED)
    stamp = _scalar(stamp, STEP_ON_DEVICE)
    if EPILOGUE != _PROJECT:
        if _skipped(flag_ptr, stamp):
            return
    # Programs sharing a band of GROUP_M row tiles run together, so the band of X
    # stays in L2 while they sweep the columns of Y.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    # int64 offsets: 4096×11008 products of index and stride overflow int32 otherwise.
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    if EPILOGUE == _APPLY:
        # Issued before the K loop, so the read of W overlaps the loop's loads and dots
        # instead of adding one HBM round trip after them (at one CTA per SM, nothing
        # else hides it); the tile costs registers, not spills (bench/NOTES.md).
        current = tl.load(out_ptrs, mask=mask, other=0.0)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :], other=0.0,
        )
        y = tl.load(
            y_ptr + offs_k[:, None] * stride_yk + offs_n[None, :] * stride_yn,
            mask=mask_k[:, None] & mask_n[None, :], other=0.0,
        )
        acc = dot(x, y, acc, OPERAND_DTYPE, FP32_PRECISION)

    if EPILOGUE == _APPLY:
        updated = (current.to(tl.float32) + _scalar(alpha, STEP_ON_DEVICE) * acc) * _scalar(decay, STEP_ON_DEVICE)
        tl.store(out_ptrs, round_to(updated, current.dtype), mask=mask)
    else:
        if EPILOGUE == _PROJECT:
            _stamp_flag_if_nonfinite(acc, mask, flag_ptr, stamp)
        tl.store(out_ptrs, acc, mask=mask)


H100_SMS = 132
"""Stands in for the SM count where there is no CUDA device (the interpreter, a meta-tensor recording)."""


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return H100_SMS


@functools.lru_cache(maxsize=None)  # host time: a step asks for the same shapes every time
def _config(M: int, N: int, K: int, operand_16bit: bool, num_sms: int = H100_SMS, tensor_cores: bool = False) -> dict:
    """Block sizes and warps: sane H100 defaults until a GPU measures them (issue 12).

    16-bit: up to 128×128 output tiles, BLOCK_K 64; 8 warps from 64×64 up. fp32: up to
    32×64 tiles, BLOCK_K 32; 8 warps for IEEE (the CUDA cores), 4 for "tf32x3"
    (``tensor_cores``): with 8, its three products and operand splits spilled up to 16
    bytes at 16×64 and 32×64×16 tiles, and 64×64 tiles in 4 warps spilled 24 (255
    registers), in the sm_90 gate under Triton 3.6 and 3.8. Tiles shrink to
    the (power-of-two rounded) problem, never below tl.dot's minimum of 16. These
    compile for sm_90 without register spills under Triton 3.6 and 3.8
    (``bench/sm90_compile.py``): fp32 64×64×32 tiles spilled up to 12 KB in 4 warps
    and a few bytes in 8, and 16-bit 64×64 tiles in 4 warps spill at odd strides.

    A projection is skinny (one side is the rank): a 4096×4096 weight at rank 128 gives
    32 tiles of 128×128 for 132 SMs, and a memory-bound product on a quarter of the SMs
    cannot draw full bandwidth. So the tiles of the dimension with more of them are
    halved until the grid covers the SMs, down to 64 rows (a warpgroup's wgmma; 16 for
    fp32) or 32 columns. The rank dimension keeps its tiles, so G is still read
    ⌈r/BLOCK⌉ times.
    """
    cap_m, cap_n, cap_k = (128, 128, 64) if operand_16bit else (32, 64, 32)
    min_m, min_n = (64, 32) if operand_16bit else (16, 32)

    def fit(size: int, cap: int) -> int:
        return min(cap, max(16, triton.next_power_of_2(size)))

    block_m, block_n = fit(M, cap_m), fit(N, cap_n)
    while triton.cdiv(M, block_m) * triton.cdiv(N, block_n) < num_sms:
        tiles_m, tiles_n = triton.cdiv(M, block_m), triton.cdiv(N, block_n)
        if tiles_n >= tiles_m and block_n > min_n and tiles_n > 1:
            block_n //= 2
        elif tiles_m > tiles_n and block_m > min_m and tiles_m > 1:
            block_m //= 2
        else:
            break
    config = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=fit(K, cap_k), GROUP_M=8)
    if operand_16bit:
        config["num_warps"] = 8 if block_m * block_n >= 64 * 64 else 4
    else:
        config["num_warps"] = 4 if tensor_cores else 8
    if not interpreting():
        config["num_stages"] = 3
    return config


def lowrank_matmul(
    x: torch.Tensor,
    y: torch.Tensor,
    out: torch.Tensor,
    flag: torch.Tensor,
    *,
    epilogue: str,
    dot_dtype: torch.dtype,
    alpha: float | torch.Tensor = 1.0,
    decay: float | torch.Tensor = 1.0,
    matmul_precision: str = "tf32x3",
    stamp: int | torch.Tensor = 1,
    table: torch.Tensor | None = None,
) -> None:
    """Launch ``out = X @ Y`` with the given epilogue (see the module docstring).

    x: (M, K), y: (K, N), out: (M, N), any strides; out is fp32 for "store" and
    "project", the parameter (view) for "apply". flag: 0-d int32, raised to / read
    against ``stamp`` (``nonfinite.py``). dot_dtype: the dtype both operands are
    rounded to for the dot (bf16/fp16, or fp32 at ``matmul_precision``).
    A tensor ``stamp`` (``_launch.DeviceScalars``) is read on the device, and so are
    ``alpha`` and ``decay``, which must then be tensors too for "apply".
    ``table``: a grouped launch (``grouped_steps.py``), an int64 (members, 4) device tensor of
    every member's x, y, out and flag as element offsets from the tensors given here, which are the
    first member's and show every member's layout (``_launch._member``).
    Internal: the step launchers have checked every input.
    """
    (M, K), (K2, N) = x.shape, y.shape
    assert K2 == K and tuple(out.shape) == (M, N)
    if M == 0 or N == 0:
        return
    operand_dtype = dot_operand_dtype(dot_dtype)
    operand_16bit = operand_dtype is not tl.float32
    config = _config(M, N, K, operand_16bit, sm_count(out.device),
                     tensor_cores=not operand_16bit and matmul_precision == "tf32x3")
    # The tiles of one member, as in a launch of its own: the same reduction order, bitwise.
    grid = (cdiv(M, config["BLOCK_M"]) * cdiv(N, config["BLOCK_N"]), 1 if table is None else table.shape[0])
    _lowrank_matmul_kernel[grid](
        x, y, out, flag,
        M, N, K,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), out.stride(0), out.stride(1),
        alpha, decay, stamp,
        EPILOGUE=_EPILOGUES[epilogue],
        OPERAND_DTYPE=operand_dtype,
        FP32_PRECISION=matmul_precision,
        STEP_ON_DEVICE=torch.is_tensor(stamp),
        table_ptr=table, GROUPED=table is not None,
        **config,
    )


def normalized_dtype(param: torch.Tensor, side: str) -> torch.dtype:
    """The dtype of the normalized low-rank update handed to ``back_project_apply``.

    16-bit parameters back-project on the tensor cores in their dtype, so the update
    is stored rounded to it: N itself for bf16; for fp16 the scaled update α·N
    (``folds_step_size``), as galore-torch does, because fp16 cannot hold N (where an
    8-bit second moment dequantizes to 0, N is m/eps, far above fp16's 65504) but
    holds α·N. α = lr·scale·√(1-β2ᵗ)/(1-β1ᵗ) ≤ lr·scale for the usual betas; with
    fp32 moments |N| ≤ (1-β1)/(√(1-β2)·(1-β1/√β2)) ≈ 32 (0.9, 0.999), so |α·N| ≤
    32·lr·scale; with 8-bit ones, N = m/eps overflows only when |m| > 65504·eps/(lr·scale),
    2.6 at eps=1e-8, lr=1e-3, scale=0.25: an update that would wreck an fp16 weight anyway.
    fp32 parameters, and the (rare) ``full`` side, keep N in fp32.
    """
    if side != "full" and param.dtype in (torch.bfloat16, torch.float16):
        return param.dtype
    return torch.float32


def folds_step_size(param: torch.Tensor, side: str) -> bool:
    """True when the moment kernel writes α·N (fp16, see ``normalized_dtype``) and the back-projection adds it with α=1."""
    return normalized_dtype(param, side) == torch.float16


def project(grad: torch.Tensor, proj_left: torch.Tensor | None, proj_right: torch.Tensor | None,
            side: str, flag: torch.Tensor, matmul_precision: str = "tf32x3",
            stamp: int | torch.Tensor = 1) -> torch.Tensor:
    """The fp32 low-rank gradient as D, the layout of ``quant.lowrank_layout`` (contiguous), and the flag.

    Returns ``(directions, length)``: R = Pᵀ G for left (r×n), Rᵀ = (G Qᵀ)ᵀ for right
    (r×m), R = Pᵀ G Qᵀ for full (r1×r2). Every product is one kernel launch whose
    output is written straight into D (through transposed strides for right), and
    raises ``flag`` if it holds a NaN or Inf. (For full, a non-finite T always makes R
    non-finite too, since Inf·0 is NaN, so raising it on T as well is the same rule.)
    """
    # Products of a 16-bit gradient run in its dtype; full chains two products and
    # keeps its intermediate in fp32, so it multiplies in fp32 throughout.
    dot_dtype = grad.dtype if side != "full" else torch.float32
    if side == "left":  # R (r×n) = Pᵀ G
        low_rank = torch.empty(proj_left.shape[1], grad.shape[1], dtype=torch.float32, device=grad.device)
        lowrank_matmul(proj_left.t(), grad, low_rank, flag, epilogue="project", dot_dtype=dot_dtype,
                       matmul_precision=matmul_precision, stamp=stamp)
    elif side == "right":  # Rᵀ (r×m), written as R = G Qᵀ (m×r) through its transpose
        low_rank = torch.empty(proj_right.shape[0], grad.shape[0], dtype=torch.float32, device=grad.device)
        lowrank_matmul(grad, proj_right.t(), low_rank.t(), flag, epilogue="project", dot_dtype=dot_dtype,
                       matmul_precision=matmul_precision, stamp=stamp)
    else:  # T (r1×n) = Pᵀ G, then R (r1×r2) = T Qᵀ, in the reference's order
        partial = torch.empty(proj_left.shape[1], grad.shape[1], dtype=torch.float32, device=grad.device)
        lowrank_matmul(proj_left.t(), grad, partial, flag, epilogue="project", dot_dtype=dot_dtype,
                       matmul_precision=matmul_precision, stamp=stamp)
        low_rank = torch.empty(proj_left.shape[1], proj_right.shape[0], dtype=torch.float32, device=grad.device)
        lowrank_matmul(partial, proj_right.t(), low_rank, flag, epilogue="project", dot_dtype=dot_dtype,
                       matmul_precision=matmul_precision, stamp=stamp)
    return low_rank


@functools.lru_cache(maxsize=None)
def _discarded_flag(device: torch.device) -> torch.Tensor:
    """A flag that projections raise and nothing reads (``project_gradient``): allocated once per device,
    so the accumulation and clipping paths do not zero a flag per parameter per step."""
    return torch.zeros((), dtype=torch.int32, device=device)


@on_param_device
def project_gradient(grad: torch.Tensor, proj_left: torch.Tensor | None, proj_right: torch.Tensor | None,
                     *, matmul_precision: str = "tf32x3") -> torch.Tensor:
    """The fp32 low-rank gradient R, shaped as ``reference.galore_adamw.project`` returns it.

    For the optimizer's accumulation and clipping, which feed R back through
    ``grad_is_projected``; a non-finite R is caught there, so the flag is dropped.
    """
    check_matmul_precision(matmul_precision)
    side = side_of(proj_left, proj_right)
    layout = project(grad, proj_left, proj_right, side, _discarded_flag(grad.device), matmul_precision)
    return layout.t() if side == "right" else layout


def low_rank_input(grad: torch.Tensor, proj_left: torch.Tensor | None, proj_right: torch.Tensor | None,
                   side: str, grad_is_projected: bool, matmul_precision: str = "tf32x3", *,
                   flag: torch.Tensor | None = None,
                   stamp: int | torch.Tensor = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(D, flag)``: the fp32 low-rank gradient in the layout D (see ``project``) and its non-finite flag.

    With ``grad_is_projected`` the optimizer has already projected (and accumulated
    or clipped) the gradient: ``grad`` is R itself, fp32, and D is a strided view of
    it, checked by one flag pass over R's values instead of a projection.
    ``flag``: a persistent flag raised to ``stamp``; None allocates a zero one (stamp 1).
    """
    if flag is None:
        flag = torch.zeros((), dtype=torch.int32, device=grad.device)
    if not grad_is_projected:
        return project(grad, proj_left, proj_right, side, flag, matmul_precision, stamp), flag
    stamp_nonfinite(grad, flag, stamp)
    return (grad.t() if side == "right" else grad), flag


def back_project_apply(param: torch.Tensor, normalized: torch.Tensor, proj_left: torch.Tensor | None,
                       proj_right: torch.Tensor | None, side: str, flag: torch.Tensor,
                       *, alpha: float | torch.Tensor, decay: float | torch.Tensor, matmul_precision: str = "tf32x3",
                       stamp: int | torch.Tensor = 1) -> None:
    """``param = (param + alpha * back_project(N)) * decay`` in place, skipped if ``flag == stamp``.

    normalized: the normalized low-rank update N (or α·N, then alpha=1) in the layout
    D (as ``project`` returns), dtype ``normalized_dtype(param, side)``.
    left: W += α P N; right: W += α Nᵀ Q; full: A = P N (fp32 scratch, m×r2),
    then W += α A Q. The last launch reads and writes W once, with one rounding.
    A tensor ``stamp`` (capturable steps) comes with 0-d tensors ``alpha`` and ``decay``.
    """
    dot_dtype = normalized.dtype
    common = dict(dot_dtype=dot_dtype, matmul_precision=matmul_precision, stamp=stamp)
    if side == "left":
        lowrank_matmul(proj_left, normalized, param, flag, epilogue="apply", alpha=alpha, decay=decay, **common)
    elif side == "right":
        lowrank_matmul(normalized.t(), proj_right, param, flag, epilogue="apply", alpha=alpha, decay=decay, **common)
    else:
        partial = torch.empty(param.shape[0], proj_right.shape[0], dtype=torch.float32, device=param.device)
        lowrank_matmul(proj_left, normalized, partial, flag, epilogue="store", **common)
        lowrank_matmul(partial, proj_right, param, flag, epilogue="apply", alpha=alpha, decay=decay, **common)
