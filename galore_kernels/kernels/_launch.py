"""Helpers shared by the launchers (input checks, strided 2-D views, dot precision)
and the jit helpers shared by the kernels (the rounding at a store, the tile dot).

Nothing here launches a kernel. Each launcher calls the checks before its first
launch, so that a bad input raises a clear ``TypeError``/``ValueError`` instead of a
Triton error or a silent wrong answer.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..projector import MATMUL_PRECISIONS, check_matmul_precision  # noqa: F401  (the launchers' check)

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def interpreting() -> bool:
    """True when Triton runs kernels under its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def on_device_of(param: torch.Tensor):
    """A context with ``param``'s CUDA device current (none needed for a CPU or meta tensor).

    Triton launches on the current device, not on the tensors': a model split across
    GPUs (``device_map="auto"``) would otherwise run a cuda:1 parameter's kernels on
    cuda:0.
    """
    return torch.cuda.device(param.device) if param.is_cuda else contextlib.nullcontext()


def on_param_device(launcher):
    """Run a step launcher with ``param``'s CUDA device current (``on_device_of``)."""

    @functools.wraps(launcher)
    def launch_on_param_device(param: torch.Tensor, *args, **kwargs):
        with on_device_of(param):
            return launcher(param, *args, **kwargs)

    return launch_on_param_device


def int64_device_table(rows: list, device: torch.device) -> torch.Tensor:
    """An int64 device tensor of ``rows`` (the launchers' address and offset tables), copied
    without synchronizing the host (pinned source)."""
    host = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cuda":
        # The caching host allocator keeps a pinned block until its copy has run.
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


class DeviceScalars(NamedTuple):
    """The per-step scalars of one parameter's launches as 0-d device tensors (``capturable=True``).

    A CUDA graph replays its launches with the arguments of the capture, so every scalar
    that changes from one step to the next is read by the kernels from these tensors
    (``STEP_ON_DEVICE``) instead of passed by value. The optimizer writes them on the
    device before the step's launches (``optim/capturable.py``); a launcher given them
    ignores its ``lr``, ``step``, ``stamp`` and ``scale`` for these quantities.
    """

    stamp: torch.Tensor  # int32: the parameter's step, the non-finite stamp (``nonfinite.py``)
    step_size: torch.Tensor  # fp32: -lr·√(1-β2ᵗ)/(1-β1ᵗ) (-lr without bias correction), t the bias step
    scaled_step_size: torch.Tensor  # fp32: step_size·scale, the GaLore back-projection's α
    denom_eps: torch.Tensor  # fp32: eps, or eps·√(1-β2ᵗ) (bitsandbytes)
    decay: torch.Tensor  # fp32: 1 - lr·weight_decay (1 without weight decay)
    one: torch.Tensor  # fp32 1.0: the α of a launch that does not scale


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for launch grids: ``triton.cdiv`` is a constexpr function whose host
    call costs several µs, and a step computes a grid per launch."""
    return -(-a // b)


def check_device(param: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    """Every tensor on ``param``'s device; CPU only under the interpreter."""
    if param.device.type == "cpu" and not interpreting():
        raise ValueError("the Triton kernels need CUDA tensors (CPU tensors only with TRITON_INTERPRET=1)")
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != param.device:
            raise ValueError(f"{name} is on {tensor.device}, but param is on {param.device}")


