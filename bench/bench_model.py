"""The whole ``optimizer.step()`` of LLaMA-1B- and 7B-shaped parameter sets ("model" section).

Every parameter of the model is there: the attention and MLP projections (GaLore,
``proj_type="std"``), the RMSNorm weights, the embeddings and the head (plain AdamW
of the same family: 8-bit moments for the 8-bit optimizers). No model is built: a
step needs only the parameters and their gradients.

Two measurements, by device:

* **Launches and host time** (any machine). The steady step of our optimizers runs on
  tensors of device "meta" (shapes, no storage) inside ``sm90_compile.count_launches``:
  every Triton launch is recorded and not run, and the PyTorch operators that would
  launch a device kernel are counted (views and bare allocations launch none). Host µs
  is the wall time of the steady step with launches recorded only (no operator
  counting), median of repeats: the optimizer's and the launchers' own Python, without
  Triton's per-launch binding and the driver call. A host read of a device value (``.item()``, ``bool(tensor)``) raises on
  meta tensors, so a steady step that synchronizes fails this section. The first
  step, which refreshes every projector, runs with the refresh's finiteness check (a
  host read by design, on refresh steps only) answered "finite". The recorder needs a
  Triton that compiles (not the interpreter), so on CPU this part runs in a
  subprocess without ``TRITON_INTERPRET``.
* **Step time** (CUDA only). Every optimizer steps the same bf16 parameters and
  gradients; the first step (state, projector refresh) is untimed, then the median of
  repeats, CUDA events. galore-torch's projectors are set to random orthonormal
  matrices of its own shape and dtype before its first step instead of its full SVD
  of every matrix (minutes at 7B); the steady step does not depend on the basis.
  galore-torch replaces ``p.grad`` with the low-rank gradient, so every step is given
  the full gradients again (untimed). The floor is the sum over parameters of
  ``roofline.galore_step_cost`` / ``adamw_step_cost`` with each optimizer's own
  state sizes, against the roofline measured in the same run. The "(CUDA graph)" rows
  are our optimizers with ``capturable=True``: after two eager steps one steady step is
  captured in a ``torch.cuda.CUDAGraph``, and the timed step is ``optimizer.replay(graph)``
  (README, "CUDA graphs"), which leaves the host out of the step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .roofline import Roofline, adamw_step_cost, galore_step_cost
from .sm90_compile import count_launches

MODELS = {
    # The GaLore paper's LLaMA-1B (its configs/llama_1b.json) and LLaMA-7B.
    "LLaMA-1B": dict(hidden=2048, intermediate=5461, layers=24, vocab=32000),
    "LLaMA-7B": dict(hidden=4096, intermediate=11008, layers=32, vocab=32000),
}
TINY_MODEL = {"tiny": dict(hidden=64, intermediate=172, layers=2, vocab=256)}
RANKS = (128, 512)
QUICK_RANKS = (8,)
DTYPE = torch.bfloat16
HYPER = dict(lr=1e-3, weight_decay=0.01)
GALORE_GROUP = dict(update_proj_gap=10**9, scale=0.25, proj_type="std")
HOST_REPEATS = 5


def parameter_shapes(hidden: int, intermediate: int, layers: int, vocab: int, **_) -> tuple[list, list]:
    """``(matrices GaLore projects, the rest)``: the shapes of a LLaMA's parameters, untied head."""
    per_layer = [(hidden, hidden)] * 4 + [(intermediate, hidden)] * 2 + [(hidden, intermediate)]
    plain = [(vocab, hidden), (vocab, hidden)] + [(hidden,)] * (2 * layers + 1)
    return per_layer * layers, plain


def _groups(matrices: list, plain: list, rank: int) -> list[dict]:
    return [{"params": plain}, {"params": matrices, "rank": rank, **GALORE_GROUP}]


@dataclass(frozen=True)
class Impl:
    name: str
    galore: bool  # takes a rank; else full rank over every parameter
    moment_bytes: float  # element size of its Adam moments, for the byte model
    proj_bytes: int
    make: Callable[[list, list, int, torch.device], torch.optim.Optimizer]
    ours: bool = False
    graph: bool = False  # timed as the replay of a captured steady step (CUDA only)


def _ours(cls_name: str, **options):
    def make(matrices, plain, rank, device):
        import galore_kernels

        # backend="triton" also on meta tensors, where "auto" would pick the reference.
        return getattr(galore_kernels, cls_name)(_groups(matrices, plain, rank), **HYPER, backend="triton", **options)

    return make


def _captured_step(optimizer: torch.optim.Optimizer, device: torch.device) -> Callable[[], None]:
    """One more eager step, then a steady ``step()`` captured in a CUDA graph; returns its replay."""
    optimizer.step()
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        optimizer.step()
    return lambda: optimizer.replay(graph)


