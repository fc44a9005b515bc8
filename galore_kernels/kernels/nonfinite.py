"""Device-side flag for the skip rule: does a gradient hold a NaN or an Inf?

Every step leaves the parameter and its moments untouched when the (low-rank)
gradient is not finite, and must not synchronize with the host to find out. One
program cannot know about the others' elements, so the answer lives in a 0-d int32
device flag: programs that see a non-finite value raise it with an atomic max, and
the update launches that follow on the same stream read it and return at once.

The flag is step-stamped: a launch raises it to ``stamp`` (the optimizer passes the
parameter's ``step``, which only grows), and readers test ``flag == stamp``. A flag
raised at an earlier step holds a smaller stamp and reads as clear, so a persistent
flag in the optimizer state never needs zeroing (which was one launch per parameter
per step). The update launch that reads the flag first also counts the skip: its
program 0 adds one to ``nonfinite_skips`` (``_count_skip``), so no torch op follows.
A fresh zero flag with ``stamp=1`` is the old 0/1 flag: kernel families that still
allocate one per step (``natural_galore.py``, ``galore_adafactor.py``) read it with
``!= 0``, which is the same test.

This module is the flag pass for the plain (unprojected) steps. The GaLore steps
raise the same flag in the projection's epilogue instead (``lowrank_matmul.py``),
where it costs nothing.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._launch import _scalar, as_2d, cdiv

FLT_MAX = tl.constexpr(3.4028234663852886e38)  # largest finite fp32; |x| above it is Inf


@triton.jit
def _is_nonfinite(x):
    """Elementwise NaN-or-Inf test of an fp32 tile (explicit, so no fast-math folding can drop it)."""
    return (x != x) | (tl.abs(x) > FLT_MAX)


@triton.jit
def _stamp_flag_if_nonfinite(values, mask, flag_ptr, stamp):
    """Raise the flag to ``stamp`` when any masked-in element of ``values`` (fp32) is NaN or Inf.

    An atomic max: stamps only grow, so an older stamp is overwritten and concurrent
    raisers of the same stamp agree.
    """
    bad = tl.max((_is_nonfinite(values) & mask).to(tl.int32))
    # Only programs that saw a bad value touch the flag, so the common case has no
    # atomic contention on a single address.
    if bad != 0:
        tl.atomic_max(flag_ptr, stamp.to(tl.int32))


@triton.jit
def _skipped(flag_ptr, stamp):
    """True when this step's update is skipped: the flag holds this step's stamp."""
    return tl.load(flag_ptr) == stamp


@triton.jit
def _count_skip(skips_ptr, COUNT_SKIPS: tl.constexpr):
    """Program 0 of a skipping launch adds one to the 0-d ``nonfinite_skips`` (int64).

    Called only where ``_skipped`` held; one program, so a plain read-modify-write.
    """
    if COUNT_SKIPS:
        if tl.program_id(0) == 0:
            tl.store(skips_ptr, tl.load(skips_ptr) + 1)


@triton.jit(do_not_specialize=["stamp"])
def _nonfinite_flag_kernel(
    # pointers
    x_ptr, flag_ptr,
    # the step's stamp (not specialized: a new step must not compile anew), or its address (STEP_ON_DEVICE)
    stamp,
    # sizes
    rows, cols,
    # strides
    stride_row, stride_col,
    # meta-parameters
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, STEP_ON_DEVICE: tl.constexpr = False,
):
    """Raise ``flag`` to ``stamp`` if this program's ``BLOCK_R × BLOCK_C`` tile of x holds a NaN or Inf.

    Program order: programs only raise the flag with an atomic max, which commutes, and none reads it.
    """
    pid = tl.program_id(0).to(tl.int64)
    num_col_tiles = tl.cdiv(cols, BLOCK_C)
    offs_r = (pid // num_col_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = (pid % num_col_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (offs_r[:, None] < rows) & (offs_c[None, :] < cols)
    x = tl.load(x_ptr + offs_r[:, None] * stride_row + offs_c[None, :] * stride_col, mask=mask, other=0.0)
    _stamp_flag_if_nonfinite(x.to(tl.float32), mask, flag_ptr, _scalar(stamp, STEP_ON_DEVICE))


@functools.lru_cache(maxsize=None)
def _config(rows: int, cols: int) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_C, num_warps)``: 4096-element tiles, wide along the columns.

    8 warps, 16 elements per thread: with 4 warps ptxas spills the 16-bit loads of a
    row whose length is not a multiple of 16 (sm_90 compile gate, Triton 3.6 and 3.8).
    """
    block_c = min(1024, triton.next_power_of_2(max(cols, 1)))
    return max(4096 // block_c, 1), block_c, 8


def nonfinite_flag(tensor: torch.Tensor) -> torch.Tensor:
    """A fresh 0-d int32 device tensor: 1 if ``tensor`` has a NaN or Inf, else 0.

    ``tensor``: any shape and strides the launchers accept (see ``_launch.as_2d``).
    Asynchronous: the flag is read by later launches, never by the host.
    """
    flag = torch.zeros((), dtype=torch.int32, device=tensor.device)
    stamp_nonfinite(tensor, flag, 1)
    return flag


def new_flag(device: torch.device) -> torch.Tensor:
    """A clear flag for any stamp >= 1: what the optimizer keeps per parameter."""
    return torch.zeros((), dtype=torch.int32, device=device)


def checked_flag(param: torch.Tensor, flag: torch.Tensor | None, stamp: int) -> torch.Tensor:
    """The step launchers' ``flag``/``stamp`` arguments checked: a persistent flag is 0-d int32 on
    ``param``'s device, ``stamp`` an int in [1, 2**31). None: a fresh zero flag (one launch)."""
    if flag is None:
        flag = new_flag(param.device)
    if flag.dtype != torch.int32 or flag.dim() != 0:
        raise ValueError(f"flag must be a 0-d int32 tensor, got {flag.dtype} of shape {tuple(flag.shape)}")
    if flag.device != param.device:
        raise ValueError(f"flag is on {flag.device}, but param is on {param.device}")
    if isinstance(stamp, bool) or not isinstance(stamp, int) or not 1 <= stamp < 2**31:
        raise ValueError(f"stamp must be an int in [1, 2**31), got {stamp!r}")
    return flag


def stamp_nonfinite(tensor: torch.Tensor, flag: torch.Tensor, stamp: int | torch.Tensor) -> None:
    """Raise ``flag`` (0-d int32) to ``stamp`` if ``tensor`` has a NaN or Inf: one launch, no zeroing.

    ``stamp``: an int, or the 0-d int32 device tensor holding it (``_launch.DeviceScalars``).
    """
    layout = as_2d(tensor)
    if layout is None:
        raise ValueError("tensor must be addressable as a strided 2-D view")
    rows, cols, stride_row, stride_col = layout
    if rows * cols == 0:
        return
    block_r, block_c, num_warps = _config(rows, cols)
    grid = (cdiv(rows, block_r) * cdiv(cols, block_c),)
    _nonfinite_flag_kernel[grid](
        tensor, flag, stamp, rows, cols, stride_row, stride_col,
        BLOCK_R=block_r, BLOCK_C=block_c, STEP_ON_DEVICE=torch.is_tensor(stamp), num_warps=num_warps,
    )
