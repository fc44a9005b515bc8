"""The roofline of this device, measured, and the FLOP/byte model of an optimizer step.

Measured at the start of a run, on the device the run uses:

* peak matmul rate: the best, over a few square sizes, of the median rate of
  ``torch.mm`` (bf16 on GPU, where tensor cores set the peak; fp32 on CPU);
* copy bandwidth: the median rate of ``dst.copy_(src)`` on a large tensor,
  counting the bytes read plus the bytes written.

The floor of a step is ``max(FLOPs / peak_flops, bytes / copy_bandwidth)``: no
implementation can beat the slower of doing its matmuls at peak rate and
moving its unavoidable bytes at copy speed. ``floor / measured time`` is the
fraction of the roofline a step reaches.

The FLOP and byte model of a step is ``COST_MODEL`` below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import device_name, median_seconds

COST_MODEL = """\
Model of one steady-state GaLore step (no projector refresh) of an (m, n)
weight W at rank r. galore-torch's `std` rule projects the larger dimension
away, so the low-rank gradient has `max(m, n)·r` elements and the projector
`min(m, n)·r`:

* FLOPs: projection `2·m·n·r` + back-projection `2·m·n·r`. Adam's elementwise
  work on the low-rank state is left out (it is O(max(m, n)·r), memory-bound).
* bytes: read G + read W + write W (each `m·n` times the parameter's element
  size), the low-rank moments each read and written (fp32: 8 bytes/elem per
  moment; 8-bit: 2 bytes/elem of codes per moment plus its fp32 absmax, one per
  256-value block, read and written), and one read of the projector
  (`min(m, n)·r` elements in the parameter's dtype, fp32 for fp32 parameters,
  as both ours and galore-torch keep it). The low-rank gradient and update are
  assumed to stay on chip: they are intermediates a fused step never writes.

A full-rank AdamW step has no matmul (FLOPs 0 in this model) and moves
G + 2·W + both moments (read and written) over all `m·n` elements.
"""

QUANT_BLOCK = 256  # bitsandbytes' blockwise 8-bit block: one fp32 absmax per 256 values


@dataclass(frozen=True)
class Roofline:
    device: str
    peak_flops: float  # FLOP/s of the best measured GEMM
    matmul_dtype: str
    matmul_size: int  # the square size that reached peak_flops
    copy_bandwidth: float  # bytes/s, read + written
    copy_bytes: int  # size of the copied tensor

    def floor_seconds(self, flops: float, nbytes: float) -> float:
        return max(flops / self.peak_flops, nbytes / self.copy_bandwidth)


@dataclass(frozen=True)
class StepCost:
    flops: float
    bytes: float


def _moment_bytes(numel: int, moment_bytes: float) -> float:
    """Bytes of both Adam moments of ``numel`` values, each read and written once."""
    if moment_bytes == 1:  # 8-bit codes, plus one fp32 absmax per block
        per_moment = numel + 4 * math.ceil(numel / QUANT_BLOCK)
    else:
        per_moment = numel * moment_bytes
    return 2 * 2 * per_moment


def galore_step_cost(m: int, n: int, rank: int, *, param_bytes: int, moment_bytes: float, proj_bytes: int = 4) -> StepCost:
    """FLOPs and bytes of one steady-state GaLore step of an (m, n) weight (see the module docstring).

    ``param_bytes`` is the element size of W and G; ``moment_bytes`` that of the
    low-rank moments (1 for 8-bit codes, 4 for fp32, 2 for bf16 moments);
    ``proj_bytes`` that of the projector.
    """
    rank = min(rank, m, n)
    low_rank = max(m, n) * rank
    flops = 2 * m * n * rank + 2 * m * n * rank
    nbytes = 3 * m * n * param_bytes + _moment_bytes(low_rank, moment_bytes) + min(m, n) * rank * proj_bytes
    return StepCost(flops=float(flops), bytes=float(nbytes))


def adamw_step_cost(m: int, n: int, *, param_bytes: int, moment_bytes: float) -> StepCost:
    """FLOPs (0: no matmul) and bytes of one full-rank AdamW step of an (m, n) weight."""
    return StepCost(flops=0.0, bytes=float(3 * m * n * param_bytes + _moment_bytes(m * n, moment_bytes)))


def _matmul_rate(size: int, dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    seconds = median_seconds(lambda: torch.mm(a, b, out=out), device, warmup=2, repeats=repeats)
    return 2 * size**3 / seconds


def _copy_bandwidth(nbytes: int, device: torch.device, repeats: int) -> float:
    src = torch.ones(nbytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, warmup=2, repeats=repeats)
    return 2 * src.nbytes / seconds


def measure(device: torch.device, *, quick: bool = False) -> Roofline:
    """Peak matmul rate and copy bandwidth of ``device`` (seconds on CPU, less on GPU)."""
    if device.type == "cuda":
        dtype, sizes, copy_bytes, repeats = torch.bfloat16, (4096, 8192, 16384), 1 << 30, 10
    else:
        dtype, sizes, copy_bytes, repeats = torch.float32, (512, 1024, 2048), 1 << 28, 5
    if quick:
        sizes, copy_bytes, repeats = sizes[:1], 1 << 24, 3
    rates = {size: _matmul_rate(size, dtype, device, repeats) for size in sizes}
    best = max(rates, key=rates.get)
    bandwidth = _copy_bandwidth(copy_bytes, device, repeats)
    return Roofline(
        device=device_name(device),
        peak_flops=rates[best],
        matmul_dtype=str(dtype).removeprefix("torch."),
        matmul_size=best,
        copy_bandwidth=bandwidth,
        copy_bytes=copy_bytes,
    )


def format_table(roofline: Roofline) -> str:
    return "\n".join(
        [
            "| quantity | value | how |",
            "|---|---|---|",
            f"| peak matmul rate | {roofline.peak_flops / 1e12:.3f} TFLOP/s | best of square {roofline.matmul_dtype} GEMMs, "
            f"median of repeats (best at {roofline.matmul_size}³) |",
            f"| copy bandwidth | {roofline.copy_bandwidth / 1e9:.1f} GB/s | `copy_` of {roofline.copy_bytes >> 20} MiB, "
            "bytes read + written, median of repeats |",
            f"| ridge point | {roofline.peak_flops / roofline.copy_bandwidth:.1f} FLOP/byte | peak rate / bandwidth |",
        ]
    )
