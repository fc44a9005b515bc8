"""The results file of a ``python -m bench`` run: one markdown file plus PNG plots next to it.

``write`` takes what the sections returned and renders it; nothing here measures.
Plots use matplotlib's Agg backend (no display needed), selected when a plot is
drawn, not at import.
"""

from __future__ import annotations

import math
from pathlib import Path

from . import bench_step, bench_train, roofline as roofline_module


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_step(rows: list[dict], path: Path) -> None:
    """Speedup vs galore-torch 8-bit, one bar per implementation, one group per (shape, dtype, rank)."""
    plt = _pyplot()
    impls = [name for name in dict.fromkeys(r["impl"] for r in rows) if name != bench_step.BASELINE]
    seconds = {(r["shape"], r["dtype"], r["rank"], r["impl"]): r["seconds"] for r in rows}
    keys = list(dict.fromkeys((r["shape"], r["dtype"], r["rank"]) for r in rows if r["rank"] is not None))
    width = 0.8 / max(len(impls), 1)
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(keys) + 3), 5))
    for i, impl in enumerate(impls):
        ratios = []
        for shape, dtype, rank in keys:
            base = seconds.get((shape, dtype, rank, bench_step.BASELINE))
            mine = seconds.get((shape, dtype, rank, impl)) or seconds.get((shape, dtype, None, impl))
            ratios.append(base / mine if base and mine else math.nan)
        ax.bar([k + (i - (len(impls) - 1) / 2) * width for k in range(len(keys))], ratios, width, label=impl)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([f"{s}\n{d}\nr={r}" for s, d, r in keys], fontsize=7)
    ax.set_ylabel("speedup vs galore-torch 8-bit (×, log)")
    ax.set_title("Optimizer step, steady state (no projector refresh)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_svd(rows: list[dict], path: Path) -> None:
    """Time against captured energy, one point per method and settings."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for row in rows:
        ax.scatter(row["seconds"] * 1e3, row["energy"])
        ax.annotate(f"{row['method']}\n{row['settings']}", (row["seconds"] * 1e3, row["energy"]), fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel("time per refresh (ms, log)")
    ax.set_ylabel("captured energy (1 = exact)")
    shapes = sorted({f"{r['m']}x{r['n']} r={r['rank']}" for r in rows})
    ax.set_title("Projector refresh: " + ", ".join(shapes))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_train(train: dict, path: Path) -> None:
    """Train loss (moving average) and held-out loss against step, one colour per optimizer."""
    plt = _pyplot()
    fig, (ax_train, ax_held) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    window = max(1, train["config"]["eval_every"] // 2)
    for result in train["results"]:
        losses = result["train_losses"]
        smoothed = [sum(losses[max(0, i - window + 1): i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(losses))]
        line, = ax_train.plot(range(1, len(losses) + 1), smoothed, label=result["optimizer"], linewidth=1)
        steps, held = zip(*result["held_out_curve"])
        ax_held.plot(steps, held, marker="o", markersize=3, color=line.get_color(), label=result["optimizer"])
    ax_train.set_title(f"train loss (moving average of {window} steps)")
    ax_held.set_title("held-out loss (fixed set)")
    for ax in (ax_train, ax_held):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    ax_train.set_ylabel("next-byte cross-entropy (nats)")
    ax_held.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_path(path: Path, section: str) -> Path:
    """The PNG of ``section`` beside ``path``; a file already named for the section (``--only svd``) is not named twice."""
    stem = path.stem
    return path.with_name(f"{stem}.png" if stem.endswith(f"-{section}") else f"{stem}-{section}.png")


def write(path: Path, *, meta: dict, roofline, step_rows=None, step_method: str = "", svd_rows=None, svd_table: str = "",
          train=None) -> list[Path]:
    """Writes ``path`` (markdown) and its plots next to it; returns every file written.

    With ``meta["pending"]`` non-empty the file says it is partial and which sections are missing.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    written = [path]
    pending = meta.get("pending", ())
    out = [
        f"# galore-kernels benchmarks: {meta['device']}, {meta['date']}",
        "",
        *([f"**Partial results**: written when the sections above it ended; not run (yet): {', '.join(pending)}. "
           "An interrupted run leaves this file as it was.", ""] if pending else []),
        f"- device: **{meta['device']}**",
        f"- date: {meta['date']}; command: `{meta['command']}`; total wall time {meta['wall_s']:.0f} s ("
        + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in meta["section_s"].items()) + ")",
        f"- torch {meta['torch']}, triton {meta['triton']}, galore-torch {meta['galore_torch']}, "
        f"bitsandbytes {meta['bitsandbytes']}, transformers {meta['transformers']}, Python {meta['python']}, "
        f"{meta['threads']} torch threads",
        f"- 1-minute load average at start / end: {meta['load'][0]:.2f} / {meta['load'][1]:.2f} "
        "(this run adds about its thread count; much more than the core count means other processes "
        "shared the machine and times are inflated)"
        if meta["load"][0] is not None else "",
        f"- sections: {', '.join(meta['sections'])}" + (" (`--quick`: tiny sizes, a smoke test, not a measurement)" if meta["quick"] else ""),
        "",
        "## Roofline",
        "",
        "Measured at the start of this run on this device.",
        "",
        roofline_module.format_table(roofline),
        "",
        "Cost model of one step (from `bench/roofline.py`):",
        "",
        roofline_module.COST_MODEL.strip(),
        "",
        "Floor of a step = max(FLOPs / peak matmul rate, bytes / copy bandwidth); % floor = floor / measured time.",
    ]
    if step_rows is not None:
        step_png = plot_path(path, "step")
        plot_step(step_rows, step_png)
        written.append(step_png)
        errors = [r for r in step_rows if r["error"]]
        out += [
            "",
            "## Optimizer step throughput",
            "",
            step_method,
            "",
            "Summary: step time in ms, and in brackets the speedup vs galore-torch 8-bit (same shape, dtype, rank, run).",
            "",
            bench_step.format_table(step_rows),
            "",
            f"![step speedups]({step_png.name})",
            "",
            "Every measurement, with the cost model's bytes and FLOPs turned into achieved rates:",
            "",
            bench_step.format_detail(step_rows),
        ]
        if errors:
            out += ["", f"**{len(errors)} measurement(s) failed**; see the error cells above."]
    if svd_rows is not None:
        svd_png = plot_path(path, "svd")
        plot_svd(svd_rows, svd_png)
        written.append(svd_png)
        out += [
            "",
            "## Projector refresh (SVD)",
            "",
            "From `bench/bench_svd.py` (see its docstring for the matrix and the energy score). "
            "`per step @gap 200` is the refresh time amortized over `update_proj_gap=200` steps: "
            "add it to a step time above to get the average step cost with refreshes.",
            "",
            svd_table.strip(),
            "",
            f"![svd time vs energy]({svd_png.name})",
        ]
    if train is not None:
        train_png = plot_path(path, "train")
        plot_train(train, train_png)
        written.append(train_png)
        config = train["config"]
        gpu = any(r["peak_memory"] is not None for r in train["results"])
        out += [
            "",
            "## End-to-end training",
            "",
            bench_train.METHOD.strip(),
            "",
            f"Model: LLaMA (transformers `LlamaForCausalLM`), hidden {config['hidden']}, {config['layers']} layers, "
            f"{config['heads']} heads, intermediate {config['intermediate']}, byte vocabulary 256, "
            f"sequence {config['seq']}, batch {config['batch']} ({config['batch'] * config['seq']} tokens/step), "
            f"{config['steps']} steps, warm-up {config['warmup_steps']} steps"
            + (f" (scaled down from {train['scaled_from']['steps']} steps to fit `--budget-minutes`; projector gap, "
               "evaluation interval and warm-up scaled alike). " if train.get("scaled_from") else ". ")
            +
            f"Corpus: {train['corpus_bytes'][0]} train bytes, {train['corpus_bytes'][1]} held-out bytes; the fixed "
            f"held-out set is the first {config['eval_windows']} non-overlapping windows ({train['held_out_tokens']} "
            f"predicted tokens), evaluated every {config['eval_every']} steps. "
            f"GaLore: rank {config['rank']}, update_proj_gap {config['update_proj_gap']}, scale {config['galore_scale']}, "
            f"lr {config['galore_lr']:g}; torch AdamW: lr {config['adamw_lr']:g}. eps 1e-8, weight decay 0 for all. "
            "Ours use their defaults otherwise (`backend=\"auto\"`, `svd=\"randomized\"`); galore-torch uses its exact SVD.",
            "",
            "Held-out loss is the final evaluation; the train loss is the mean over the last evaluation interval; "
            "tokens/s counts forward, backward and optimizer (evaluation excluded); optimizer ms/step is the median "
            "over steps after the first (which builds state and computes every projector); optimizer state is the "
            "sum of `nbytes` of every tensor in the optimizer's per-parameter state (projectors included). "
            + ("Peak memory is `torch.cuda.max_memory_allocated` over the run." if gpu else
               "On CPU there is no allocator peak to read, so the optimizer state size stands in for memory."),
            "",
            bench_train.format_table(train),
            "",
            f"**{bench_train.format_acceptance(train['acceptance'])}**",
            "",
            f"![loss curves]({train_png.name})",
        ]
    path.write_text("\n".join(out) + "\n")
    return written
