"""AdamW with blockwise 8-bit moments (bitsandbytes' semantics), as Triton kernels.

Implements ``reference/adamw8bit.py`` (the contract; read it for the math). The
moments are uint8 codes into bitsandbytes' dynamic maps (``quant.py``), one fp32
absmax per 256 consecutive elements of the flattened parameter.

Launch structure (two launches, no host synchronization):

1. ``nonfinite.stamp_nonfinite(grad)`` reads g once and raises a device flag to the
   step's stamp when any element is NaN or Inf. No single program of the update can
   know that, and a skipped step must leave every block untouched.
2. ``_adamw8bit_kernel``: each program owns ``BLOCKS_PER_PROG`` whole 256-blocks, so
   the new absmax of a block comes from registers. It returns at once when the flag
   holds the stamp (program 0 counts the skip). Otherwise it dequantizes, updates both moments, updates the parameter
   with a single rounding to its dtype, and requantizes (absmax of the *updated*
   state, exact nearest code by ``_nearest_code``, sign fix for the signed map).

``galore_adamw8bit.py`` runs the same kernel (``launch_adamw8bit`` with
``apply=False``) over the direction-major low-rank layout, writing N instead of
updating a parameter.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..quant import BLOCK_SIZE, dynamic_map, dynamic_map_midpoints
from ._launch import (
    on_param_device,
    PARAM_DTYPES, DeviceScalars, _member, _scalar, as_2d, cdiv, check_contiguous, check_device, check_dtype, check_shape,
    check_skips, round_to,
)
from .natural_galore import NaturalOperands, _natural_tile, natural_kernel_args
from .nonfinite import _count_skip, _skipped, checked_flag, stamp_nonfinite


@triton.jit
def _dequantize(codes, absmax, qmap_ptr):
    """fp32 values of uint8 ``codes`` scaled by a broadcastable ``absmax``."""
    return tl.load(qmap_ptr + codes.to(tl.int32)) * absmax


@triton.jit
def _nearest_code(x, midpoints_ptr, SIGNED: tl.constexpr):
    """The nearest code of the dynamic map to ``x`` in [-1, 1]: the number of its 255
    midpoints strictly below ``x`` (ties round down), exactly as ``torch.bucketize``.

    The map (``quant.create_dynamic_map``) puts ``n = 2**(d + UNSIGNED)`` codes, evenly
    spaced, in each decade ``[10**(d-7), 10**(d-6))``, d = 0..6. The decade and the
    position in it give the code to within one (the floor of the position; checked in
    an fp32 emulation on every code and midpoint ±300 ulps and 10M random values, and by
    ``test_nearest_code_is_exact`` under Triton), and one comparison with each
    neighbouring midpoint makes it exact: two independent table loads instead of a
    binary search's eight dependent ones.
    """
    a = tl.abs(x)
    decade = ((a >= 1e-6).to(tl.int32) + (a >= 1e-5).to(tl.int32) + (a >= 1e-4).to(tl.int32)
              + (a >= 1e-3).to(tl.int32) + (a >= 1e-2).to(tl.int32) + (a >= 1e-1).to(tl.int32))
    to_unit = tl.where(decade == 0, 1e6, tl.where(decade == 1, 1e5, tl.where(decade == 2, 1e4, tl.where(
        decade == 3, 1e3, tl.where(decade == 4, 1e2, tl.where(decade == 5, 1e1, 1.0))))))
    per_decade = (1 << (decade + (0 if SIGNED else 1))).to(tl.float32)
    # Codes of a decade sit at 0.1 + 0.9 * (j + 0.5) / n of it.
    position = tl.floor((a * to_unit - 0.1) * (per_decade / 0.9))
    position = tl.minimum(tl.maximum(position, 0.0), per_decade - 1.0).to(tl.int32)
    # The decades below hold 1 + 2 + ... + n/2 = n - 1 codes (signed), 2 + ... + n/2 = n - 2 (unsigned).
    magnitude = per_decade.to(tl.int32) - (1 if SIGNED else 2) + position
    if SIGNED:
        # 127 negative codes mirror the positive ones around the single zero, code 127.
        estimate = tl.where(x < 0, 126 - magnitude, 128 + magnitude)
    else:
        estimate = 1 + magnitude
    # In range even for a NaN x (an overflowed moment): the loads below must stay in the table.
    estimate = tl.minimum(tl.maximum(estimate, 0), 255)
    above = tl.load(midpoints_ptr + estimate, mask=estimate < 255, other=float("inf"))
    below = tl.load(midpoints_ptr + estimate - 1, mask=estimate > 0, other=-float("inf"))
    return estimate + (above < x).to(tl.int32) - (x <= below).to(tl.int32)


@triton.jit
def _quantize_blocks(values, midpoints_ptr, SIGNED: tl.constexpr):
    """Quantize a ``(NUM_BLOCKS, 256)`` fp32 tile, one quantization block per row.

    Returns ``(codes int32, absmax (NUM_BLOCKS,))`` exactly as ``quant.quantize_blockwise``.
    """
    absmax = tl.max(tl.abs(values), axis=1)
    # Multiply by a correctly rounded reciprocal, as the reference and bitsandbytes'
    # CUDA kernel do; an all-zero block normalizes to zero instead of 0/0.
    safe_absmax = tl.where(absmax > 0, absmax, 1.0)
    inv_absmax = tl.where(absmax > 0, tl.div_rn(tl.full(absmax.shape, 1.0, tl.float32), safe_absmax), 0.0)
    normalized = values * inv_absmax[:, None]
    codes = _nearest_code(normalized, midpoints_ptr, SIGNED)
    if SIGNED:
        # Only the single zero code can carry the wrong sign; moving one code towards
        # the value's own sign keeps a small negative momentum from decoding as +0.
        # Sign bits are compared, as torch.signbit does, so -0.0 counts as negative;
        # the codes below 127 are exactly the negative ones.
        code_negative = codes < 127
        value_negative = normalized.to(tl.int32, bitcast=True) < 0
        codes = tl.where(code_negative != value_negative, tl.where(normalized > 0, codes + 1, codes - 1), codes)
    return codes, absmax


@triton.jit
def _adam8bit_blocks(
    grad, valid,
    exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax,
    qmap_signed_ptr, qmap_unsigned_ptr, midpoints_signed_ptr, midpoints_unsigned_ptr,
    beta1, one_minus_beta1, beta2, one_minus_beta2, denom_eps,
):
    """One Adam update of ``(NUM_BLOCKS, 256)`` tiles of 8-bit moments.

    ``grad`` fp32 and ``valid`` (elements that exist) are tiles, the absmaxes are
    ``(NUM_BLOCKS,)``. Elements that do not exist hold zero state, as the zero
    padding of ``quant.quantize_blockwise`` does. Returns ``(normalized, new
    exp_avg codes, absmax, new exp_avg_sq codes, absmax)`` where ``normalized =
    s1 / (sqrt(s2) + denom_eps)``; the caller scales it by the step size.
    """
    exp_avg = tl.where(valid, _dequantize(exp_avg_codes, exp_avg_absmax[:, None], qmap_signed_ptr), 0.0)
    exp_avg_sq = tl.where(valid, _dequantize(exp_avg_sq_codes, exp_avg_sq_absmax[:, None], qmap_unsigned_ptr), 0.0)
    # Same operation order as the reference, with (1 - beta) rounded on the host.
    exp_avg = exp_avg * beta1 + one_minus_beta1 * grad
    exp_avg_sq = exp_avg_sq * beta2 + (one_minus_beta2 * grad) * grad
    normalized = exp_avg / (tl.sqrt(exp_avg_sq) + denom_eps)
    # The new absmax is that of the *updated* moments, so they are never clipped.
    new_exp_avg_codes, new_exp_avg_absmax = _quantize_blocks(exp_avg, midpoints_signed_ptr, True)
    new_exp_avg_sq_codes, new_exp_avg_sq_absmax = _quantize_blocks(exp_avg_sq, midpoints_unsigned_ptr, False)
    return normalized, new_exp_avg_codes, new_exp_avg_absmax, new_exp_avg_sq_codes, new_exp_avg_sq_absmax


# A grouped launch's table row: out, grad, exp_avg codes and absmax, exp_avg_sq codes and absmax, flag, skips.
INT8_TABLE_COLUMNS = tl.constexpr(8)


@triton.jit(do_not_specialize=["step_size", "denom_eps", "decay", "stamp"])
def _adamw8bit_kernel(
    # pointers
    out_ptr, grad_ptr,
    exp_avg_codes_ptr, exp_avg_absmax_ptr, exp_avg_sq_codes_ptr, exp_avg_sq_absmax_ptr,
    qmap_signed_ptr, qmap_unsigned_ptr, midpoints_signed_ptr, midpoints_unsigned_ptr,
    flag_ptr, skips_ptr,
    # sizes: the flat element count, and the column counts of the 2-D strided views
    numel, out_cols, grad_cols,
    # strides of those views
    stride_out_row, stride_out_col, stride_grad_row, stride_grad_col,
    # runtime hyperparameters (a scheduler changes them; constexpr would recompile)
    beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, denom_eps, decay,
    # Natural GaLore (NATURAL): natural_galore.natural_kernel_args
    history_ptr, solution_ptr, slot_ptr, damping_ptr, history_size, history_cols,
    stride_history_slot, stride_history_r, stride_history_c,
    # the step's non-finite stamp (``nonfinite.py``)
    stamp,
    # meta-parameters
    APPLY: tl.constexpr, COUNT_SKIPS: tl.constexpr,
    QBLOCK: tl.constexpr, BLOCKS_PER_PROG: tl.constexpr, OUT_FLAT: tl.constexpr, GRAD_FLAT: tl.constexpr,
    NATURAL: tl.constexpr, HISTORY_BF16: tl.constexpr, STEP_ON_DEVICE: tl.constexpr = False,
    # a grouped launch (``grouped_steps.py``): program_id(1) is the member, whose eight pointers (out,
    # grad, the moments' codes and absmaxes, flag, skips) are at the offsets in its table row (``_launch._member``)
    table_ptr=None, GROUPED: tl.constexpr = False,
):
    """8-bit Adam over ``numel`` values in 256-blocks of the flat codes; N = s1 / (sqrt(s2) + denom_eps).

    APPLY: out is the parameter, out = (out + step_size * N) * decay (plain AdamW).
    Otherwise out receives step_size * N for the GaLore back-projection (the GaLore
    launcher passes 1, or the whole step α when it folds it into N, ``folds_step_size``).
    NATURAL (the flat elements are D's): the moments see Natural GaLore's ñ of the
    gradient, not the gradient.
    COUNT_SKIPS: a skipped step adds one to ``nonfinite_skips`` (program 0).
    STEP_ON_DEVICE (capturable steps): step_size, denom_eps, decay and stamp are the
    addresses of 0-d tensors holding them (``_launch.DeviceScalars``).
    Program order: a program reads and writes only its own blocks' elements, codes
    and absmaxes; the flag it reads was written by an earlier launch; only program 0
    touches the skips.
    GROUPED: every member has the sizes and strides given; each has its own flag and skips.
    """
    out_ptr = _member(out_ptr, table_ptr, 0, INT8_TABLE_COLUMNS, GROUPED)
    grad_ptr = _member(grad_ptr, table_ptr, 1, INT8_TABLE_COLUMNS, GROUPED)
    exp_avg_codes_ptr = _member(exp_avg_codes_ptr, table_ptr, 2, INT8_TABLE_COLUMNS, GROUPED)
    exp_avg_absmax_ptr = _member(exp_avg_absmax_ptr, table_ptr, 3, INT8_TABLE_COLUMNS, GROUPED)
    exp_avg_sq_codes_ptr = _member(exp_avg_sq_codes_ptr, table_ptr, 4, INT8_TABLE_COLUMNS, GROUPED)
    exp_avg_sq_absmax_ptr = _member(exp_avg_sq_absmax_ptr, table_ptr, 5, INT8_TABLE_COLUMNS, GROUPED)
    flag_ptr = _member(flag_ptr, table_ptr, 6, INT8_TABLE_COLUMNS, GROUPED)
    skips_ptr = _member(skips_ptr, table_ptr, 7, INT8_TABLE_COLUMNS, GROUPED)
    if _skipped(flag_ptr, _scalar(stamp, STEP_ON_DEVICE)):
        _count_skip(skips_ptr, COUNT_SKIPS)
        return
    pid = tl.program_id(0).to(tl.int64)
    blocks = pid * BLOCKS_PER_PROG + tl.arange(0, BLOCKS_PER_PROG)
    offs = blocks[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
    valid = offs < numel
    block_valid = blocks * QBLOCK < numel
    # Contiguous tensors (the usual case) skip the integer division of the strided path.
    if OUT_FLAT:
        out_offs = offs
    else:
        out_offs = (offs // out_cols) * stride_out_row + (offs % out_cols) * stride_out_col
    if GRAD_FLAT:
        grad_offs = offs
    else:
        grad_offs = (offs // grad_cols) * stride_grad_row + (offs % grad_cols) * stride_grad_col

    grad = tl.load(grad_ptr + grad_offs, mask=valid, other=0.0).to(tl.float32)
    if NATURAL:
        offs_d = offs.to(tl.int32)
        offs_history = (offs_d // history_cols) * stride_history_r + (offs_d % history_cols) * stride_history_c
        grad = _natural_tile(grad, valid, offs_history, history_ptr, solution_ptr, slot_ptr, damping_ptr,
                             history_size, stride_history_slot, HISTORY_BF16)
    exp_avg_codes = tl.load(exp_avg_codes_ptr + offs, mask=valid, other=0)
    exp_avg_sq_codes = tl.load(exp_avg_sq_codes_ptr + offs, mask=valid, other=0)
    exp_avg_absmax = tl.load(exp_avg_absmax_ptr + blocks, mask=block_valid, other=0.0)
    exp_avg_sq_absmax = tl.load(exp_avg_sq_absmax_ptr + blocks, mask=block_valid, other=0.0)
    normalized, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax = _adam8bit_blocks(
        grad, valid,
        exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax,
        qmap_signed_ptr, qmap_unsigned_ptr, midpoints_signed_ptr, midpoints_unsigned_ptr,
        beta1, one_minus_beta1, beta2, one_minus_beta2, _scalar(denom_eps, STEP_ON_DEVICE),
    )
    step_size = _scalar(step_size, STEP_ON_DEVICE)
    if APPLY:
        param = tl.load(out_ptr + out_offs, mask=valid, other=0.0)
        # fp32 throughout, one rounding to the parameter's dtype at the store.
        new_param = (param.to(tl.float32) + step_size * normalized) * _scalar(decay, STEP_ON_DEVICE)
        tl.store(out_ptr + out_offs, round_to(new_param, param.dtype), mask=valid)
    else:
        tl.store(out_ptr + out_offs, round_to(step_size * normalized, out_ptr.dtype.element_ty), mask=valid)
    tl.store(exp_avg_codes_ptr + offs, exp_avg_codes.to(tl.uint8), mask=valid)
    tl.store(exp_avg_sq_codes_ptr + offs, exp_avg_sq_codes.to(tl.uint8), mask=valid)
    tl.store(exp_avg_absmax_ptr + blocks, exp_avg_absmax, mask=block_valid)
    tl.store(exp_avg_sq_absmax_ptr + blocks, exp_avg_sq_absmax, mask=block_valid)


# 4 quantization blocks (1024 elements) per program, 4 warps: 8 elements per thread.
BLOCKS_PER_PROG, NUM_WARPS = 4, 4
# Natural GaLore's ñ adds an fp64 sum per element, and a grouped launch its member's eight offsets: 2
# blocks (4 per thread), or ptxas spills (sm_90 gate: 16 bytes for a grouped fp16 step, Triton 3.8).
# Blocks are independent, so a program's block count does not change any result.
FEWER_BLOCKS_PER_PROG = 2


def adam8bit_scalars(*, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int) -> dict:
    """Host-side (float64) scalars shared by the 8-bit kernels, as the reference rounds them."""
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    correction1 = 1.0 - beta1**step
    correction2 = math.sqrt(1.0 - beta2**step)
    return dict(
        beta1=beta1, one_minus_beta1=1.0 - beta1, beta2=beta2, one_minus_beta2=1.0 - beta2,
        step_size=-lr * correction2 / correction1, denom_eps=correction2 * eps,
        decay=1.0 - lr * weight_decay if weight_decay > 0 else 1.0,
    )


def device_step_scalars(scalars: dict, device_scalars: DeviceScalars, step_size=None) -> dict:
    """``adam8bit_scalars``' dict with its per-step entries replaced by the device tensors (capturable steps);
    ``step_size``: that of a launch that does not apply the plain step (GaLore's α, or 1)."""
    return dict(scalars, step_size=device_scalars.step_size if step_size is None else step_size,
                denom_eps=device_scalars.denom_eps, decay=device_scalars.decay)


def qmaps(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(signed map, unsigned map, signed midpoints, unsigned midpoints)`` on ``device`` (cached)."""
    return (
        dynamic_map(True, device), dynamic_map(False, device),
        dynamic_map_midpoints(True, device), dynamic_map_midpoints(False, device),
    )


def check_quantized_state(quantized, numel: int) -> None:
    """Checks ``(exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax)`` for ``numel`` values."""
    num_blocks = -(-numel // BLOCK_SIZE)
    for name, codes in (("exp_avg_codes", quantized[0]), ("exp_avg_sq_codes", quantized[2])):
        check_dtype(name, codes, (torch.uint8,))
        check_contiguous(name, codes)
        if codes.numel() != numel:
            raise ValueError(f"{name} must have {numel} elements, got {codes.numel()}")
    for name, absmax in (("exp_avg_absmax", quantized[1]), ("exp_avg_sq_absmax", quantized[3])):
        check_dtype(name, absmax, (torch.float32,))
        check_contiguous(name, absmax)
        check_shape(name, absmax, (num_blocks,))


def launch_adamw8bit(out, out_layout, grad, grad_layout, quantized, flag, *, apply: bool, scalars: dict,
                     natural: NaturalOperands | None = None, stamp: int = 1,
                     nonfinite_skips: torch.Tensor | None = None, table: torch.Tensor | None = None) -> None:
    """Launch ``_adamw8bit_kernel`` over ``out.numel()`` values; the layouts are ``_launch.as_2d``'s.

    ``nonfinite_skips``: counted in the kernel when the flag holds ``stamp``; None counts nothing.
    ``table``: a grouped launch (``grouped_steps.py``), an int64 (members, 8) device tensor of every
    member's eight pointers as element offsets from the tensors given here, the first member's.
    A tensor ``stamp`` (capturable steps) comes with 0-d tensors for ``scalars``' step_size,
    denom_eps and decay, read on the device (``_launch.DeviceScalars``).
    """
    numel = out.numel()
    if numel == 0:
        return
    blocks_per_prog = BLOCKS_PER_PROG if natural is None and table is None else FEWER_BLOCKS_PER_PROG
    grid = (cdiv(cdiv(numel, BLOCK_SIZE), blocks_per_prog), 1 if table is None else table.shape[0])
    _adamw8bit_kernel[grid](
        out, grad, *quantized, *qmaps(out.device), flag, flag if nonfinite_skips is None else nonfinite_skips,
        numel, out_layout[1], grad_layout[1],
        out_layout[2], out_layout[3], grad_layout[2], grad_layout[3],
        **scalars, stamp=stamp,
        APPLY=apply, COUNT_SKIPS=nonfinite_skips is not None, QBLOCK=BLOCK_SIZE, BLOCKS_PER_PROG=blocks_per_prog,
        OUT_FLAT=out.is_contiguous(), GRAD_FLAT=grad.is_contiguous(), STEP_ON_DEVICE=torch.is_tensor(stamp),
        num_warps=NUM_WARPS, table_ptr=table, GROUPED=table is not None,
        **natural_kernel_args(natural, grad, flat=True),
    )


@on_param_device
def adamw8bit_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg_codes: torch.Tensor,
    exp_avg_absmax: torch.Tensor,
    exp_avg_sq_codes: torch.Tensor,
    exp_avg_sq_absmax: torch.Tensor,
    nonfinite_skips: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    flag: torch.Tensor | None = None,
    stamp: int = 1,
    device_scalars: DeviceScalars | None = None,
) -> None:
    """In-place 8-bit blockwise AdamW step of one parameter (``reference.adamw8bit_step``).

    param: any shape, fp32/bf16/fp16, any strides that merge into a 2-D view.
    grad: same shape, any strides. exp_avg_codes, exp_avg_sq_codes: contiguous
    uint8 with ``param.numel()`` elements. exp_avg_absmax, exp_avg_sq_absmax:
    contiguous fp32 ``(ceil(numel / 256),)``. nonfinite_skips: 0-d integer tensor.
    flag, stamp: the persistent non-finite flag and this step's stamp (``galore_adamw_step``).
    device_scalars: capturable steps, as ``galore_adamw_step``'s.
    """
    check_device(
        param, grad=grad, exp_avg_codes=exp_avg_codes, exp_avg_absmax=exp_avg_absmax,
        exp_avg_sq_codes=exp_avg_sq_codes, exp_avg_sq_absmax=exp_avg_sq_absmax, nonfinite_skips=nonfinite_skips,
    )
    check_dtype("param", param, PARAM_DTYPES)
    check_dtype("grad", grad, PARAM_DTYPES)
    check_shape("grad", grad, tuple(param.shape))
    quantized = (exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax)
    check_quantized_state(quantized, param.numel())
    check_skips(nonfinite_skips)
    flag = checked_flag(param, flag, stamp)
    param_layout, grad_layout = as_2d(param), as_2d(grad)
    if param_layout is None:
        raise ValueError("param must be contiguous or have strides that merge into a 2-D view")
    if grad_layout is None:
        # A layout no autograd produces; a copy keeps the kernel to two strided dims.
        grad = grad.contiguous()
        grad_layout = as_2d(grad)
    scalars = adam8bit_scalars(lr=lr if device_scalars is None else 0.0, beta1=beta1, beta2=beta2, eps=eps,
                               weight_decay=weight_decay, step=step)
    if device_scalars is not None:
        scalars, stamp = device_step_scalars(scalars, device_scalars), device_scalars.stamp

    stamp_nonfinite(grad, flag, stamp)
    launch_adamw8bit(param, param_layout, grad, grad_layout, quantized, flag, apply=True, scalars=scalars,
                     stamp=stamp, nonfinite_skips=nonfinite_skips)
