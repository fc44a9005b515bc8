"""Blockwise 8-bit quantization of optimizer moments, with bitsandbytes' semantics.

Pure tensor functions, shared by the reference path and the Triton launchers:

* ``create_dynamic_map(signed)`` is bitsandbytes' ``create_dynamic_map`` (7 exponent
  bits, 8 bits total). The signed map covers [-0.99297, 1] with a single zero at
  code 127; the unsigned map covers [0, 1].
* ``quantize_blockwise`` / ``dequantize_blockwise`` work on flat blocks of
  ``BLOCK_SIZE = 256`` values with one fp32 absmax per block, rounding each
  normalized value to the nearest code (ties go to the lower code).

The low-rank moments of a GaLore parameter are stored direction-major, so that each
quantization block holds one singular direction's values; see ``lowrank_layout``.
"""

from __future__ import annotations

import functools

import torch

BLOCK_SIZE = 256
"""Values per quantization block (bitsandbytes >= 0.44)."""

MIN_8BIT_SIZE = 4096
"""States with fewer elements stay fp32, as bitsandbytes' ``min_8bit_size``."""


def create_dynamic_map(signed: bool = True) -> torch.Tensor:
    """bitsandbytes' ``create_dynamic_map`` (7 exponent bits, 8 bits): sorted fp32, 256 values.

    Each decade 10^-6 .. 10^0 gets linearly spaced fractions, twice as many per
    decade as the one below it; the unsigned map spends the sign bit on fractions.
    """
    exponent_bits, non_sign_bits = 7, 7
    data: list[float] = []
    for i in range(exponent_bits):
        fraction_items = 2 ** (i + non_sign_bits - exponent_bits + (0 if signed else 1)) + 1
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        decade = 10 ** (-(exponent_bits - 1) + i)
        data += (decade * means).tolist()
        if signed:
            data += (-decade * means).tolist()
    data += [0.0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def dynamic_map(signed: bool, device: torch.device) -> torch.Tensor:
    """The cached 256-entry map on ``device``: the signed one for exp_avg, unsigned for exp_avg_sq."""
    return create_dynamic_map(signed).to(device)


@functools.lru_cache(maxsize=None)
def dynamic_map_midpoints(signed: bool, device: torch.device) -> torch.Tensor:
    """The 255 decision boundaries between neighbouring codes of ``dynamic_map``.

    Rounding to the nearest code is a search among these: the code of ``x`` is
    the number of midpoints strictly below ``x``, so an exact tie rounds down.
    """
    qmap = create_dynamic_map(signed)
    return ((qmap[:-1] + qmap[1:]) / 2).to(device)


def quantize_blockwise(values: torch.Tensor, *, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a flat fp32 tensor in blocks of 256 consecutive values.

    Returns ``(codes uint8 like values, absmax fp32 of ceil(numel/256))``. The
    absmax is that of the values given, i.e. of the *updated* moment: bitsandbytes
    computes it after the Adam update so that the new state is never clipped.
    With ``signed`` the state1 sign fix is applied: a value whose nearest code has
    the wrong sign (only code 127, the single zero, can) moves one code towards
    its own sign, so that a small negative momentum never dequantizes as +0.
    """
    flat = values.reshape(-1)
    numel = flat.numel()
    num_blocks = -(-numel // BLOCK_SIZE)
    padded = torch.zeros(num_blocks * BLOCK_SIZE, dtype=torch.float32, device=flat.device)
    padded[:numel] = flat
    blocks = padded.view(num_blocks, BLOCK_SIZE)
    absmax = blocks.abs().amax(dim=1)
    # Multiply by the reciprocal, as the CUDA kernel does; an all-zero block
    # normalizes to zero instead of 0/0.
    inv_absmax = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    normalized = (blocks * inv_absmax[:, None]).reshape(-1)[:numel]
    codes = torch.bucketize(normalized, dynamic_map_midpoints(signed, flat.device), right=False)
    if signed:
        qmap = dynamic_map(True, flat.device)
        wrong_sign = torch.signbit(qmap[codes]) != torch.signbit(normalized)
        codes = torch.where(wrong_sign, codes + torch.where(normalized > 0, 1, -1), codes)
    return codes.to(torch.uint8).view(values.shape), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, *, signed: bool) -> torch.Tensor:
    """Inverse of ``quantize_blockwise``: fp32 values shaped like ``codes``."""
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8, got {codes.dtype}")
    num_blocks = -(-codes.numel() // BLOCK_SIZE)
    if absmax.numel() != num_blocks:
        raise ValueError(f"absmax must hold {num_blocks} values (one per {BLOCK_SIZE} codes of {codes.numel()}), "
                         f"got {absmax.numel()}")
    flat = codes.reshape(-1).long()
    qmap = dynamic_map(signed, codes.device)
    block = torch.arange(flat.numel(), device=codes.device) // BLOCK_SIZE
    return (qmap[flat] * absmax[block]).view(codes.shape)


def lowrank_layout(low_rank_shape: tuple[int, int], side: str) -> tuple[int, int]:
    """Shape ``(directions, length)`` of D, the matrix the 8-bit low-rank moments are stored as.

    D is direction-major: one row per singular direction of the projector, so that a
    256-value quantization block holds values of one direction, whose magnitudes are
    alike. Its absmax is then not set by a stronger direction, which would round the
    weak directions' second moments to zero and turn their steps into m/eps.
    ``D = R`` (r×n) for ``left`` and ``full`` (r1×r2: rows follow the left directions),
    ``D = Rᵀ`` (r×m) for ``right``. The blocks are runs of 256 consecutive values of D
    flattened row-major, with no padding: codes ``(directions, length)`` uint8 and
    ``ceil(directions·length/256)`` fp32 absmaxes. For ``left`` and ``full`` this is
    exactly galore-torch's row-major R. A block spans two neighbouring directions only
    where ``length`` is not a multiple of 256 (never at LLaMA's 4096, 11008, 14336...).
    """
    if side == "right":
        return low_rank_shape[1], low_rank_shape[0]
    return tuple(low_rank_shape)


def to_lowrank_layout(low_rank: torch.Tensor, side: str) -> torch.Tensor:
    """R (fp32) -> D of ``lowrank_layout``, contiguous."""
    return (low_rank.t() if side == "right" else low_rank).contiguous()


def from_lowrank_layout(layout: torch.Tensor, low_rank_shape: tuple[int, int], side: str) -> torch.Tensor:
    """D -> R, undoing ``to_lowrank_layout`` (a view)."""
    low_rank = layout.t() if side == "right" else layout
    if tuple(low_rank.shape) != tuple(low_rank_shape):
        raise ValueError(f"a layout of shape {tuple(layout.shape)} does not hold a {side} low-rank {tuple(low_rank_shape)}")
    return low_rank
