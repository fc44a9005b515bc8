"""Layerwise optimizers on a small LLaMA-style model: step time and peak memory of a training step.

``python -m bench.bench_layerwise`` (CPU or CUDA). For every configuration, the median
wall time of a training step (forward, every backward pass, step) and its memory:

* on the CPU, by accounting: parameters + optimizer state + the peak of the gradient
  bytes alive at once, taken in every gradient hook (gradients on ``.grad`` and those
  the optimizer holds for clipping). Activations are left out: the forward is the same
  for all, and their peak is at the end of forward in both one-pass and two-pass steps
  (the first pass retains the graph, which then holds no more than at that peak);
* on CUDA, also ``torch.cuda.max_memory_allocated`` over the steps.

Part of ``python -m bench`` (section "layerwise"); writes <out>/layerwise-<device>.md.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch

import galore_kernels as gk
from bench.bench_train import state_bytes

try:
    import transformers
except ImportError:  # pragma: no cover
    sys.exit("bench_layerwise needs transformers")

VOCAB, SEQ, BATCH, STEPS = 1024, 64, 4, 6
# --quick: a smoke test of the section, not a measurement.
QUICK = dict(vocab=128, hidden=32, intermediate=64, layers=2, heads=4, seq=16, batch=2, steps=3)
FULL = dict(vocab=VOCAB, hidden=256, intermediate=688, layers=4, heads=8, seq=SEQ, batch=BATCH, steps=STEPS)


def build_model(device, size):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=size["vocab"], hidden_size=size["hidden"], intermediate_size=size["intermediate"],
                                      num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
                                      num_key_value_heads=size["heads"], max_position_embeddings=size["seq"],
                                      tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).to(device)


def galore_groups(model):
    matrices = [p for n, p in model.named_parameters() if p.dim() == 2 and ("attn" in n or "mlp" in n)]
    others = [p for n, p in model.named_parameters() if not (p.dim() == 2 and ("attn" in n or "mlp" in n))]
    return [{"params": matrices, "rank": min(64, min(min(p.shape) for p in matrices) // 2), "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}, {"params": others}]


CONFIGS = {
    "torch AdamW": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
    "GaLore 8-bit layerwise, hold": lambda m: gk.GaLoreAdamW8bit(galore_groups(m), layerwise=True, max_grad_norm=1.0),
    "GaLore 8-bit layerwise, two_pass": lambda m: gk.GaLoreAdamW8bit(galore_groups(m), layerwise=True, max_grad_norm=1.0,
                                                                      clip_strategy="two_pass"),
    "LOMO (clip_grad_norm)": lambda m: gk.LOMO(m, lr=1e-3, clip_grad_norm=1.0),
    "AdaLomo (clip_grad_norm)": lambda m: gk.AdaLomo(m, lr=1e-3, clip_grad_norm=1.0),
}


def held_gradient_bytes(model, optimizer) -> int:
    held = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    for _, p, grad in getattr(optimizer, "_pending", []):
        held += grad.numel() * grad.element_size()
    return held


def run_config(name, device, size):
    model = build_model(device, size)
    optimizer = CONFIGS[name](model)
    peak = [0]
    watch = [p.register_hook(lambda grad: peak.__setitem__(0, max(peak[0], held_gradient_bytes(model, optimizer) + grad.numel() * grad.element_size())) or grad)
             for p in model.parameters()]
    generator = torch.Generator().manual_seed(1)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(size["steps"]):
        ids = torch.randint(0, size["vocab"], (size["batch"], size["seq"]), generator=generator).to(device)
        started = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        if hasattr(optimizer, "fused_backward") and getattr(optimizer, "clip_strategy", "two_pass") == "two_pass":
            optimizer.grad_norm(loss)
            optimizer.fused_backward(loss)
        else:
            loss.backward()
            if not getattr(optimizer, "layerwise", False):
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        peak[0] = max(peak[0], held_gradient_bytes(model, optimizer))
        optimizer.step()
        optimizer.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    for handle in watch:
        handle.remove()
    if hasattr(optimizer, "remove_hooks"):
        optimizer.remove_hooks()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    return dict(name=name, step_ms=1e3 * statistics.median(times[1:]), held_grad_bytes=peak[0], param_bytes=params,
                state_bytes=state_bytes(optimizer),
                largest_grad_bytes=largest,
                cuda_peak=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None)


def format_table(rows, device, size) -> str:
    gpu = rows[0]["cuda_peak"] is not None
    lines = [f"Device: {device}. Model: LLaMA-style, {rows[0]['param_bytes'] / 2**20:.1f} MiB of fp32 parameters; "
             f"largest single gradient {rows[0]['largest_grad_bytes'] / 2**20:.2f} MiB. Batch {size['batch']}×{size['seq']}, "
             f"median of {size['steps'] - 1} steps.",
             "",
             "| optimizer | step ms | parameters MiB | optimizer state MiB | gradients alive at once, peak MiB | "
             "total (accounted) MiB |" + (" max_memory_allocated MiB |" if gpu else ""),
             "|---|---|---|---|---|---|" + ("---|" if gpu else "")]
    mib = 2**20
    for r in rows:
        total = r["param_bytes"] + r["state_bytes"] + r["held_grad_bytes"]
        lines.append(f"| {r['name']} | {r['step_ms']:.1f} | {r['param_bytes'] / mib:.2f} | {r['state_bytes'] / mib:.2f} | "
                     f"{r['held_grad_bytes'] / mib:.2f} | {total / mib:.2f} |" + (f" {r['cuda_peak'] / mib:.1f} |" if gpu else ""))
    return "\n".join(lines)


def run(device: torch.device, out_dir: Path, *, quick: bool = False) -> str:
    """Measure every configuration, write the results file, return the table."""
    size = QUICK if quick else FULL
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = [run_config(name, device, size) for name in CONFIGS]
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    table = format_table(rows, device, size) + (
        f"\n\nLoad average (1 min) {load_before:.1f} before, {load_after:.1f} after, on {os.cpu_count()} CPUs: "
        "step times under load are rough; the memory columns are exact accounting.")
    out = out_dir / f"layerwise-{device.type}{'-smoke' if quick else ''}.md"
    out.write_text("# Layerwise optimizers: step time and memory (python -m bench.bench_layerwise)\n\n"
                   + f"{__doc__.strip()}\n\n" + table + "\n")
    return table


if __name__ == "__main__":
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(run(device, Path(__file__).parent / "results", quick="--quick" in sys.argv))