def _galore_torch_8bit(matrices, plain, rank, device):
    import galore_torch
    from galore_torch.galore_projector import GaLoreProjector

    optimizer = galore_torch.GaLoreAdamW8bit(_groups(matrices, plain, rank), **HYPER)
    generator = torch.Generator(device=device).manual_seed(0)
    for p in matrices:
        m, n = p.shape
        # galore-torch's `std` rule: project the rows away when m >= n (right), else the columns.
        shape = (n, rank) if m >= n else (m, rank)
        basis, _ = torch.linalg.qr(torch.randn(shape, device=device, generator=generator))
        projector = GaLoreProjector(rank, **GALORE_GROUP)
        projector.ortho_matrix = (basis.t() if m >= n else basis).to(p.dtype).contiguous()
        # step 1 with a huge gap: its project() keeps this basis (a refresh happens at step % gap == 0).
        optimizer.state[p].update(step=1, projector=projector)
    return optimizer


def _bnb_adamw8bit(matrices, plain, rank, device):
    import bitsandbytes

    return bitsandbytes.optim.AdamW8bit(matrices + plain, **HYPER)


def _torch_adamw(matrices, plain, rank, device):
    return torch.optim.AdamW(matrices + plain, **HYPER, **({"fused": True} if device.type == "cuda" else {"foreach": True}))


IMPLS = (
    Impl("ours 8-bit", True, 1, 4, _ours("GaLoreAdamW8bit"), ours=True),
    Impl("ours fp32", True, 4, 4, _ours("GaLoreAdamW"), ours=True),
    Impl("ours 8-bit (CUDA graph)", True, 1, 4, _ours("GaLoreAdamW8bit", capturable=True), graph=True),
    Impl("ours fp32 (CUDA graph)", True, 4, 4, _ours("GaLoreAdamW", capturable=True), graph=True),
    Impl("galore-torch 8-bit", True, 1, 2, _galore_torch_8bit),
    Impl("bnb AdamW8bit", False, 1, 0, _bnb_adamw8bit),
    Impl("torch AdamW", False, 2, 0, _torch_adamw),  # moments in the parameter's dtype
)
BASELINE = "bnb AdamW8bit"


def floor_seconds(impl: Impl, matrices: list, plain: list, rank: int, roofline: Roofline) -> float:
    """Sum over the parameters of each one's roofline floor, with ``impl``'s state sizes."""
    param_bytes = torch.empty((), dtype=DTYPE).element_size()
    costs = [adamw_step_cost(1, p.numel(), param_bytes=param_bytes, moment_bytes=impl.moment_bytes) for p in plain]
    for p in matrices:
        m, n = p.shape
        costs.append(galore_step_cost(m, n, rank, param_bytes=param_bytes, moment_bytes=impl.moment_bytes,
                                      proj_bytes=impl.proj_bytes) if impl.galore
                     else adamw_step_cost(m, n, param_bytes=param_bytes, moment_bytes=impl.moment_bytes))
    return sum(roofline.floor_seconds(cost.flops, cost.bytes) for cost in costs)


# ----------------------------------------------------------------- launches and host time (meta tensors)


@contextlib.contextmanager
def _refresh_check_answered_finite():
    """The refresh's ``bool(torch.isfinite(G).all())`` cannot be read from meta tensors; answer it "finite"."""
    from galore_kernels import projector

    original = projector.torch.isfinite

    def isfinite(tensor):
        return torch.ones(tensor.shape, dtype=torch.bool) if tensor.is_meta else original(tensor)

    projector.torch.isfinite = isfinite
    try:
        yield
    finally:
        projector.torch.isfinite = original


