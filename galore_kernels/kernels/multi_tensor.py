"""Plain AdamW (fp32 moments) and plain 8-bit AdamW over many small tensors in ONE launch each.

A model's 1-D parameters (norms, biases) are many and small: LLaMA-7B has 65 norms
of 4096 values. One step per tensor costs two launches each (the non-finite flag
pass and the update) and tens of µs of host work each, for microseconds of GPU work.
As torch's ``_foreach``/fused optimizers do, these kernels take a table of tensor
addresses and update every tensor of a group in one launch:

* one program per tensor; the table row gives its element count and the addresses
  of its parameter, moments (or codes and absmaxes), non-finite flag and skip count.
  The rows of parameter and state addresses do not change between steps, so the
  table is built once and cached (``MultiTensorTable``); the gradients' addresses
  are a second, one-column table rebuilt only when some gradient moved.
* the program reads its whole gradient once to test it for NaN/Inf, and then, only
  if it is finite, updates the tensor chunk by chunk. The skip rule is per tensor,
  as with the per-tensor launchers: a non-finite gradient skips only that tensor's
  update (its flag is set to the stamp and its ``nonfinite_skips`` incremented, by
  its own program), the other tensors of the launch update normally.
* deterministic: each program owns one tensor and there are no atomics.

The math is exactly the per-tensor kernels' (``galore_adamw._adamw_moments_kernel``
with ``APPLY``, ``adamw8bit._adamw8bit_kernel``), same operation order; the test
compares the two bitwise. One launch handles tensors of one parameter dtype and one
gradient dtype (the pointer element types are compile-time); the launchers refuse a
mix and the optimizer launches once per dtype pair.

``MAX_NUMEL`` (16384) bounds a batched tensor: one program streams it alone, so a
large one would serialize on one SM. 16384 covers the norms and biases of models up
to hidden size 16384 (LLaMA-3-405B); larger tensors take the per-tensor launchers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant import BLOCK_SIZE
from ._launch import (
    PARAM_DTYPES, DeviceScalars, _scalar, check_device, check_dtype, int64_device_table, on_device_of, round_to,
)
from .adamw8bit import _adam8bit_blocks, adam8bit_scalars, device_step_scalars, qmaps
from .galore_adamw import adamw_scalars
from ..reference.multi_tensor import MAX_NUMEL
from .nonfinite import _is_nonfinite

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

# Table columns: numel, then the addresses of the parameter, the flag, the skip count and
# the moments (fp32: exp_avg, exp_avg_sq; 8-bit: the two codes and the two absmaxes).
_NUMEL, _PARAM, _FLAG, _SKIPS, _STATE = (tl.constexpr(column) for column in range(5))
FP32_COLUMNS, INT8_COLUMNS = 6, 8

BLOCK = 1024  # elements per chunk: 4 per thread at 8 warps (4 warps spill 8 bytes for fp32/fp16, sm_90 gate)
CHUNK_QBLOCKS = BLOCK // BLOCK_SIZE  # 8-bit: whole 256-value quantization blocks per chunk


@triton.jit
def _row_pointer(row_ptr, column: tl.constexpr, DTYPE: tl.constexpr):
    return tl.load(row_ptr + column).to(tl.pointer_type(DTYPE))


@triton.jit
def _any_nonfinite(grad_ptr, numel, BLOCK: tl.constexpr):
    """True when any of the ``numel`` contiguous values at ``grad_ptr`` is NaN or Inf."""
    bad = tl.full((), 0, tl.int32)
    for start in range(0, numel, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < numel
        grad = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        bad = tl.maximum(bad, tl.max((_is_nonfinite(grad) & mask).to(tl.int32)))
    return bad != 0


@triton.jit
def _skip_tensor(row_ptr, stamp):
    """A skipped tensor: its flag holds the stamp, its skip count one more (its own program only)."""
    tl.store(_row_pointer(row_ptr, _FLAG, tl.int32), stamp.to(tl.int32))
    skips_ptr = _row_pointer(row_ptr, _SKIPS, tl.int64)
    tl.store(skips_ptr, tl.load(skips_ptr) + 1)


@triton.jit(do_not_specialize=["denom_eps", "alpha", "decay", "stamp"])
def _multi_tensor_adamw_kernel(
    # the cached table (num_tensors × FP32_COLUMNS int64) and the gradients' addresses
    table_ptr, grad_table_ptr,
    # runtime hyperparameters (a scheduler changes them; constexpr would recompile)
    beta1, one_minus_beta1, beta2, one_minus_beta2, denom_eps, alpha, decay,
    # the step's non-finite stamp
    stamp,
    # meta-parameters
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, COLUMNS: tl.constexpr, BLOCK: tl.constexpr,
    STEP_ON_DEVICE: tl.constexpr = False,
):
    """Plain AdamW of tensor ``program_id`` of the table: param = (param + alpha * N) * decay.

    STEP_ON_DEVICE (capturable steps): denom_eps, alpha, decay and stamp are the addresses
    of 0-d tensors holding them (``_launch.DeviceScalars``).
    Program order: a program reads and writes only its own tensor's parameter, moments,
    flag and skip count; the tables are read-only.
    """
    denom_eps, alpha, decay = (_scalar(denom_eps, STEP_ON_DEVICE), _scalar(alpha, STEP_ON_DEVICE),
                               _scalar(decay, STEP_ON_DEVICE))
    stamp = _scalar(stamp, STEP_ON_DEVICE)
    tensor = tl.program_id(0).to(tl.int64)
    row_ptr = table_ptr + tensor * COLUMNS
    numel = tl.load(row_ptr + _NUMEL)
    grad_ptr = tl.load(grad_table_ptr + tensor).to(tl.pointer_type(GRAD_DTYPE))
    if _any_nonfinite(grad_ptr, numel, BLOCK):
        _skip_tensor(row_ptr, stamp)
        return
    param_ptr = _row_pointer(row_ptr, _PARAM, PARAM_DTYPE)
    exp_avg_ptr = _row_pointer(row_ptr, _STATE, tl.float32)
    exp_avg_sq_ptr = _row_pointer(row_ptr, _STATE + 1, tl.float32)
    for start in range(0, numel, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < numel
        grad = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        # The operation order of _adamw_moments_kernel, with (1 - beta) rounded on the host.
        exp_avg = tl.load(exp_avg_ptr + offs, mask=mask, other=0.0) * beta1 + one_minus_beta1 * grad
        exp_avg_sq = tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0.0) * beta2 + (one_minus_beta2 * grad) * grad
        tl.store(exp_avg_ptr + offs, exp_avg, mask=mask)
        tl.store(exp_avg_sq_ptr + offs, exp_avg_sq, mask=mask)
        normalized = exp_avg / (tl.sqrt(exp_avg_sq) + denom_eps)
        param = tl.load(param_ptr + offs, mask=mask, other=0.0)
        new_param = (param.to(tl.float32) + alpha * normalized) * decay
        tl.store(param_ptr + offs, round_to(new_param, PARAM_DTYPE), mask=mask)


@triton.jit(do_not_specialize=["step_size", "denom_eps", "decay", "stamp"])
def _multi_tensor_adamw8bit_kernel(
    # the cached table (num_tensors × INT8_COLUMNS int64) and the gradients' addresses
    table_ptr, grad_table_ptr,
    qmap_signed_ptr, qmap_unsigned_ptr, midpoints_signed_ptr, midpoints_unsigned_ptr,
    # runtime hyperparameters
    beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, denom_eps, decay,
    # the step's non-finite stamp
    stamp,
    # meta-parameters
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, COLUMNS: tl.constexpr,
    QBLOCK: tl.constexpr, CHUNK_QBLOCKS: tl.constexpr, STEP_ON_DEVICE: tl.constexpr = False,
):
    """Plain 8-bit AdamW of tensor ``program_id``, in chunks of whole 256-value blocks.

    STEP_ON_DEVICE: as ``_multi_tensor_adamw_kernel``'s.
    Program order: as ``_multi_tensor_adamw_kernel``; a chunk's blocks are its own.
    """
    step_size, denom_eps, decay = (_scalar(step_size, STEP_ON_DEVICE), _scalar(denom_eps, STEP_ON_DEVICE),
                                   _scalar(decay, STEP_ON_DEVICE))
    stamp = _scalar(stamp, STEP_ON_DEVICE)
    tensor = tl.program_id(0).to(tl.int64)
    row_ptr = table_ptr + tensor * COLUMNS
    numel = tl.load(row_ptr + _NUMEL)
    grad_ptr = tl.load(grad_table_ptr + tensor).to(tl.pointer_type(GRAD_DTYPE))
    if _any_nonfinite(grad_ptr, numel, QBLOCK * CHUNK_QBLOCKS):
        _skip_tensor(row_ptr, stamp)
        return
    param_ptr = _row_pointer(row_ptr, _PARAM, PARAM_DTYPE)
    exp_avg_codes_ptr = _row_pointer(row_ptr, _STATE, tl.uint8)
    exp_avg_absmax_ptr = _row_pointer(row_ptr, _STATE + 1, tl.float32)
    exp_avg_sq_codes_ptr = _row_pointer(row_ptr, _STATE + 2, tl.uint8)
    exp_avg_sq_absmax_ptr = _row_pointer(row_ptr, _STATE + 3, tl.float32)
    for first_block in range(0, tl.cdiv(numel, QBLOCK), CHUNK_QBLOCKS):
        blocks = first_block + tl.arange(0, CHUNK_QBLOCKS)
        offs = blocks[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
        valid = offs < numel
        block_valid = blocks * QBLOCK < numel
        grad = tl.load(grad_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        normalized, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax = _adam8bit_blocks(
            grad, valid,
            tl.load(exp_avg_codes_ptr + offs, mask=valid, other=0),
            tl.load(exp_avg_absmax_ptr + blocks, mask=block_valid, other=0.0),
            tl.load(exp_avg_sq_codes_ptr + offs, mask=valid, other=0),
            tl.load(exp_avg_sq_absmax_ptr + blocks, mask=block_valid, other=0.0),
            qmap_signed_ptr, qmap_unsigned_ptr, midpoints_signed_ptr, midpoints_unsigned_ptr,
            beta1, one_minus_beta1, beta2, one_minus_beta2, denom_eps,
        )
        param = tl.load(param_ptr + offs, mask=valid, other=0.0)
        new_param = (param.to(tl.float32) + step_size * normalized) * decay
        tl.store(param_ptr + offs, round_to(new_param, PARAM_DTYPE), mask=valid)
        tl.store(exp_avg_codes_ptr + offs, exp_avg_codes.to(tl.uint8), mask=valid)
        tl.store(exp_avg_sq_codes_ptr + offs, exp_avg_sq_codes.to(tl.uint8), mask=valid)
        tl.store(exp_avg_absmax_ptr + blocks, exp_avg_absmax, mask=block_valid)
        tl.store(exp_avg_sq_absmax_ptr + blocks, exp_avg_sq_absmax, mask=block_valid)


class MultiTensorTable:
    """The cached address tables of one multi-tensor launch (see the module docstring).

    ``tables(...)`` returns ``(state table, gradient table)``, rebuilding the first only
    when a parameter or state tensor moved (e.g. ``load_state_dict``) and the second only
    when a gradient did. A table holds addresses, not references: the caller keeps the
    tensors alive (they are the optimizer's parameters and state).
    """

    def __init__(self) -> None:
        self._state_key: tuple | None = None
        self._grad_key: tuple | None = None
        self._state_table: torch.Tensor | None = None
        self._grad_table: torch.Tensor | None = None

    def tables(self, params, grads, flags, skips, moments) -> tuple[torch.Tensor, torch.Tensor]:
        device = params[0].device
        rows = [[p.numel(), p.data_ptr(), f.data_ptr(), s.data_ptr(), *(m.data_ptr() for m in moment)]
                for p, f, s, moment in zip(params, flags, skips, moments)]
        state_key = tuple(map(tuple, rows)) + (device,)
        if state_key != self._state_key:
            self._state_table, self._state_key = int64_device_table(rows, device), state_key
        grad_key = tuple(g.data_ptr() for g in grads) + (device,)
        if grad_key != self._grad_key:
            self._grad_table, self._grad_key = int64_device_table([[a] for a in grad_key[:-1]], device), grad_key
        return self._state_table, self._grad_table


def _check_batch(params, grads, flags, skips, moments, moment_dtypes, stamp) -> None:
    """Equal-length lists; every tensor contiguous on params[0]'s device; one param and one grad dtype."""
    if not params:
        raise ValueError("params must not be empty")
    if not len(params) == len(grads) == len(flags) == len(skips) == len(moments):
        raise ValueError("params, grads, flags, nonfinite_skips and the moments must have equal lengths")
    param_dtype, grad_dtype = params[0].dtype, grads[0].dtype
    for i, (p, g, f, s, moment) in enumerate(zip(params, grads, flags, skips, moments)):
        check_device(params[0], tensor=p, grad=g, flag=f, nonfinite_skips=s)
        check_dtype(f"params[{i}]", p, PARAM_DTYPES)
        if p.dtype != param_dtype or g.dtype != grad_dtype:
            raise TypeError(
                f"one launch takes one param dtype and one grad dtype: tensor {i} is {p.dtype}/{g.dtype}, "
                f"tensor 0 {param_dtype}/{grad_dtype} (launch once per dtype pair)"
            )
        check_dtype(f"grads[{i}]", g, PARAM_DTYPES)
        if g.shape != p.shape:
            raise ValueError(f"grads[{i}] has shape {tuple(g.shape)}, params[{i}] {tuple(p.shape)}")
        if p.numel() > MAX_NUMEL:
            raise ValueError(f"params[{i}] has {p.numel()} elements, above MAX_NUMEL={MAX_NUMEL}: use the per-tensor step")
        for name, t in (("params", p), ("grads", g)):
            if not t.is_contiguous():
                raise ValueError(f"{name}[{i}] must be contiguous")
        if f.dtype != torch.int32 or f.dim() != 0:
            raise ValueError(f"flags[{i}] must be a 0-d int32 tensor")
        if s.dtype != torch.int64 or s.dim() != 0:
            raise ValueError(f"nonfinite_skips[{i}] must be a 0-d int64 tensor")
        for (name, dtype, numel), t in zip(moment_dtypes(p), moment):
            check_device(params[0], **{name: t})
            check_dtype(f"{name}[{i}]", t, (dtype,))
            if not t.is_contiguous() or t.numel() != numel:
                raise ValueError(f"{name}[{i}] must be contiguous with {numel} elements")
    if isinstance(stamp, bool) or not isinstance(stamp, int) or not 1 <= stamp < 2**31:
        raise ValueError(f"stamp must be an int in [1, 2**31), got {stamp!r}")


def _fp32_moments(p):
    return [("exp_avgs", torch.float32, p.numel()), ("exp_avg_sqs", torch.float32, p.numel())]


def _quantized_moments(p):
    blocks = -(-p.numel() // BLOCK_SIZE)
    return [("exp_avg_codes", torch.uint8, p.numel()), ("exp_avg_absmaxes", torch.float32, blocks),
            ("exp_avg_sq_codes", torch.uint8, p.numel()), ("exp_avg_sq_absmaxes", torch.float32, blocks)]


def multi_tensor_adamw_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    nonfinite_skips: list[torch.Tensor],
    flags: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    stamp: int,
    correct_bias: bool = True,
    bnb_eps: bool = False,
    table: MultiTensorTable | None = None,
    device_scalars: DeviceScalars | None = None,
) -> None:
    """``galore_adamw_step`` without a projector on every tensor, in one launch (``reference.multi_tensor``).

    Every list holds one entry per tensor: params (contiguous, at most ``MAX_NUMEL``
    values, all one dtype), grads (contiguous, params' shapes, all one dtype), fp32
    moments (contiguous, params' element counts), 0-d int64 skip counts and 0-d int32
    flags. All tensors share ``step`` (bias correction) and ``stamp``. ``table``: the
    cache of address tables, kept by the caller across steps; None builds them anew.
    device_scalars: capturable steps, one set for the whole launch (every tensor has the
    same step and hyperparameters), as ``galore_adamw_step``'s.
    """
    moments = list(zip(exp_avgs, exp_avg_sqs))
    _check_batch(params, grads, flags, nonfinite_skips, moments, _fp32_moments, stamp)
    scalars = adamw_scalars(lr=lr if device_scalars is None else 0.0, beta1=beta1, beta2=beta2, eps=eps,
                            weight_decay=weight_decay, step=step, correct_bias=correct_bias, bnb_eps=bnb_eps)
    per_step = (scalars["denom_eps"], -scalars["step_size"], scalars["decay"], stamp)
    if device_scalars is not None:
        per_step = (device_scalars.denom_eps, device_scalars.step_size, device_scalars.decay, device_scalars.stamp)
    state_table, grad_table = (table or MultiTensorTable()).tables(params, grads, flags, nonfinite_skips, moments)
    with on_device_of(params[0]):
        _multi_tensor_adamw_kernel[(len(params),)](
            state_table, grad_table,
            scalars["beta1"], scalars["one_minus_beta1"], scalars["beta2"], scalars["one_minus_beta2"], *per_step,
            PARAM_DTYPE=_TL_DTYPES[params[0].dtype], GRAD_DTYPE=_TL_DTYPES[grads[0].dtype],
            COLUMNS=FP32_COLUMNS, BLOCK=BLOCK, STEP_ON_DEVICE=device_scalars is not None, num_warps=8,
        )


def multi_tensor_adamw8bit_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avg_codes: list[torch.Tensor],
    exp_avg_absmaxes: list[torch.Tensor],
    exp_avg_sq_codes: list[torch.Tensor],
    exp_avg_sq_absmaxes: list[torch.Tensor],
    nonfinite_skips: list[torch.Tensor],
    flags: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    stamp: int,
    table: MultiTensorTable | None = None,
    device_scalars: DeviceScalars | None = None,
) -> None:
    """``adamw8bit_step`` on every tensor, in one launch (``reference.multi_tensor``).

    As ``multi_tensor_adamw_step``, with each tensor's 8-bit moments: contiguous uint8
    codes of its element count and contiguous fp32 absmaxes of ``ceil(numel / 256)``.
    """
    moments = list(zip(exp_avg_codes, exp_avg_absmaxes, exp_avg_sq_codes, exp_avg_sq_absmaxes))
    _check_batch(params, grads, flags, nonfinite_skips, moments, _quantized_moments, stamp)
    scalars = adam8bit_scalars(lr=lr if device_scalars is None else 0.0, beta1=beta1, beta2=beta2, eps=eps,
                               weight_decay=weight_decay, step=step)
    if device_scalars is not None:
        scalars, stamp = device_step_scalars(scalars, device_scalars), device_scalars.stamp
    state_table, grad_table = (table or MultiTensorTable()).tables(params, grads, flags, nonfinite_skips, moments)
    with on_device_of(params[0]):
        _multi_tensor_adamw8bit_kernel[(len(params),)](
            state_table, grad_table, *qmaps(params[0].device),
            **scalars, stamp=stamp,
            PARAM_DTYPE=_TL_DTYPES[params[0].dtype], GRAD_DTYPE=_TL_DTYPES[grads[0].dtype],
            COLUMNS=INT8_COLUMNS, QBLOCK=BLOCK_SIZE, CHUNK_QBLOCKS=CHUNK_QBLOCKS,
            STEP_ON_DEVICE=device_scalars is not None, num_warps=4,
        )
