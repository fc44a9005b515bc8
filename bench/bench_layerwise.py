"""Layerwise optimizers on a small LLaMA-style model: step time, and gradient bytes held at once.

``python -m bench.bench_layerwise`` (CPU or CUDA). For every configuration: the median
wall time of a training step (forward and every backward pass), and the peak of the
full-size gradient bytes alive at once, taken in every gradient hook: gradients on
``.grad`` plus those the optimizer holds for clipping. On CUDA it also reports
``torch.cuda.max_memory_allocated`` for the step. Writes bench/results/layerwise-<device>.md.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

import galore_kernels as gk

try:
    import transformers
except ImportError:  # pragma: no cover
    sys.exit("bench_layerwise needs transformers")

VOCAB, SEQ, BATCH, STEPS = 1024, 64, 4, 6


def build_model(device):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=SEQ,
                                      tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).to(device)


def galore_groups(model):
    matrices = [p for n, p in model.named_parameters() if p.dim() == 2 and ("attn" in n or "mlp" in n)]
    others = [p for n, p in model.named_parameters() if not (p.dim() == 2 and ("attn" in n or "mlp" in n))]
    return [{"params": matrices, "rank": 64, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}, {"params": others}]


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


def run_config(name, device):
    model = build_model(device)
    optimizer = CONFIGS[name](model)
    peak = [0]
    watch = [p.register_hook(lambda grad: peak.__setitem__(0, max(peak[0], held_gradient_bytes(model, optimizer) + grad.numel() * grad.element_size())) or grad)
             for p in model.parameters()]
    generator = torch.Generator().manual_seed(1)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(STEPS):
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator).to(device)
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
                largest_grad_bytes=largest,
                cuda_peak=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None)


def format_table(rows, device) -> str:
    gpu = rows[0]["cuda_peak"] is not None
    lines = [f"Device: {device}. Model: LLaMA-style, {rows[0]['param_bytes'] / 2**20:.1f} MiB of fp32 parameters; "
             f"largest single gradient {rows[0]['largest_grad_bytes'] / 2**20:.2f} MiB. Batch {BATCH}×{SEQ}, median of {STEPS - 1} steps.",
             "",
             "| optimizer | step ms | peak full-size gradient MiB held at once |" + (" max_memory_allocated MiB |" if gpu else ""),
             "|---|---|---|" + ("---|" if gpu else "")]
    for r in rows:
        lines.append(f"| {r['name']} | {r['step_ms']:.1f} | {r['held_grad_bytes'] / 2**20:.2f} |"
                     + (f" {r['cuda_peak'] / 2**20:.1f} |" if gpu else ""))
    return "\n".join(lines)


def main():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = [run_config(name, device) for name in CONFIGS]
    table = format_table(rows, device)
    out = Path(__file__).parent / "results" / f"layerwise-{device.type}.md"
    out.write_text("# Layerwise optimizers: step time and gradient memory\n\n" + table + "\n")
    print(table)


if __name__ == "__main__":
    main()
