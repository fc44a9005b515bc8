"""Steady-state optimizer step throughput: ours vs galore-torch vs full-rank AdamW baselines.

For every (shape, param dtype, rank) one weight is built, an optimizer made
for it, and its ``step()`` timed. Only steps that do not refresh the projector
are timed: ``update_proj_gap`` is huge and the first step, the one refresh,
happens in the warm-up (the refresh is measured by ``bench_svd``). Before each
step ``p.grad`` is set to the next of a rotation of gradient tensors whose
total size is at least 3 and large enough (GPU: 4× the L2 cache) that the
gradient is never read from L2 twice in a row.

The full-rank baselines (bitsandbytes AdamW8bit, torch AdamW) do not depend on
the rank; they are timed once per (shape, dtype) and compared with each rank.
Speedups are ``time(galore-torch 8-bit) / time(impl)`` from the same run. All
implementations of one (shape, dtype) are timed round-robin (see ``describe``).
"""

from __future__ import annotations

import contextlib
import math
import sys
import traceback
from dataclasses import dataclass
from typing import Callable

import torch

from . import cuda_synchronize_disabled, interleaved_median_seconds, synchronize
from .roofline import Roofline, adamw_step_cost, galore_step_cost

GPU_SHAPES = ((2048, 2048), (2048, 5632), (4096, 4096), (4096, 11008), (11008, 4096))
GPU_RANKS = (128, 256, 512, 1024)
CPU_SHAPES = ((512, 1376), (1024, 1024), (1024, 2752))
CPU_RANKS = (64, 128)
QUICK_SHAPES = ((256, 384),)
QUICK_RANKS = (32,)
DTYPES = (torch.bfloat16, torch.float32)

BASELINE = "galore-torch 8-bit"
HYPER = dict(lr=1e-3, weight_decay=1e-2)


@dataclass(frozen=True)
class Impl:
    name: str
    galore: bool  # takes a rank; else a full-rank baseline
    moment_bytes: Callable[[torch.dtype], float]  # element size of its Adam moments, for the byte model
    proj_bytes: Callable[[torch.dtype], int]
    make: Callable[[list, torch.device], torch.optim.Optimizer]
    on_cpu: bool = True


def _galore_kernels(cls_name: str, **kwargs):
    def make(groups, device):
        import galore_kernels

        return getattr(galore_kernels, cls_name)(groups, **HYPER, **kwargs)

    return make


class GraphedSteps:
    """A weight's steady ``step()`` replayed from CUDA graphs: the kernels' device time without the host's.

    Timing only. One graph is captured per gradient of the rotation (``capture``, untimed),
    each after an eager warm-up step on a side stream as torch.cuda.graphs asks; ``step()``
    replays the graph of the tensor now in ``p.grad``. A replay repeats the kernels of one
    real steady step with the scalars of the step it was captured at (bias corrections,
    the non-finite stamp), which changes no launch's work. Any capture failure raises, so
    the row reports the error rather than an eager time.
    """

    def __init__(self, param: torch.nn.Parameter, optimizer: torch.optim.Optimizer):
        self.param, self.optimizer, self.graphs = param, optimizer, {}

    def capture(self, grads: list[torch.Tensor]) -> None:
        for grad in grads:
            self.param.grad = grad
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.optimizer.step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.optimizer.step()
            self.graphs[grad.data_ptr()] = graph

    def step(self) -> None:
        self.graphs[self.param.grad.data_ptr()].replay()


def _galore_kernels_graphed(cls_name: str):
    def make(groups, device):
        if device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        return GraphedSteps(groups[0]["params"][0], _galore_kernels(cls_name)(groups, device))

    return make


def _galore_torch(cls_name: str, **kwargs):
    def make(groups, device):
        import galore_torch

        return getattr(galore_torch, cls_name)(groups, **HYPER, **kwargs)

    return make


def _bnb_adamw8bit(groups, device):
    import bitsandbytes

    return bitsandbytes.optim.AdamW8bit(groups, **HYPER)


def _torch_adamw(groups, device):
    if device.type == "cuda":
        return torch.optim.AdamW(groups, **HYPER, fused=True)
    return torch.optim.AdamW(groups, **HYPER, foreach=True)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


