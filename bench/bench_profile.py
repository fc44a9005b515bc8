"""Where a whole optimizer step's time goes: the device's busy time per kernel against the wall.

The "model" section times the whole ``optimizer.step()`` of LLaMA-shaped parameter sets;
this says how much of that time the device was busy, and on what. A few steady steps
of ``GaLoreAdamW8bit`` run under ``torch.profiler`` (untimed warm-up first: state,
projector refresh, compilation); every device-side event (Triton and PyTorch kernels,
copies, fills) is summed per name and per step, and the busy total is set against the
median wall time of the same step measured without the profiler (CUDA events). Busy
time well under the wall means the step waits on the host: our Python, Triton's
launcher and the driver (``bench/NOTES.md``).

On a CPU the profiler sees no device: the table then lists the PyTorch operators by
their own CPU time, and the Triton kernels (run by the interpreter) are not in it. That
run only checks the plumbing (``make gpu-check GPU_CHECK_ARGS=--dry-run``).
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from . import median_seconds, synchronize
from .bench_model import IMPLS, make_parameters

PROFILED_STEPS = 3
TOP_KERNELS = 8


def _device_events(profile, on_device: bool) -> list[tuple[str, float]]:
    """``(name, µs)`` of every device-side event; on a CPU run, of every operator's own CPU time."""
    if on_device:
        return [(event.name, event.time_range.elapsed_us()) for event in profile.events()
                if event.device_type == torch.autograd.DeviceType.CUDA]
    return [(event.name, event.self_cpu_time_total) for event in profile.events()
            if event.device_type == torch.autograd.DeviceType.CPU and event.name.startswith("aten::")]


def profile_step(device: torch.device, model: str, rank: int, impl_name: str = "ours 8-bit",
                 steps: int = PROFILED_STEPS, wall_repeats: int = 10) -> dict:
    """Per-name device time of ``steps`` steady steps of ``impl_name`` over ``model``, and the step's wall time."""
    impl = next(impl for impl in IMPLS if impl.name == impl_name)
    matrices, plain, grads = make_parameters(device, model)

    def install_grads(*_):
        for p, g in zip(matrices + plain, grads):
            p.grad = g

    optimizer = impl.make(matrices, plain, rank, device)
    install_grads()
    optimizer.step()  # state and every projector's refresh: not a steady step
    wall_s = median_seconds(optimizer.step, device, warmup=2, repeats=wall_repeats, before=install_grads)
    on_device = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_device else [])
    with torch.profiler.profile(activities=activities) as profile:
        for _ in range(steps):
            install_grads()
            optimizer.step()
        synchronize(device)
    per_name = defaultdict(lambda: [0, 0.0])
    for name, micros in _device_events(profile, on_device):
        per_name[name][0] += 1
        per_name[name][1] += micros
    kernels = sorted(({"name": name, "launches": count / steps, "us": total / steps} for name, (count, total) in per_name.items()),
                     key=lambda row: -row["us"])
    busy_s = sum(row["us"] for row in kernels) / 1e6
    return dict(model=model, rank=rank, impl=impl_name, device=device.type, wall_s=wall_s, busy_s=busy_s,
                kernels=kernels, steps=steps)


def run(device: torch.device, *, quick: bool = False) -> list[dict]:
    cases = [("tiny", 8)] if quick else [("LLaMA-1B", 512), ("LLaMA-7B", 512)]
    rows = []
    for model, rank in cases:
        rows.append(profile_step(device, model, rank, wall_repeats=3 if quick else 10))
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def format_markdown(rows: list[dict]) -> str:
    clock = "CUDA events" if rows[0]["device"] == "cuda" else "the host clock"
    lines = [f"Steady steps of `GaLoreAdamW8bit` under `torch.profiler` ({rows[0]['steps']} steps, per-step figures); "
             f"wall: median step time without the profiler, {clock}. Busy: the sum of the device-side events.", ""]
    lines += ["| model | rank | wall ms | device busy ms | busy / wall |", "|---|---|---|---|---|"]
    for row in rows:
        busy = "n/a (CPU)" if row["device"] != "cuda" else f"{row['busy_s'] * 1e3:.2f}"
        share = "n/a" if row["device"] != "cuda" else f"{row['busy_s'] / row['wall_s']:.0%}"
        lines.append(f"| {row['model']} | {row['rank']} | {row['wall_s'] * 1e3:.2f} | {busy} | {share} |")
    for row in rows:
        what = "device events" if row["device"] == "cuda" else "PyTorch operators, own CPU time (the Triton kernels are not seen)"
        lines += ["", f"{row['model']}, rank {row['rank']}: the {TOP_KERNELS} largest {what}, per step", "",
                  "| name | launches | µs | µs per launch | share of the busy time |", "|---|---|---|---|---|"]
        total = sum(kernel["us"] for kernel in row["kernels"]) or 1.0
        for kernel in row["kernels"][:TOP_KERNELS]:
            lines.append(f"| `{kernel['name'][:80]}` | {kernel['launches']:.0f} | {kernel['us']:.1f} | "
                         f"{kernel['us'] / max(kernel['launches'], 1):.2f} | {kernel['us'] / total:.0%} |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    return "; ".join(f"{row['model']} r{row['rank']}: wall {row['wall_s'] * 1e3:.1f} ms, busy "
                     + ("n/a" if row["device"] != "cuda" else f"{row['busy_s'] * 1e3:.1f} ms ({row['busy_s'] / row['wall_s']:.0%})")
                     for row in rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model only")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = run(device, quick=args.quick)
    print(format_markdown(rows))
    print(summary(rows))


if __name__ == "__main__":
    main()
