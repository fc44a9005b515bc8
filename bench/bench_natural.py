"""Natural GaLore against GaLore: step time and optimizer state per shape, and training per history option.

Step: each (shape, rank) times GaLore and Natural GaLore (fp32 and 8-bit moments, fp32
and bf16 history) round-robin exactly as ``bench_step`` does (same warm-up, same
gradient rotation, no timed refresh), and reports the bytes of each optimizer's state
after those steps. Train: the ``bench_train`` model, data, schedule, steps, rank, gap,
scale and lr, with ``GaLoreAdamW`` and ``NaturalGaLoreAdamW`` under each
``history_on_refresh`` option (and ``keep`` with a bf16 history), every run from the
same initial weights and batches. Results go to ``<device>-<date>-natural-galore.md`` and a
PNG of the loss curves beside it.
"""

from __future__ import annotations

import datetime
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from . import bench_step, bench_train, device_name, device_slug
from .bench_step import Config, Impl

NATURAL_HISTORY = 20
GPU_SHAPES = ((2048, 5632), (4096, 4096), (4096, 11008))
GPU_RANKS = (128, 256)
CPU_SHAPES = ((512, 1376), (1024, 1024))
CPU_RANKS = (64, 128)
QUICK_SHAPES = ((96, 160),)
QUICK_RANKS = (16,)


def _maker(cls_name: str, **kwargs):
    def make(groups, device):
        import galore_kernels

        return getattr(galore_kernels, cls_name)(groups, **bench_step.HYPER, **kwargs)

    return make


def _natural(cls_name: str, history_dtype: torch.dtype):
    return _maker(cls_name, natural_history=NATURAL_HISTORY, history_dtype=history_dtype)


# moment/projector byte functions only feed bench_step's roofline model, unused here.
STEP_IMPLS = (
    Impl("GaLore fp32", True, lambda dt: 4, lambda dt: 4, _maker("GaLoreAdamW")),
    Impl("Natural fp32", True, lambda dt: 4, lambda dt: 4, _natural("NaturalGaLoreAdamW", torch.float32)),
    Impl("Natural fp32, bf16 history", True, lambda dt: 4, lambda dt: 4, _natural("NaturalGaLoreAdamW", torch.bfloat16)),
    Impl("GaLore 8-bit", True, lambda dt: 1, lambda dt: 4, _maker("GaLoreAdamW8bit")),
    Impl("Natural 8-bit", True, lambda dt: 1, lambda dt: 4, _natural("NaturalGaLoreAdamW8bit", torch.float32)),
)

TRAIN_RUNS = {
    # name: NaturalGaLoreAdamW keyword arguments, None for the GaLoreAdamW baseline.
    "GaLore fp32": None,
    "Natural keep": dict(history_on_refresh="keep"),
    "Natural reset": dict(history_on_refresh="reset"),
    "Natural rotate": dict(history_on_refresh="rotate"),
    "Natural keep, bf16 history": dict(history_on_refresh="keep", history_dtype=torch.bfloat16),
}


def step_config(device: torch.device, quick: bool) -> tuple[tuple, tuple, Config]:
    if quick:
        return QUICK_SHAPES, QUICK_RANKS, Config(QUICK_SHAPES, QUICK_RANKS, (torch.float32,), warmup=2, repeats=2)
    if device.type == "cuda":
        return GPU_SHAPES, GPU_RANKS, Config(GPU_SHAPES, GPU_RANKS, (torch.bfloat16,), warmup=10, repeats=30)
    return CPU_SHAPES, CPU_RANKS, Config(CPU_SHAPES, CPU_RANKS, (torch.float32,), warmup=3, repeats=10)


def _state_bytes(impl: Impl, m: int, n: int, rank: int, dtype, device) -> int:
    param, optimizer = bench_step._make_entry(impl, m, n, rank, dtype, device)
    param.grad = torch.randn(m, n, device=device, dtype=dtype) * 1e-2
    optimizer.step()
    return bench_train.state_bytes(optimizer)


def history_bytes_formula(m: int, n: int, rank: int, history_bytes: int, size: int = NATURAL_HISTORY) -> int:
    """s·k·bytes(history) + 8·s² (fp64 Gram) + 8 (count), k = max(m, n)·r under proj_type="std"."""
    return size * max(m, n) * min(rank, m, n) * history_bytes + 8 * size * size + 8


def run_step(device: torch.device, quick: bool) -> list[dict]:
    shapes, ranks, config = step_config(device, quick)
    dtype = config.dtypes[0]
    rows = []
    for m, n in shapes:
        cases = [(impl, rank) for rank in ranks for impl in STEP_IMPLS]
        print(f"[bench natural] step {m}x{n}", file=sys.stderr)
        timings = bench_step._time_cell(cases, m, n, dtype, device, config)
        for (impl, rank), (seconds, error) in zip(cases, timings):
            rows.append(dict(shape=f"{m}x{n}", m=m, n=n, rank=rank, dtype=str(dtype).removeprefix("torch."),
                             impl=impl.name, seconds=seconds, error=error,
                             state_bytes=_state_bytes(impl, m, n, rank, dtype, device)))
    return rows


def _make_train_optimizer(kwargs):
    def make(name, model, config, device):
        import galore_kernels

        groups = bench_train.galore_param_groups(model, config)
        common = dict(lr=config.galore_lr, eps=1e-8, weight_decay=0.0)
        if kwargs is None:
            return galore_kernels.GaLoreAdamW(groups, **common), None
        return galore_kernels.NaturalGaLoreAdamW(groups, natural_history=NATURAL_HISTORY, **common, **kwargs), None

    return make