IMPLS = (
    # backend="auto" is the Triton kernels for CUDA tensors and the PyTorch reference for CPU tensors.
    # Projectors are kept in the parameter's dtype (projector.projector_dtype), as galore-torch keeps them.
    Impl("ours 8-bit", True, lambda dt: 1, _itemsize, _galore_kernels("GaLoreAdamW8bit")),
    Impl("ours fp32", True, lambda dt: 4, _itemsize, _galore_kernels("GaLoreAdamW")),
    # On CPU "auto" already is the torch backend, so this row would repeat "ours 8-bit".
    Impl("ours 8-bit torch", True, lambda dt: 1, _itemsize, _galore_kernels("GaLoreAdamW8bit", backend="torch"), on_cpu=False),
    # galore-torch casts the projector to the gradient's dtype; its fp32 class keeps moments in it too.
    Impl(BASELINE, True, lambda dt: 1, _itemsize, _galore_torch("GaLoreAdamW8bit")),
    Impl("galore-torch fp32", True, _itemsize, _itemsize, _galore_torch("GaLoreAdamW", no_deprecation_warning=True)),
    Impl("bnb AdamW8bit", False, lambda dt: 1, lambda dt: 0, _bnb_adamw8bit),
    Impl("torch AdamW", False, _itemsize, lambda dt: 0, _torch_adamw),
    # The same steps as "ours 8-bit", replayed from CUDA graphs: the kernels' time with no host time
    # between launches. Last, so its captures come after every other row's warm-up.
    Impl("ours 8-bit graph", True, lambda dt: 1, _itemsize, _galore_kernels_graphed("GaLoreAdamW8bit"), on_cpu=False),
)


@dataclass(frozen=True)
class Config:
    shapes: tuple
    ranks: tuple
    dtypes: tuple
    warmup: int  # untimed steps, the first of which refreshes the projector
    repeats: int


def default_config(device: torch.device, quick: bool = False) -> Config:
    if quick:
        return Config(QUICK_SHAPES, QUICK_RANKS, (torch.float32,), warmup=2, repeats=2)
    if device.type == "cuda":
        return Config(GPU_SHAPES, GPU_RANKS, DTYPES, warmup=10, repeats=50)
    return Config(CPU_SHAPES, CPU_RANKS, DTYPES, warmup=3, repeats=15)


def describe(device: torch.device, config: Config) -> str:
    """Methodology paragraph for the results file."""
    timer = "CUDA events around each step" if device.type == "cuda" else "time.perf_counter around each step"
    lines = [
        f"For each shape and dtype, every (implementation, rank) gets its own weight and optimizer and "
        f"{config.warmup} untimed warm-up steps (the first computes the projector; `update_proj_gap` = 10⁹ so no "
        f"timed step refreshes it); then all are timed round-robin, one `step()` each per round for "
        f"{config.repeats} rounds ({timer}), and the median per implementation is reported. Interleaving "
        "spreads any slow stretch of a shared machine over all implementations alike. "
        "`p.grad` is set (untimed) to the next of a rotation of ≥ 3 gradient tensors"
        + (", enough to cover 4× the L2 cache" if device.type == "cuda" else "")
        + ". lr 1e-3, weight decay 0.01, GaLore scale 0.25, `proj_type='std'`.",
        "Speedup = time(galore-torch 8-bit) / time(row), same run, same shape, dtype and rank. "
        "Full-rank baselines do not depend on the rank: they are timed once per shape and dtype. "
        "FLOP/s and bytes/s are the model's FLOPs and bytes (see Roofline) divided by the measured time; "
        "% floor = roofline floor / time.",
    ]
    if device.type == "cuda":
        lines.append("`ours 8-bit` and `ours fp32` use `backend=\"auto\"` (the Triton kernels); "
                     "`ours 8-bit torch` is `backend=\"torch\"`. torch AdamW is `fused=True`. "
                     "`ours 8-bit graph` replays `ours 8-bit`'s steady step from CUDA graphs captured after the "
                     "warm-up, one per gradient of the rotation (`GraphedSteps`): the kernels' device time with no "
                     "host time between launches.")
    else:
        lines.append(
            "CPU: `ours` rows use `backend=\"auto\"`, which on CPU tensors is the PyTorch (`torch`) backend; "
            "`backend=\"triton\"` is skipped because the Triton kernels only run under the interpreter on CPU, "
            "far too slowly to time. torch AdamW is `foreach=True` (fused is CUDA-only here). "
            "galore-torch's GaLoreAdamW8bit calls `torch.cuda.synchronize()` per parameter, which raises without "
            "CUDA: it runs with `torch.cuda.synchronize` patched to a no-op (restored afterwards)."
        )
    return " ".join(lines)