def host_counts(model: str, rank: int, impl_name: str, repeats: int = HOST_REPEATS) -> dict:
    """Launches and host µs of one steady step of ``impl_name`` over ``model``'s parameters, on meta tensors."""
    impl = next(i for i in IMPLS if i.name == impl_name)
    shapes = {**MODELS, **TINY_MODEL}[model]
    device = torch.device("meta")
    matrix_shapes, plain_shapes = parameter_shapes(**shapes)
    matrices = [torch.nn.Parameter(torch.empty(s, dtype=DTYPE, device=device)) for s in matrix_shapes]
    plain = [torch.nn.Parameter(torch.empty(s, dtype=DTYPE, device=device)) for s in plain_shapes]
    for p in matrices + plain:
        p.grad = torch.empty_like(p)
    optimizer = impl.make(matrices, plain, rank, device)
    with count_launches(torch_ops=False), _refresh_check_answered_finite():
        optimizer.step()  # state and projectors
    with count_launches() as counted:
        optimizer.step()
    triton_by_kind = {}
    for kind, params in (("matrix", matrices), ("1-D", [p for p in plain if p.dim() == 1])):
        with count_launches(torch_ops=False) as counted_kind:
            _step_only(optimizer, params)
        triton_by_kind[kind] = len(counted_kind.triton)
    seconds = []
    with count_launches(torch_ops=False):
        for _ in range(repeats):
            started = time.perf_counter()
            optimizer.step()
            seconds.append(time.perf_counter() - started)
    n_params = len(matrices) + len(plain)
    return dict(
        model=model, rank=rank, impl=impl_name, params=n_params, galore_params=len(matrices),
        one_d_params=sum(p.dim() == 1 for p in plain),
        triton_launches=len(counted.triton), torch_launches=len(counted.torch_ops),
        triton_per_galore_param=triton_by_kind["matrix"] / len(matrices),
        triton_all_1d=triton_by_kind["1-D"],
        host_us=1e6 * statistics.median(seconds), host_us_per_param=1e6 * statistics.median(seconds) / n_params,
        triton_kernels=dict(Counter(counted.triton)), torch_ops=dict(Counter(counted.torch_ops)),
    )


def _step_only(optimizer: torch.optim.Optimizer, params: list) -> None:
    """One ``step()`` in which only ``params`` have gradients (the others' are put back after)."""
    keep = {id(p) for p in params}
    held = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in keep and p.grad is not None:
                held.append((p, p.grad))
                p.grad = None
    try:
        optimizer.step()
    finally:
        for p, grad in held:
            p.grad = grad


def run_host_counts(models: list[str], ranks: tuple, *, timeout: float = 600) -> list[dict]:
    """``host_counts`` of our optimizers in a subprocess without ``TRITON_INTERPRET`` (the recorder needs compiling Triton)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    jobs = [dict(model=model, rank=rank, impl=impl.name) for model in models for rank in ranks for impl in IMPLS if impl.ours]
    completed = subprocess.run(
        [sys.executable, "-m", "bench.bench_model", "--host-counts", json.dumps(jobs)],
        env=env, capture_output=True, text=True, timeout=timeout,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    if completed.returncode != 0:
        raise RuntimeError(f"host-count subprocess failed ({completed.returncode}):\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------- step time (CUDA)


def make_parameters(device: torch.device, model: str, seed: int = 0) -> tuple[list, list, list]:
    """``(matrices, plain, gradients)``: ``model``'s bf16 parameters on ``device`` and one gradient each."""
    matrix_shapes, plain_shapes = parameter_shapes(**{**MODELS, **TINY_MODEL}[model])
    generator = torch.Generator(device=device).manual_seed(seed)

    def parameters(shape_list):
        return [torch.nn.Parameter(torch.randn(s, device=device, dtype=DTYPE, generator=generator) * 0.02) for s in shape_list]

    matrices, plain = parameters(matrix_shapes), parameters(plain_shapes)
    grads = [torch.randn(p.shape, device=device, dtype=DTYPE, generator=generator) * 1e-3 for p in matrices + plain]
    return matrices, plain, grads


def time_steps(device: torch.device, model: str, ranks: tuple, roofline: Roofline, *, repeats: int = 5) -> list[dict]:
    """Median steady step time of every implementation over ``model``'s bf16 parameters on ``device``."""
    from . import median_seconds, synchronize

    matrices, plain, grads = make_parameters(device, model)

    def install_grads(*_):
        for p, g in zip(matrices + plain, grads):
            p.grad = g

    rows = []
    for impl in IMPLS:
        if impl.graph and device.type != "cuda":
            continue
        for rank in ranks if impl.galore else ranks[:1]:
            row = dict(model=model, impl=impl.name, rank=rank if impl.galore else None, error=None)
            try:
                optimizer = impl.make(matrices, plain, rank, device)
                install_grads()
                optimizer.step()
                step = _captured_step(optimizer, device) if impl.graph else optimizer.step
                row["step_s"] = median_seconds(step, device, warmup=1, repeats=repeats, before=install_grads)
                row["floor_s"] = floor_seconds(impl, matrices, plain, rank, roofline)
                if device.type == "cuda":
                    row["peak_bytes"] = torch.cuda.max_memory_allocated(device)
            except Exception as error:  # reported in the table, never dropped
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            finally:
                optimizer = step = None
                synchronize(device)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
            rows.append(row)
    baseline = next((r["step_s"] for r in rows if r["impl"] == BASELINE and r["error"] is None), None)
    for row in rows:
        if row["error"] is None:
            row["vs_baseline"] = baseline / row["step_s"] if baseline else None
            row["frac_floor"] = row["floor_s"] / row["step_s"]
    return rows


