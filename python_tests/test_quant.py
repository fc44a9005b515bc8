"""galore_kernels.quant: the dynamic maps, blockwise 8-bit quantization and the low-rank state layout.

Oracles: bitsandbytes' ``create_dynamic_map`` (exact), a brute-force nearest-code search
(exact up to ties), and bitsandbytes' CPU ``quantize_blockwise``, which is only
approximately nearest (see ``test_quantize_vs_bitsandbytes_cpu``).
"""

import math

import pytest
import torch

from galore_kernels import quant

bnb_functional = pytest.importorskip("bitsandbytes.functional")

# bitsandbytes' CPU quantizer searches the map with BinSearch's ``Direct2`` on a uniform
# grid; measured over 4 seeds × 100k heavy-tailed values, the code it picks is never
# nearer to the value than the nearest code and at most 3.03e-5 (normalized units)
# farther, i.e. its grid resolution is 2^-15. Anything beyond that is our error.
BNB_CPU_SEARCH_RESOLUTION = 2.0**-15 + 1e-7


def _normalized(values: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """values / their block absmax, computed as quantize_blockwise does (times the reciprocal)."""
    flat = values.reshape(-1)
    block = torch.arange(flat.numel()) // quant.BLOCK_SIZE
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    return flat * inv[block]


def _brute_force_codes(normalized: torch.Tensor, signed: bool) -> torch.Tensor:
    """Nearest code by exhaustive search (argmin: ties go to the lower code), plus the state1 sign fix."""
    qmap = quant.create_dynamic_map(signed)
    codes = (normalized.unsqueeze(-1) - qmap).abs().argmin(-1)
    if signed:
        # Only the single zero (code 127) can have the wrong sign; a negative value moves down one code.
        codes = torch.where((codes == 127) & (normalized < 0), codes - 1, codes)
    return codes


def _moment_like(numel: int, signed: bool, seed: int) -> torch.Tensor:
    """Heavy-tailed values spanning many decades, like Adam moments (squared for the unsigned map)."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(numel, generator=gen) * torch.rand(numel, generator=gen).pow(4)
    return values if signed else values * values


@pytest.mark.parametrize("signed", [True, False])
def test_create_dynamic_map_equals_bitsandbytes(signed):
    ours = quant.create_dynamic_map(signed)
    theirs = bnb_functional.create_dynamic_map(signed=signed)
    assert ours.dtype == torch.float32 and ours.shape == (256,)
    assert torch.equal(ours, theirs.float())
    assert bool((ours[1:] > ours[:-1]).all()), "the map must be strictly increasing for the midpoint search"


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("numel", [256 * 9, 1000, 67 * 71, 5])
def test_quantize_matches_brute_force(signed, numel):
    values = _moment_like(numel, signed, seed=numel)
    codes, absmax = quant.quantize_blockwise(values, signed=signed)
    num_blocks = math.ceil(numel / quant.BLOCK_SIZE)
    assert codes.dtype == torch.uint8 and codes.shape == values.shape
    assert absmax.dtype == torch.float32 and absmax.shape == (num_blocks,)
    padded = torch.nn.functional.pad(values, (0, num_blocks * quant.BLOCK_SIZE - numel))
    assert torch.equal(absmax, padded.view(num_blocks, -1).abs().amax(1)), "absmax is of the values given"
    expected = _brute_force_codes(_normalized(values, absmax), signed)
    # Exact ties are measure-zero for random fp32 values: all codes must agree.
    assert torch.equal(codes.long(), expected)


def test_sign_fix_moves_small_negative_momentum_off_zero():
    qmap = quant.create_dynamic_map(True)
    tiny = qmap[128].item() / 4  # rounds to the zero code 127 before the sign fix
    values = torch.tensor([1.0, -tiny, tiny, 0.0, -0.0])
    codes, _ = quant.quantize_blockwise(values, signed=True)
    # -0.0 moves too: bitsandbytes' CUDA kernel compares signbit(), and signbit(-0.0) is set.
    assert codes.tolist() == [255, 126, 127, 127, 126]
    assert qmap[126] < 0, "a negative momentum must never dequantize as +0"
    unsigned_codes, _ = quant.quantize_blockwise(values.abs(), signed=False)
    assert unsigned_codes[1].item() == unsigned_codes[2].item(), "no sign fix for the unsigned map"


@pytest.mark.parametrize("signed", [True, False])
def test_exact_ties_round_to_lower_code(signed):
    qmap = quant.create_dynamic_map(signed)
    midpoints = (qmap[:-1] + qmap[1:]) / 2
    # absmax is 1 (the first value), so the normalized values are the midpoints themselves.
    values = torch.cat([torch.ones(1), midpoints])
    codes, absmax = quant.quantize_blockwise(values, signed=signed)
    assert absmax.tolist() == [1.0]
    lower = torch.arange(255)
    if signed:
        lower = torch.where((lower == 127) & (midpoints < 0), lower - 1, lower)
    assert torch.equal(codes[1:].long(), lower)


@pytest.mark.parametrize("signed", [True, False])
def test_dequantize_error_is_half_a_code_gap(signed):
    values = _moment_like(67 * 71, signed, seed=3)
    codes, absmax = quant.quantize_blockwise(values, signed=signed)
    restored = quant.dequantize_blockwise(codes, absmax, signed=signed)
    assert restored.shape == values.shape and restored.dtype == torch.float32
    qmap = quant.create_dynamic_map(signed)
    # Per element: at most half the gap of the interval holding it. Two exceptions in the
    # signed map: [-1, -0.99297) below the lowest code (bounded by 1 + qmap[0]), and the
    # sign-fixed values in (qmap[126], 0), which go to code 126 (bounded by the whole gap).
    normalized = _normalized(values, absmax)
    interval = torch.bucketize(normalized, qmap).clamp(1, 255)
    half_gap = (qmap[interval] - qmap[interval - 1]) / 2
    if signed:
        half_gap = torch.where(normalized < qmap[0], 1 + qmap[0], half_gap)
        half_gap = torch.where((interval == 127) & (normalized < 0), -qmap[126], half_gap)
    block_absmax = absmax[torch.arange(values.numel()) // quant.BLOCK_SIZE]
    # Slack of two fp32 ulps of the absmax: the rounding of qmap[code] * absmax.
    bound = half_gap * block_absmax + 2 * torch.finfo(torch.float32).eps * block_absmax
    assert bool(((restored - values).abs() <= bound).all())
    # The block maximum itself is stored exactly when positive (code 255 is 1.0).
    assert restored.abs().reshape(-1)[values.abs().argmax()] == values.abs().max()


@pytest.mark.parametrize("signed", [True, False])
def test_all_zero_block(signed):
    values = _moment_like(3 * quant.BLOCK_SIZE + 17, signed, seed=5)
    values[quant.BLOCK_SIZE : 2 * quant.BLOCK_SIZE] = 0.0
    values[3 * quant.BLOCK_SIZE :] = 0.0  # the partial last block too
    codes, absmax = quant.quantize_blockwise(values, signed=signed)
    zero_code = 127 if signed else 0
    assert absmax[1] == 0 and absmax[3] == 0
    assert bool((codes[quant.BLOCK_SIZE : 2 * quant.BLOCK_SIZE] == zero_code).all())
    assert bool((codes[3 * quant.BLOCK_SIZE :] == zero_code).all())
    restored = quant.dequantize_blockwise(codes, absmax, signed=signed)
    assert bool(torch.isfinite(restored).all())
    assert bool((restored[quant.BLOCK_SIZE : 2 * quant.BLOCK_SIZE] == 0).all())


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("numel", [256 * 40, 67 * 71])
def test_quantize_vs_bitsandbytes_cpu(signed, numel):
    """Codes from ``torch.ops.bitsandbytes.quantize_blockwise`` and ``F.quantize_blockwise`` on CPU.

    bitsandbytes' CPU search is approximate (resolution 2^-15 in normalized units; no
    state1 sign fix), so codes are not compared for equality. Instead: the absmax is
    identical, the two entry points agree with each other, ours is never farther from the
    value than theirs, theirs is at most the search resolution farther, and where the
    resolution is irrelevant (|normalized| >= 1e-2) codes differ in < 0.5% of elements
    (measured 0.10-0.39%) and then by exactly one code.
    """
    values = _moment_like(numel, signed, seed=7)
    qmap = quant.create_dynamic_map(signed)
    ours, absmax = quant.quantize_blockwise(values, signed=signed)
    # Fresh map copies: bitsandbytes' C code is handed a raw pointer to the map.
    theirs, their_absmax = torch.ops.bitsandbytes.quantize_blockwise(values, qmap.clone(), quant.BLOCK_SIZE)
    theirs_functional, state = bnb_functional.quantize_blockwise(values, code=qmap.clone(), blocksize=quant.BLOCK_SIZE)
    assert torch.equal(theirs, theirs_functional)
    assert torch.equal(absmax, their_absmax) and torch.equal(absmax, state.absmax)

    normalized = _normalized(values, absmax)
    our_error = (qmap[ours.long()] - normalized).abs()
    their_error = (qmap[theirs.long()] - normalized).abs()
    sign_fixed = signed and (ours.long() == 126) & (theirs.long() == 127) & (normalized < 0)
    if signed:
        # Our sign fix trades a nearer +0 for the nearest negative code: exempt, checked above.
        their_error = torch.where(sign_fixed, our_error, their_error)
    assert bool((our_error <= their_error).all()), "ours must always be the nearest code"
    assert float((their_error - our_error).max()) <= BNB_CPU_SEARCH_RESOLUTION

    resolved = normalized.abs() >= 1e-2
    differ = (ours != theirs) & resolved
    assert float(differ.sum()) <= 0.005 * float(resolved.sum())
    assert bool(((ours.long() - theirs.long()).abs()[differ] == 1).all())


@pytest.mark.parametrize("side", ["left", "right", "full"])
@pytest.mark.parametrize("rank", [1, 3, 100, 300])
def test_lowrank_layout_is_direction_major(side, rank):
    """D has one row per direction of the projector: R for left and full, Rᵀ for right; no padding."""
    gen = torch.Generator().manual_seed(rank)
    other = 37
    low_rank_shape = {"left": (rank, other), "right": (other, rank), "full": (rank, rank + 2)}[side]
    low_rank = torch.randn(low_rank_shape, generator=gen)
    layout_shape = quant.lowrank_layout(low_rank_shape, side)
    layout = quant.to_lowrank_layout(low_rank, side)
    assert tuple(layout.shape) == tuple(layout_shape) and layout.is_contiguous() and layout.numel() == low_rank.numel()
    assert layout_shape[0] == (rank if side != "full" else low_rank_shape[0]), "one row per direction"
    # Row i of D is direction i: the i-th row of R (left, full) or its i-th column (right).
    direction = low_rank[1 % rank] if side != "right" else low_rank[:, 1 % rank]
    assert torch.equal(layout[1 % rank], direction)
    assert torch.equal(quant.from_lowrank_layout(layout, low_rank_shape, side), low_rank)
    with pytest.raises(ValueError, match="does not hold"):
        quant.from_lowrank_layout(layout, low_rank_shape[::-1] if side != "full" else (rank + 2, rank), side)


@pytest.mark.parametrize("codes, absmax, message", [
    # One absmax too few indexed past the end; int64 codes past 255 did too.
    (torch.zeros(600, dtype=torch.uint8), torch.ones(2), "absmax must hold 3"),
    (torch.full((3,), 300), torch.ones(1), "codes must be uint8"),
])
def test_dequantize_refuses_mismatched_inputs(codes, absmax, message):
    with pytest.raises(ValueError, match=message):
        quant.dequantize_blockwise(codes, absmax, signed=True)
