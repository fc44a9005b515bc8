"""Interpreter-only versions of ``_launch.round_to`` and ``_launch.dot``.

Triton's CPU interpreter (``TRITON_INTERPRET=1``, Triton 3.8) mishandles bf16: it
truncates fp32 to bf16 instead of rounding to nearest-even, and ``tl.dot`` multiplies
bf16 tiles as their raw uint16 bits. ``_launch`` selects these helpers when the
interpreter runs, and the GPU kernels never see them.

They compute what the native bf16 cast and dot compute (the rounding is done on the
bits; bf16 operands are rounded, then multiplied in fp32, where the product of two
bf16 values is exact). So CI checks the kernels' arithmetic, but it cannot check
the native bf16 rounding and the native bf16 ``tl.dot`` themselves: those are for
the GPU check (``make gpu-check``) to cover.
"""

import triton
import triton.language as tl


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """``x`` rounded to nearest-even in ``DTYPE`` (bf16 on the bits; NaN payloads aside)."""
    rounded = x.to(DTYPE)
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return rounded


@triton.jit
def dot(x, y, acc, OPERAND_DTYPE: tl.constexpr, FP32_PRECISION: tl.constexpr):
    """``acc + x @ y`` with both tiles rounded to OPERAND_DTYPE; bf16 products taken in fp32.

    FP32_PRECISION is accepted and unused: the interpreter's fp32 dot is numpy's, IEEE.
    """
    x = round_to(x, OPERAND_DTYPE)
    y = round_to(y, OPERAND_DTYPE)
    if OPERAND_DTYPE == tl.float32 or OPERAND_DTYPE == tl.bfloat16:
        return tl.dot(x.to(tl.float32), y.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(x, y, acc)