# ----------------------------------------------------------------- the section


def run(device: torch.device, out_dir: Path, *, roofline: Roofline, quick: bool = False,
        timed: bool | None = None, host_timeout: float = 600) -> dict:
    """The "model" section: launches and host µs (any device), step times (CUDA, or ``timed``); writes its results file."""
    from . import cuda_synchronize_disabled

    models = list(TINY_MODEL) if quick else list(MODELS)
    ranks = QUICK_RANKS if quick else RANKS
    timed = device.type == "cuda" if timed is None else timed
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    result = dict(models=models, ranks=ranks, host=run_host_counts(models, ranks, timeout=host_timeout), times=None)
    if timed:
        # galore-torch synchronizes CUDA in every step; on CPU there is nothing to wait for.
        with cuda_synchronize_disabled() if device.type != "cuda" else contextlib.nullcontext():
            result["times"] = [row for model in models
                               for row in time_steps(device, model, ranks, roofline, repeats=2 if quick else 5)]
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    result["markdown"] = format_markdown(result) + (
        f"\n\nDevice: {roofline.device}. Load average (1 min) {load_before:.1f} before, {load_after:.1f} after, "
        f"on {os.cpu_count()} CPUs: host µs under load are rough; the launch counts are exact.")
    result["path"] = out_dir / f"model-{device.type}{'-smoke' if quick else ''}.md"
    result["path"].write_text("# The whole optimizer step of LLaMA-shaped parameter sets (python -m bench, section model)\n\n"
                              + f"{__doc__.strip()}\n\n" + result["markdown"] + "\n")
    return result


def format_host_table(rows: list[dict]) -> str:
    lines = [
        "| model | rank | optimizer | params (GaLore / 1-D) | Triton launches | torch launches | "
        "Triton per GaLore param | Triton, all 1-D params | host µs | host µs/param |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['rank']} | {r['impl']} | {r['params']} ({r['galore_params']} / {r['one_d_params']}) | "
            f"{r['triton_launches']} | {r['torch_launches']} | {r['triton_per_galore_param']:.2f} | {r['triton_all_1d']} | "
            f"{r['host_us']:.0f} | {r['host_us_per_param']:.1f} |"
        )
    return "\n".join(lines)


def format_time_table(rows: list[dict]) -> str:
    lines = [f"| model | optimizer | rank | step ms | floor ms | % floor | speedup vs {BASELINE} | peak GB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rank = r["rank"] if r["rank"] is not None else "full"
        if r["error"]:
            lines.append(f"| {r['model']} | {r['impl']} | {rank} | error: {r['error']} | | | | |")
            continue
        speedup = f"{r['vs_baseline']:.2f}×" if r.get("vs_baseline") else "n/a"
        peak = f"{r['peak_bytes'] / 1e9:.1f}" if r.get("peak_bytes") is not None else "n/a"
        lines.append(f"| {r['model']} | {r['impl']} | {rank} | {r['step_s'] * 1e3:.2f} | {r['floor_s'] * 1e3:.2f} | "
                     f"{100 * r['frac_floor']:.0f} | {speedup} | {peak} |")
    return "\n".join(lines)


def _top_kernels(rows: list[dict]) -> str:
    """Which launches one steady step makes, for the first row (the rest differ in counts only)."""
    row = rows[0]
    triton = ", ".join(f"`{k}` ×{v}" for k, v in sorted(row["triton_kernels"].items(), key=lambda kv: -kv[1]))
    torch_ops = ", ".join(f"`{k}` ×{v}" for k, v in sorted(row["torch_ops"].items(), key=lambda kv: -kv[1]))
    return (f"Launches of one steady step ({row['model']}, rank {row['rank']}, {row['impl']}): "
            f"Triton {triton or 'none'}; PyTorch {torch_ops or 'none'}.")


def format_markdown(result: dict) -> str:
    parts = ["Launches and host time of one steady step (meta tensors, launches recorded not run; "
             "see `bench/bench_model.py`):", "", format_host_table(result["host"]), "", _top_kernels(result["host"])]
    if result["times"] is not None:
        parts += ["", "Step time (bf16 parameters, median of repeats after one untimed step):", "",
                  format_time_table(result["times"])]
    else:
        parts += ["", "Step times need a CUDA device (`make gpu-check`)."]
    return "\n".join(parts)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host-counts", required=True, help="JSON list of {model, rank, impl}")
    args = parser.parse_args(argv)
    rows = [host_counts(job["model"], job["rank"], job["impl"]) for job in json.loads(args.host_counts)]
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