def run_train(device: torch.device, quick: bool, progress: bool) -> dict:
    config = bench_train.default_config(device, quick)
    train, held = bench_train.load_corpus()
    window = config.seq + 1
    held_out = held[: (len(held) // window) * window].view(-1, window)[: config.eval_windows].to(device)
    generator = torch.Generator().manual_seed(config.seed)
    starts = torch.randint(0, len(train) - window, (config.steps, config.batch), generator=generator)
    batches = train[starts.unsqueeze(-1) + torch.arange(window)]
    initial_model = bench_train.build_model(config)
    from tqdm.auto import tqdm

    with tqdm(total=len(TRAIN_RUNS) * config.steps, desc="natural", disable=not progress, file=sys.stderr) as bar:
        results = [
            bench_train.train_one(name, initial_model, batches, held_out, config, device, bar,
                                  make=_make_train_optimizer(kwargs))
            for name, kwargs in TRAIN_RUNS.items()
        ]
    return dict(config=asdict(config), results=results)


def format_step_table(rows: list[dict]) -> str:
    """Per (shape, rank): step ms, ratio to GaLore with the same moments, and state MiB."""
    lines = ["| shape | rank | optimizer | step ms | vs GaLore (same moments) | state MiB | of which history MiB (formula) |",
             "|---|---|---|---|---|---|---|"]
    by_key = {(r["shape"], r["rank"], r["impl"]): r for r in rows}
    for r in rows:
        base_name = "GaLore 8-bit" if "8-bit" in r["impl"] else "GaLore fp32"
        base = by_key[(r["shape"], r["rank"], base_name)]
        ratio = f"{r['seconds'] / base['seconds']:.2f}×" if r["seconds"] and base["seconds"] else "-"
        ms = f"{r['seconds'] * 1e3:.3g}" if r["seconds"] else f"error: {r['error']}"
        history = "-"
        if r["impl"].startswith("Natural"):
            item = 2 if "bf16" in r["impl"] else 4
            history = f"{history_bytes_formula(r['m'], r['n'], r['rank'], item) / 2**20:.2f}"
        lines.append(f"| {r['shape']} | {r['rank']} | {r['impl']} | {ms} | {ratio} | "
                     f"{r['state_bytes'] / 2**20:.2f} | {history} |")
    return "\n".join(lines)


def format_train_table(train: dict) -> str:
    results = train["results"]
    base = results[0]
    lines = ["| optimizer | held-out loss | vs GaLore | held-out at 20% of steps | train loss (last eval window) | "
             "optimizer ms/step (median) | optimizer state MiB |", "|---|---|---|---|---|---|---|"]
    early_index = max(0, len(base["held_out_curve"]) // 5 - 1)
    for r in results:
        early_step, early = r["held_out_curve"][early_index]
        lines.append(
            f"| {r['optimizer']} | {r['final_held_out']:.4f} | {100 * (r['final_held_out'] / base['final_held_out'] - 1):+.2f}% | "
            f"{early:.4f} (step {early_step}) | {r['final_train']:.4f} | {r['optimizer_ms']:.2f} | {r['state_bytes'] / 2**20:.3f} |"
        )
    return "\n".join(lines)


def write(out: Path, device: torch.device, step_rows: list[dict], train: dict, wall_s: float, quick: bool) -> Path:
    from .report import plot_train

    today = datetime.date.today().isoformat()
    path = out / f"{device_slug(device)}-{today}{'-quick' if quick else ''}-natural-galore.md"
    out.mkdir(parents=True, exist_ok=True)
    png = path.with_name(f"{path.stem}.png")
    plot_train(train, png)
    config = train["config"]
    text = "\n".join([
        f"# Natural GaLore vs GaLore: {device_name(device)}, {today}",
        "",
        f"- command: `python -m bench --only natural`{' --quick' if quick else ''}; wall time {wall_s:.0f} s; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        f"- natural_history = {NATURAL_HISTORY}, damping = 1e-3 (the authors' defaults)",
        "",
        "## Step time and optimizer state",
        "",
        "Method as `bench_step` (warm-up, a rotation of gradients, no timed refresh, all rows of a shape "
        "timed round-robin), `backend=\"auto\"`: " + ("the Triton kernels." if device.type == "cuda" else
        "on CPU tensors the PyTorch reference, so the times are those of the reference, not of the kernels."),
        "State is every tensor of the optimizer state after one step; the history part is "
        "s·k·bytes(history_dtype) + 8·s² (fp64 Gram) + 8 (count), k = max(m, n)·r.",
        "",
        format_step_table(step_rows),
        "",
        "## Training (equal steps, equal settings)",
        "",
        f"The `bench_train` setup ({config['layers']} layers, hidden {config['hidden']}, {config['steps']} steps, "
        f"rank {config['rank']}, gap {config['update_proj_gap']}, scale {config['galore_scale']}, lr {config['galore_lr']}, "
        "eps 1e-8, no weight decay), the same initial weights and batches for every run.",
        "",
        format_train_table(train),
        "",
        f"![loss curves]({png.name})",
        "",
    ])
    path.write_text(text)
    return path


def run(device: torch.device, *, out: Path, quick: bool = False, progress: bool = True) -> dict:
    """Both parts; writes the results file and returns {'step', 'train', 'path'}."""
    started = time.perf_counter()
    step_rows = run_step(device, quick)
    train = run_train(device, quick, progress)
    path = write(out, device, step_rows, train, time.perf_counter() - started, quick)
    return dict(step=step_rows, train=train, path=path)

