"""Training quality at subspace switches: what a projector refresh does to the loss.

Compares ``moments_on_refresh`` (keep / reset / rotate, the latter with the
optimizers' rule C²v) and ``refresh`` (fixed / adaptive) for our fp32 and 8-bit
GaLore AdamW, SubTrack++'s second-moment rule for ``rotate`` as the alternative,
GaLoreAdafactor, galore-torch's GaLoreAdamW and torch AdamW, over several seeds,
on the training section's model and text (``bench_train.py``).
The defaults of the options are set from this file's results (see the README).
"""

from __future__ import annotations

import copy
import gc
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from . import device_name, synchronize
from .bench_train import TrainConfig, _loss, build_model, evaluate, galore_param_groups, load_corpus, lr_lambda

METHOD = """\
Model and data as the training section (LLaMA-style, byte-level, pydoc topics
text, same held-out split), smaller, with a short `update_proj_gap` so that a
run crosses many refreshes. Each seed draws its own initial weights and batch
order; within a seed every optimizer starts from the same weights and sees the
same batches. GaLore groups and lrs as the training section; GaLoreAdafactor
uses the GaLore lr with `relative_step=False, scale_parameter=False` (no first
moment, its default). Our 8-bit runs use `min_8bit_size=1024` so that the
low-rank moments of this small model are quantized (at the default 4096 they
would stay fp32).

* held-out loss: the final evaluation, mean ± half the range over seeds
  ("spread" below is the full range, max − min).
* spike: the mean train loss of the 20 steps from a refresh minus that of the
  20 steps before it, averaged over the run's refreshes after the first (steps
  where the optimizer's refresh count grew; galore-torch: multiples of the gap).
  The loss falls over time, so the value is negative without any mismatch; torch
  AdamW, which never refreshes, measured at the fixed schedule's steps, is the
  baseline. Adaptive runs refresh mostly early, where the loss falls fastest, so
  their spike compares with other adaptive runs only.
* optimizer ms/step: `optimizer.step()` wall time, mean over every step
  (refreshes included), on one CPU thread.
* refreshes: projector refreshes summed over the GaLore parameters.

A default changes only if the candidate's mean held-out loss beats `keep` +
`fixed` (same precision) by more than the larger of the two seed spreads.
"""

STUDY_CONFIG = TrainConfig(hidden=64, layers=2, heads=2, intermediate=172, seq=64, batch=8, steps=180, eval_every=30,
                           eval_windows=32, rank=16, update_proj_gap=20, galore_lr=3e-3, galore_scale=0.25,
                           adamw_lr=1e-3, warmup_steps=20)
QUICK_STUDY_CONFIG = TrainConfig(hidden=32, layers=1, heads=2, intermediate=64, seq=32, batch=4, steps=4, eval_every=4,
                                 eval_windows=2, rank=8, update_proj_gap=2, galore_lr=3e-3, galore_scale=0.25,
                                 adamw_lr=1e-3, warmup_steps=2)
SEEDS = (0, 1, 2)
QUICK_SEEDS = (0,)
SPIKE_WINDOW = 20
MIN_8BIT_SIZE = 1024


def _variants() -> list[tuple[str, dict]]:
    """(run name, how to build it): torch AdamW, galore-torch, ours × options, SubTrack++'s rule, Adafactor."""
    variants = [("torch AdamW", {}), ("galore-torch fp32", {})]
    for precision in ("fp32", "8-bit"):
        for refresh in ("fixed", "adaptive"):
            for policy in ("keep", "reset", "rotate"):
                variants.append((f"ours {precision} {policy} {refresh}",
                                 dict(precision=precision, moments_on_refresh=policy, refresh=refresh)))
    variants.append(("ours fp32 rotate[subtrack] fixed",
                     dict(precision="fp32", moments_on_refresh="rotate", refresh="fixed", rule="subtrack")))
    variants.append(("ours Adafactor keep fixed", dict(precision="adafactor")))
    return variants


def _make_optimizer(name: str, options: dict, model, config: TrainConfig):
    common = dict(eps=1e-8, weight_decay=0.0)
    if name == "torch AdamW":
        return torch.optim.AdamW(model.parameters(), lr=config.adamw_lr, foreach=True, **common)
    groups = galore_param_groups(model, config)
    if name == "galore-torch fp32":
        import galore_torch

        return galore_torch.GaLoreAdamW(groups, lr=config.galore_lr, no_deprecation_warning=True, **common)
    import galore_kernels as gk

    if options["precision"] == "adafactor":
        return gk.GaLoreAdafactor(groups, lr=config.galore_lr, relative_step=False, scale_parameter=False)
    refresh_options = dict(moments_on_refresh=options["moments_on_refresh"], refresh=options["refresh"])
    if options["precision"] == "8-bit":
        return gk.GaLoreAdamW8bit(groups, lr=config.galore_lr, min_8bit_size=MIN_8BIT_SIZE, **refresh_options, **common)
    optimizer = gk.GaLoreAdamW(groups, lr=config.galore_lr, **refresh_options, **common)
    if "rule" in options:
        optimizer.second_moment_rule = options["rule"]
    return optimizer