def _rotation_size(grad_bytes: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 3
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    return min(max(3, math.ceil(4 * l2 / grad_bytes)), 16)


def _make_entry(impl: Impl, m: int, n: int, rank: int | None, dtype, device):
    """(param, optimizer) for one weight; every implementation starts from the same weight."""
    generator = torch.Generator(device="cpu").manual_seed(m * 7919 + n)
    weight = (torch.randn(m, n, generator=generator) * 0.02).to(device=device, dtype=dtype)
    param = torch.nn.Parameter(weight)
    group = {"params": [param]}
    if rank is not None:
        group.update(rank=rank, update_proj_gap=10**9, scale=0.25, proj_type="std")
    return param, impl.make([group], device)


def _time_cell(cases, m: int, n: int, dtype, device, config: Config) -> list[tuple[float | None, str | None]]:
    """(median seconds or None, error or None) for each (impl, rank) of ``cases`` on an (m, n) weight.

    Each case is built and warmed up alone, then all are timed round-robin, one
    step each per round, so a slow stretch of a shared machine hits them alike.
    """
    count = _rotation_size(m * n * _itemsize(dtype), device)
    grads = [torch.randn(m, n, device=device, dtype=dtype) * 1e-2 for _ in range(count)]
    entries, results = {}, [(None, None)] * len(cases)
    for index, (impl, rank) in enumerate(cases):
        try:
            param, optimizer = _make_entry(impl, m, n, rank, dtype, device)
            graphed = isinstance(optimizer, GraphedSteps)
            for i in range(config.warmup):  # eager, also for the graphed row: the refresh and compilation
                param.grad = grads[i % count]
                (optimizer.optimizer if graphed else optimizer).step()
            if graphed:
                optimizer.capture(grads)
            synchronize(device)
            entries[index] = (param, optimizer)
        except Exception as error:  # reported in the table and on stderr, never dropped
            results[index] = (None, _report_error(impl, m, n, dtype, rank, error))
    if entries:
        order = list(entries)

        def next_grad(position, i):
            entries[order[position]][0].grad = grads[(config.warmup + i + position) % count]

        medians = interleaved_median_seconds([entries[index][1].step for index in order], device,
                                             repeats=config.repeats, before=next_grad)
        for index, seconds in zip(order, medians):
            results[index] = (seconds, None)
    entries.clear()  # the weights, states and gradients go before the cache is emptied
    grads.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


def _report_error(impl: Impl, m: int, n: int, dtype, rank, error: Exception) -> str:
    print(f"\n[bench step] {impl.name} {m}x{n} {dtype} rank={rank} failed:", file=sys.stderr)
    traceback.print_exception(error)
    return f"{type(error).__name__}: {error}"


def run(device: torch.device, *, roofline: Roofline, quick: bool = False, config: Config | None = None,
        progress: bool = True) -> list[dict]:
    """One row per (shape, dtype, impl, rank), rank None for the full-rank baselines."""
    from tqdm.auto import tqdm

    config = config or default_config(device, quick)
    impls = [impl for impl in IMPLS if device.type == "cuda" or impl.on_cpu]
    cells = [(m, n, dtype) for m, n in config.shapes for dtype in config.dtypes]
    rows = []
    # galore-torch 8-bit needs a working torch.cuda.synchronize; on CPU it becomes a no-op.
    no_sync = cuda_synchronize_disabled() if device.type != "cuda" else contextlib.nullcontext()
    with no_sync, tqdm(cells, desc="step", disable=not progress, file=sys.stderr) as bar:
        # Untimed first use of every implementation (lazy imports, kernel compilation, allocator growth)
        # on a small weight, so that the first measured cell is not charged for it.
        for dtype in config.dtypes:
            _time_cell([(impl, 16 if impl.galore else None) for impl in impls], 128, 256, dtype, device,
                       Config((), (), (), warmup=2, repeats=1))
        for m, n, dtype in bar:
            bar.set_postfix_str(f"{m}x{n} {str(dtype).removeprefix('torch.')}")
            cases = [(impl, rank) for impl in impls for rank in (config.ranks if impl.galore else (None,))]
            for (impl, rank), (seconds, error) in zip(cases, _time_cell(cases, m, n, dtype, device, config)):
                if impl.galore:
                    cost = galore_step_cost(m, n, rank, param_bytes=_itemsize(dtype),
                                            moment_bytes=impl.moment_bytes(dtype), proj_bytes=impl.proj_bytes(dtype))
                else:
                    cost = adamw_step_cost(m, n, param_bytes=_itemsize(dtype), moment_bytes=impl.moment_bytes(dtype))
                rows.append(dict(
                    shape=f"{m}x{n}", m=m, n=n, dtype=str(dtype).removeprefix("torch."), rank=rank, impl=impl.name,
                    flops=cost.flops, bytes=cost.bytes, floor_s=roofline.floor_seconds(cost.flops, cost.bytes),
                    seconds=seconds, error=error,
                ))
    _add_ratios(rows)
    return rows


def _add_ratios(rows: list[dict]) -> None:
    baseline = {(r["shape"], r["dtype"], r["rank"]): r["seconds"] for r in rows if r["impl"] == BASELINE}
    for row in rows:
        seconds = row["seconds"]
        row["frac_floor"] = row["floor_s"] / seconds if seconds else None
        row["bytes_per_s"] = row["bytes"] / seconds if seconds else None
        row["flops_per_s"] = row["flops"] / seconds if seconds and row["flops"] else None
        base = baseline.get((row["shape"], row["dtype"], row["rank"]))
        row["speedup"] = base / seconds if base and seconds and row["rank"] is not None else None


def _impl_order(rows):
    return list(dict.fromkeys(r["impl"] for r in rows))


def _cell_ms(row) -> str:
    return f"{row['seconds'] * 1e3:.3g}" if row and row["seconds"] else ("error" if row else "-")


def format_table(rows: list[dict]) -> str:
    """Wide summary: one line per (shape, dtype, rank); step ms and speedup vs galore-torch 8-bit per impl."""
    impls = _impl_order(rows)
    by_key = {(r["shape"], r["dtype"], r["rank"], r["impl"]): r for r in rows}
    keys = list(dict.fromkeys((r["shape"], r["dtype"], r["rank"]) for r in rows if r["rank"] is not None))
    header = "| shape | dtype | rank | " + " | ".join(f"{name} ms (×)" for name in impls) + " |"
    lines = [header, "|" + "---|" * (3 + len(impls))]
    for shape, dtype, rank in keys:
        base = by_key.get((shape, dtype, rank, BASELINE))
        cells = []
        for name in impls:
            row = by_key.get((shape, dtype, rank, name)) or by_key.get((shape, dtype, None, name))
            text = _cell_ms(row)
            if row and row["seconds"] and base and base["seconds"]:
                text += f" ({base['seconds'] / row['seconds']:.2f}×)"
            cells.append(text)
        lines.append(f"| {shape} | {dtype} | {rank} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_detail(rows: list[dict]) -> str:
    """Long table: every measurement with the model's bytes/FLOPs, achieved rates and % of the roofline floor."""
    lines = [
        "| shape | dtype | rank | impl | step ms | floor ms | % floor | GB/s | TFLOP/s | vs galore-torch 8-bit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['shape']} | {r['dtype']} | {r['rank'] or '-'} | {r['impl']} | error: {r['error']} | | | | | |")
            continue
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {r['rank'] or 'full'} | {r['impl']} | {r['seconds'] * 1e3:.3g} | "
            f"{r['floor_s'] * 1e3:.3g} | {100 * r['frac_floor']:.1f} | {r['bytes_per_s'] / 1e9:.1f} | "
            + (f"{r['flops_per_s'] / 1e12:.3f}" if r["flops_per_s"] else "-")
            + " | " + (f"{r['speedup']:.2f}×" if r["speedup"] else "-") + " |"
        )
    return "\n".join(lines)