def check_dtype(name: str, tensor: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    if tensor.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {tensor.dtype}")


def check_shape(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")


def check_skips(nonfinite_skips: torch.Tensor) -> None:
    if nonfinite_skips.dim() != 0:
        raise ValueError(f"nonfinite_skips must be a 0-d tensor, got shape {tuple(nonfinite_skips.shape)}")


def check_contiguous(name: str, tensor: torch.Tensor) -> None:
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def as_2d(tensor: torch.Tensor) -> tuple[int, int, int, int] | None:
    """``(rows, cols, stride_row, stride_col)`` addressing ``tensor`` in row-major element order.

    Element ``i`` of ``tensor.reshape(-1)`` sits at ``(i // cols) * stride_row +
    (i % cols) * stride_col``. Adjacent dims are merged where the strides allow;
    None when more than two dims remain (a layout no optimizer produces).
    """
    dims = [(size, stride) for size, stride in zip(tensor.shape, tensor.stride()) if size != 1]
    merged: list[tuple[int, int]] = []
    for size, stride in dims:
        if merged and merged[-1][1] == size * stride:
            merged[-1] = (merged[-1][0] * size, stride)
        else:
            merged.append((size, stride))
    if len(merged) > 2:
        return None
    while len(merged) < 2:
        merged.insert(0, (1, 0))
    (rows, stride_row), (cols, stride_col) = merged
    return rows, cols, stride_row, stride_col


def dot_operand_dtype(dtype: torch.dtype):
    """The ``OPERAND_DTYPE`` constexpr of ``dot``: 16-bit tensors multiply on the tensor
    cores in their own dtype (fp32 accumulation); fp32 tensors in fp32, at the
    ``FP32_PRECISION`` of ``projector.MATMUL_PRECISIONS``."""
    return _TL_DTYPES[dtype] if dtype in (torch.bfloat16, torch.float16) else tl.float32


@triton.jit
def _round_to_native(x, DTYPE: tl.constexpr):
    """``x`` rounded to nearest-even in ``DTYPE``: a parameter's single rounding, a dot operand."""
    return x.to(DTYPE)


@triton.jit
def _scalar(value, ON_DEVICE: tl.constexpr):
    """A per-step scalar argument: ``value`` itself, or (``ON_DEVICE``, capturable steps) loaded from
    the 0-d tensor ``value`` points to (``DeviceScalars``)."""
    if ON_DEVICE:
        value = tl.load(value)
    return value


MEMBER_ALIGNMENT = tl.constexpr(16)
"""Bytes: the pointer alignment Triton specializes a kernel on (an argument's address divisible by 16)."""


@triton.jit
def _member(ptr, table_ptr, COLUMN: tl.constexpr, COLUMNS: tl.constexpr, GROUPED: tl.constexpr):
    """``ptr`` itself, or (``GROUPED``, a launch over many same-shape parameters) this member's tensor:
    ``ptr`` is the first member's, and ``COLUMN`` of row ``program_id(1)`` of the int64 table at
    ``table_ptr`` holds the member's offset from it in elements (``grouped_steps.py``).

    The offsets are whole multiples of ``MEMBER_ALIGNMENT`` bytes (the launcher checks), and the
    compiler is told so: every member then has the alignment Triton specialized the first member's
    pointer on, and loads stay as wide as in a launch of one parameter.
    """
    if GROUPED:
        row_ptr = table_ptr + tl.program_id(1).to(tl.int64) * COLUMNS
        element_bytes: tl.constexpr = ptr.dtype.element_ty.primitive_bitwidth // 8
        ptr += tl.multiple_of(tl.load(row_ptr + COLUMN), MEMBER_ALIGNMENT // element_bytes)
    return ptr


@triton.jit
def _dot_native(x, y, acc, OPERAND_DTYPE: tl.constexpr, FP32_PRECISION: tl.constexpr):
    """``acc + x @ y`` with both tiles rounded to OPERAND_DTYPE; fp32 at FP32_PRECISION ("tf32x3" or "ieee")."""
    if OPERAND_DTYPE == tl.float32:
        return tl.dot(x.to(tl.float32), y.to(tl.float32), acc, input_precision=FP32_PRECISION)
    return tl.dot(x.to(OPERAND_DTYPE), y.to(OPERAND_DTYPE), acc)


# The kernels call ``round_to`` and ``dot``. Under the interpreter they are replaced by
# ``_interpreter.py``'s workarounds, chosen here once, so that the GPU kernels carry no
# interpreter-only arguments.
if interpreting():
    from ._interpreter import dot, round_to
else:
    round_to, dot = _round_to_native, _dot_native