def _refresh_count(name: str, optimizer, step: int, config: TrainConfig) -> int:
    """Refreshes made so far (galore-torch: its fixed schedule, counted; torch AdamW: none)."""
    if hasattr(optimizer, "refresh_counts"):
        return optimizer.refresh_counts()["refreshes"]
    if name == "galore-torch fp32":
        galore_params = sum(len(g["params"]) for g in optimizer.param_groups if "rank" in g)
        return galore_params * (step // config.update_proj_gap + 1)
    return 0


def train_one(name: str, options: dict, initial_model, batches, held_out, config: TrainConfig,
              device: torch.device) -> dict:
    gc.collect()
    model = copy.deepcopy(initial_model).to(device)
    optimizer = _make_optimizer(name, options, model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    train_losses, held_out_curve, optimizer_seconds, refresh_steps = [], [], [], []
    refreshes = 0
    for step in range(config.steps):
        loss = _loss(model, batches[step].to(device), device)
        loss.backward()
        synchronize(device)
        start = time.perf_counter()
        optimizer.step()
        synchronize(device)
        optimizer_seconds.append(time.perf_counter() - start)
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        train_losses.append(loss.item())
        count = _refresh_count(name, optimizer, step, config)
        if count > refreshes:
            refresh_steps.append(step)
        refreshes = count
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            held_out_curve.append((step + 1, evaluate(model, held_out, device)))
    if name == "torch AdamW":  # the trend-only baseline: the fixed schedule's steps
        refresh_steps = list(range(0, config.steps, config.update_proj_gap))
    return dict(
        name=name, final_held_out=held_out_curve[-1][1], held_out_curve=held_out_curve, train_losses=train_losses,
        spike=spike(train_losses, refresh_steps), refreshes=refreshes,
        optimizer_ms=1e3 * statistics.fmean(optimizer_seconds),
    )


def spike(train_losses: list[float], refresh_steps: list[int], window: int = SPIKE_WINDOW) -> float | None:
    """Mean over refreshes after the first of mean(loss[s:s+w]) − mean(loss[s−w:s]); None without one."""
    window = min(window, max(1, len(train_losses) // 4))
    jumps = [
        statistics.fmean(train_losses[s:s + window]) - statistics.fmean(train_losses[s - window:s])
        for s in refresh_steps
        if s >= window and s + window <= len(train_losses)
    ]
    return statistics.fmean(jumps) if jumps else None


def run(device: torch.device, *, quick: bool = False, progress: bool = True) -> dict:
    """Every variant × every seed; returns {'config', 'seeds', 'runs': [per-run dicts with 'seed']}."""
    config = QUICK_STUDY_CONFIG if quick else STUDY_CONFIG
    seeds = QUICK_SEEDS if quick else SEEDS
    threads = torch.get_num_threads()
    # One thread: this model is too small to gain from two, and on a shared machine a
    # second spinning thread made each step 10x slower (measured under load 7 on 2 cores).
    torch.set_num_threads(1)
    try:
        return _run(device, config, seeds, progress)
    finally:
        torch.set_num_threads(threads)


def _run(device: torch.device, config: TrainConfig, seeds, progress: bool) -> dict:
    train, held = load_corpus()
    window = config.seq + 1
    held_out = held[: (len(held) // window) * window].view(-1, window)[: config.eval_windows].to(device)
    runs = []
    started = time.perf_counter()
    for seed in seeds:
        seeded = replace(config, seed=seed)
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, len(train) - window, (config.steps, config.batch), generator=generator)
        batches = train[starts.unsqueeze(-1) + torch.arange(window)]
        initial_model = build_model(seeded)
        for name, options in _variants():
            result = train_one(name, options, initial_model, batches, held_out, seeded, device)
            runs.append(dict(result, seed=seed))
            if progress:
                print(f"[quality] seed {seed} {name}: held-out {result['final_held_out']:.4f} "
                      f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return dict(config=asdict(config), seeds=list(seeds), runs=runs, wall_s=time.perf_counter() - started)


def summarize(study: dict) -> list[dict]:
    """One row per variant: held-out mean and spread, spike, optimizer ms, refreshes (means over seeds)."""
    rows = []
    for name, _ in _variants():
        runs = [r for r in study["runs"] if r["name"] == name]
        losses = [r["final_held_out"] for r in runs]
        spikes = [r["spike"] for r in runs if r["spike"] is not None]
        rows.append(dict(
            name=name, held_out=statistics.fmean(losses), spread=max(losses) - min(losses),
            spike=statistics.fmean(spikes) if spikes else None,
            optimizer_ms=statistics.fmean(r["optimizer_ms"] for r in runs),
            refreshes=statistics.fmean(r["refreshes"] for r in runs),
        ))
    return rows


def verdicts(rows: list[dict]) -> list[str]:
    """Each option against ``keep`` + ``fixed`` of its precision: a win needs an advantage beyond both spreads."""
    by_name = {row["name"]: row for row in rows}
    lines = []
    for precision in ("fp32", "8-bit"):
        base = by_name[f"ours {precision} keep fixed"]
        for refresh in ("fixed", "adaptive"):
            for policy in ("keep", "reset", "rotate"):
                if (policy, refresh) == ("keep", "fixed"):
                    continue
                row = by_name[f"ours {precision} {policy} {refresh}"]
                advantage = base["held_out"] - row["held_out"]
                bar = max(base["spread"], row["spread"])
                verdict = "wins" if advantage > bar else ("loses" if -advantage > bar else "within the seed spread")
                lines.append(
                    f"{precision} {policy} {refresh}: {advantage:+.4f} vs keep fixed (spread {bar:.4f}): {verdict}"
                )
    square, subtrack = by_name["ours fp32 rotate fixed"], by_name["ours fp32 rotate[subtrack] fixed"]
    better = "subtrack" if subtrack["held_out"] <= square["held_out"] else "square"
    lines.append(f"rotate second-moment rule: subtrack {subtrack['held_out']:.4f} vs C²v {square['held_out']:.4f} "
                 f"(spread {max(subtrack['spread'], square['spread']):.4f}): lower is {better}")
    return lines


def format_table(rows: list[dict]) -> str:
    lines = ["| run | held-out loss (mean ± spread/2) | spike after refresh | optimizer ms/step | refreshes |",
             "|---|---|---|---|---|"]
    for row in rows:
        spike_text = "n/a" if row["spike"] is None else f"{row['spike']:+.4f}"
        lines.append(f"| {row['name']} | {row['held_out']:.4f} ± {row['spread'] / 2:.4f} | {spike_text} | "
                     f"{row['optimizer_ms']:.2f} | {row['refreshes']:.0f} |")
    return "\n".join(lines)


def plot(study: dict, path: Path) -> None:
    """Held-out curves (mean over seeds) of every variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6))
    for name, _ in _variants():
        curves = [r["held_out_curve"] for r in study["runs"] if r["name"] == name]
        steps = [s for s, _ in curves[0]]
        means = [statistics.fmean(c[i][1] for c in curves) for i in range(len(steps))]
        style = "--" if "8-bit" in name else "-"
        ax.plot(steps, means, style, label=name, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel(f"held-out loss (mean over {len(study['seeds'])} seeds)")
    ax.set_title(f"Refresh every {study['config']['update_proj_gap']} steps: moments on refresh and schedule")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(path: Path, study: dict, device: torch.device, meta: dict) -> list[Path]:
    """The results file and its plot (``<stem>.png``); returns both paths."""
    rows = summarize(study)
    png = path.with_suffix(".png")
    plot(study, png)
    config = study["config"]
    text = "\n".join([
        "# Training quality at subspace switches",
        "",
        f"Device: {device_name(device)}; {meta['date']}; torch {meta['torch']}; seeds {study['seeds']}; "
        f"section wall time {study['wall_s']:.0f} s; load average at the suite's start and end {meta['load']}; "
        f"`{meta['command']}`.",
        "",
        f"Config: {config}",
        "",
        METHOD,
        "## Results",
        "",
        format_table(rows),
        "",
        "## Verdicts",
        "",
        *[f"* {line}" for line in verdicts(rows)],
        "",
        f"![held-out loss curves]({png.name})",
        "",
        "## Per seed (final held-out loss)",
        "",
        "| run | " + " | ".join(f"seed {s}" for s in study["seeds"]) + " |",
        "|---|" + "---|" * len(study["seeds"]),
        *[
            f"| {name} | " + " | ".join(
                f"{r['final_held_out']:.4f}" for r in study["runs"] if r["name"] == name
            ) + " |"
            for name, _ in _variants()
        ],
        "",
    ])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return [path, png]
