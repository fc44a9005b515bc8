"""End to end: a small LLaMA-style causal LM trained from scratch with each optimizer.

How the comparison is kept fair, and what is timed, is ``METHOD`` below (it goes into the results file).
"""

from __future__ import annotations

import copy
import gc
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from . import synchronize

METHOD = """\
Data is real English text that ships with every CPython: the documentation
topics of `pydoc_data.topics` (the text behind `help('assert')` and the
rest), joined in sorted-key order and encoded as UTF-8 bytes (vocabulary 256,
no tokenizer, nothing downloaded). The first 90% of the bytes train, the last
10% are held out. Every optimizer starts from the same initial weights and sees
the same batches in the same order for the same number of steps, under the same
schedule (linear warm-up, then cosine to 10% of the peak lr).

GaLore runs put every attention and MLP `nn.Linear` weight of the decoder
layers in the GaLore group (rank, gap and scale below) and everything else
(embeddings, norms, LM head) in a plain group at the same lr. torch AdamW has
no 0.25 scale on its update, so it gets its own, lower lr (1e-3, the common
AdamW choice at this size) rather than GaLore's.

Optimizer time per step: `optimizer.step()` timed around the call. In
layerwise mode the updates happen inside backward, in the parameters'
post-accumulate-grad hooks, so those hooks are timed instead: the bench
subclasses the optimizer and times its `_on_grad_ready` hook (CUDA events
on GPU), summed over a step.
"""

ACCEPTANCE_TOLERANCE = 0.02  # ours 8-bit layerwise vs galore-torch fp32, relative, final held-out loss
ACCEPTANCE_PAIR = ("ours 8-bit layerwise", "galore-torch fp32")


@dataclass(frozen=True)
class TrainConfig:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    seq: int
    batch: int
    steps: int
    eval_every: int
    eval_windows: int  # held-out windows of seq tokens in the fixed evaluation set
    rank: int
    update_proj_gap: int
    galore_lr: float
    galore_scale: float
    adamw_lr: float
    warmup_steps: int
    seed: int = 0


CPU_CONFIG = TrainConfig(hidden=128, layers=4, heads=4, intermediate=344, seq=128, batch=16, steps=500, eval_every=50,
                         eval_windows=96, rank=32, update_proj_gap=50, galore_lr=3e-3, galore_scale=0.25,
                         adamw_lr=1e-3, warmup_steps=50)
GPU_CONFIG = TrainConfig(hidden=512, layers=8, heads=8, intermediate=1376, seq=256, batch=32, steps=2000,
                         eval_every=100, eval_windows=160, rank=128, update_proj_gap=200, galore_lr=3e-3,
                         galore_scale=0.25, adamw_lr=1e-3, warmup_steps=200)
QUICK_CONFIG = TrainConfig(hidden=32, layers=1, heads=2, intermediate=64, seq=32, batch=4, steps=6, eval_every=3,
                           eval_windows=4, rank=8, update_proj_gap=3, galore_lr=3e-3, galore_scale=0.25,
                           adamw_lr=1e-3, warmup_steps=2)

OPTIMIZERS = ("torch AdamW", "galore-torch fp32", "ours fp32", "ours 8-bit", "ours 8-bit layerwise")
MIN_STEPS = 2  # the fewest a budget can shrink a run to: one update after the first, state-building one


def default_config(device: torch.device, quick: bool = False) -> TrainConfig:
    if quick:
        return QUICK_CONFIG
    return GPU_CONFIG if device.type == "cuda" else CPU_CONFIG


def load_corpus() -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) byte tensors (int64) of the pydoc topics text, split 90/10."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    split = int(0.9 * len(data))
    return data[:split], data[split:]


def build_model(config: TrainConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaConfig(
        vocab_size=256, hidden_size=config.hidden, intermediate_size=config.intermediate,
        num_hidden_layers=config.layers, num_attention_heads=config.heads, num_key_value_heads=config.heads,
        max_position_embeddings=config.seq, tie_word_embeddings=False, attn_implementation="sdpa",
    )
    torch.manual_seed(config.seed)
    return LlamaForCausalLM(llama)


def galore_param_groups(model, config: TrainConfig) -> list[dict]:
    """Attention and MLP Linear weights of the decoder layers in the GaLore group, the rest plain."""
    galore, plain = [], []
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{module_name}":
            galore.append(module.weight)
    galore_ids = {id(p) for p in galore}
    plain = [p for p in model.parameters() if id(p) not in galore_ids]
    return [
        {"params": plain},
        {"params": galore, "rank": config.rank, "update_proj_gap": config.update_proj_gap,
         "scale": config.galore_scale, "proj_type": "std"},
    ]


class _HookTimer:
    """Sums the time spent in a layerwise optimizer's post-accumulate-grad hooks."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0
        self._events = []

    def call(self, hook, param) -> None:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            hook(param)
            end.record()
            self._events.append((start, end))
        else:
            start = time.perf_counter()
            hook(param)
            self.seconds += time.perf_counter() - start

    def take(self) -> float:
        """Seconds since the last take (synchronizes on CUDA)."""
        if self._events:
            torch.cuda.synchronize(self.device)
            self.seconds += sum(start.elapsed_time(end) for start, end in self._events) / 1e3
            self._events = []
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def make_optimizer(name: str, model, config: TrainConfig, device: torch.device):
    """(optimizer, hook timer or None). Same eps and weight decay (0) everywhere."""
    common = dict(eps=1e-8, weight_decay=0.0)
    if name == "torch AdamW":
        fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
        return torch.optim.AdamW(model.parameters(), lr=config.adamw_lr, **common, **fast), None
    groups = galore_param_groups(model, config)
    if name == "galore-torch fp32":
        import galore_torch

        return galore_torch.GaLoreAdamW(groups, lr=config.galore_lr, no_deprecation_warning=True, **common), None
    import galore_kernels

    if name == "ours fp32":
        return galore_kernels.GaLoreAdamW(groups, lr=config.galore_lr, **common), None
    if name == "ours 8-bit":
        return galore_kernels.GaLoreAdamW8bit(groups, lr=config.galore_lr, **common), None
    if name == "ours 8-bit layerwise":
        timer = _HookTimer(device)

        class TimedLayerwise(galore_kernels.GaLoreAdamW8bit):
            # The hooks are registered as self._on_grad_ready while the groups are added, so overriding it
            # here times every layerwise update.
            def _on_grad_ready(self, param):
                timer.call(super()._on_grad_ready, param)

        return TimedLayerwise(groups, lr=config.galore_lr, layerwise=True, **common), timer
    raise ValueError(f"unknown optimizer {name!r}")


def lr_lambda(config: TrainConfig):
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def state_bytes(optimizer) -> int:
    """Bytes of every tensor reachable from the optimizer's per-parameter state (projector objects included)."""
    seen: set[int] = set()

    def walk(value) -> int:
        if torch.is_tensor(value):
            if id(value) in seen:
                return 0
            seen.add(id(value))
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(walk(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(walk(v) for v in value)
        if hasattr(value, "__dict__") and not isinstance(value, type):
            return sum(walk(v) for v in vars(value).values())
        return 0

    return sum(walk(state) for state in optimizer.state.values())


def _loss(model, windows: torch.Tensor, device: torch.device) -> torch.Tensor:
    inputs, targets = windows[:, :-1], windows[:, 1:]
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(input_ids=inputs).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def evaluate(model, held_out: torch.Tensor, device: torch.device) -> float:
    """Mean next-byte loss over the fixed held-out windows."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(held_out), 32):
        batch = held_out[start:start + 32]
        total += float(_loss(model, batch, device)) * len(batch)
        count += len(batch)
    model.train()
    return total / count


def train_one(name: str, initial_model, batches, held_out, config: TrainConfig, device: torch.device, bar,
              make=make_optimizer) -> dict:
    """Trains a fresh copy of ``initial_model`` (a layerwise optimizer's hooks stay with its copy).

    ``make(name, model, config, device)`` returns ``(optimizer, hook timer or None)``.

    ``bar`` is the section's progress bar (a step of every optimizer is one tick), so its
    remaining-time estimate covers the whole training section, not one optimizer.
    """
    bar.set_postfix_str(name)
    gc.collect()  # the previous run's model and optimizer, before this one's memory is measured
    model = copy.deepcopy(initial_model).to(device)
    optimizer, hook_timer = make(name, model, config, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    train_losses, held_out_curve, optimizer_seconds, step_seconds = [], [], [], []
    for step in range(config.steps):
        windows = batches[step].to(device, non_blocking=True)
        synchronize(device)
        step_start = time.perf_counter()
        loss = _loss(model, windows, device)
        loss.backward()
        if hook_timer is None:
            synchronize(device)
            opt_start = time.perf_counter()
            optimizer.step()
            synchronize(device)
            optimizer_seconds.append(time.perf_counter() - opt_start)
        else:
            optimizer.step()  # a no-op in layerwise mode: the hooks updated during backward
            optimizer_seconds.append(hook_timer.take())
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        train_losses.append(loss.item())  # synchronizes
        step_seconds.append(time.perf_counter() - step_start)
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            held_out_curve.append((step + 1, evaluate(model, held_out, device)))
        bar.update(1)
    peak_memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    tokens = config.batch * config.seq * config.steps
    # The first step builds state and refreshes every projector: steady-state medians skip it.
    return dict(
        optimizer=name,
        lr=config.adamw_lr if name == "torch AdamW" else config.galore_lr,
        final_held_out=held_out_curve[-1][1],
        final_train=statistics.fmean(train_losses[-config.eval_every:]),
        tokens_per_s=tokens / sum(step_seconds),
        optimizer_ms=1e3 * statistics.median(optimizer_seconds[1:] or optimizer_seconds),
        optimizer_ms_mean=1e3 * statistics.fmean(optimizer_seconds),
        state_bytes=state_bytes(optimizer),
        peak_memory=peak_memory,
        train_losses=train_losses,
        held_out_curve=held_out_curve,
        wall_s=sum(step_seconds),
    )


def scaled_config(config: TrainConfig, steps: int) -> TrainConfig:
    """``config`` shortened to ``steps``, with the gap, evaluation interval and warm-up scaled alike,
    so the run keeps as many refreshes and evaluations and the same schedule shape."""
    ratio = steps / config.steps
    return replace(
        config, steps=steps, eval_every=max(1, round(config.eval_every * ratio)),
        warmup_steps=max(1, round(config.warmup_steps * ratio)), update_proj_gap=max(1, round(config.update_proj_gap * ratio)),
    )


def steps_within_budget(initial_model, batches, held_out, config: TrainConfig, device: torch.device, budget_s: float) -> int:
    """How many steps (at most ``config.steps``) let every optimizer's run fit in ``budget_s`` seconds.

    Measured here, on this machine's load: two steps of each optimizer on a throwaway copy.
    The first builds the state and refreshes every projector, so it costs the second's time
    plus one refresh; ``scaled_config`` keeps the number of refreshes and of evaluations, so
    only the plain steps scale: steps = (budget - refreshes - evaluations) / sum of step times.
    """
    started = time.perf_counter()
    step_s, refresh_s = [], []
    for name in OPTIMIZERS:
        model = copy.deepcopy(initial_model).to(device)
        optimizer, _ = make_optimizer(name, model, config, device)
        times = []
        for step in range(2):
            synchronize(device)
            start = time.perf_counter()
            _loss(model, batches[step].to(device), device).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            synchronize(device)
            times.append(time.perf_counter() - start)
        step_s.append(times[1])
        refresh_s.append(max(times[0] - times[1], 0.0))
        if hasattr(optimizer, "remove_hooks"):
            optimizer.remove_hooks()
    start = time.perf_counter()
    evaluate(model, held_out, device)
    eval_s = time.perf_counter() - start
    refreshes = -(-config.steps // config.update_proj_gap)
    evaluations = -(-config.steps // config.eval_every)
    fixed = len(OPTIMIZERS) * evaluations * eval_s + refreshes * sum(refresh_s) + (time.perf_counter() - started)
    steps = int((budget_s - fixed) / sum(step_s)) if budget_s > fixed else 0
    if steps < MIN_STEPS:
        print(f"[bench train] a {budget_s:.0f} s budget cannot fit the training section; running {MIN_STEPS} steps",
              file=sys.stderr)
    return max(MIN_STEPS, min(config.steps, steps))


def run(device: torch.device, *, quick: bool = False, config: TrainConfig | None = None, progress: bool = True,
        budget_s: float | None = None) -> dict:
    """Trains with every optimizer; returns {'config', 'results' (one dict each), 'acceptance'}.

    With ``budget_s`` the run is shortened (``scaled_config``) to fit that many seconds,
    and the result records the config it was scaled from.
    """
    from tqdm.auto import tqdm

    config = config or default_config(device, quick)
    train, held = load_corpus()
    window = config.seq + 1
    held_out = held[: (len(held) // window) * window].view(-1, window)[: config.eval_windows].to(device)
    generator = torch.Generator().manual_seed(config.seed)
    starts = torch.randint(0, len(train) - window, (config.steps, config.batch), generator=generator)
    batches = train[starts.unsqueeze(-1) + torch.arange(window)]  # (steps, batch, seq + 1), same for everyone
    initial_model = build_model(config)
    scaled_from = None
    if budget_s is not None:
        steps = steps_within_budget(initial_model, batches, held_out, config, device, budget_s)
        if steps < config.steps:
            scaled_from, config = config, scaled_config(config, steps)
            print(f"[bench train] {steps} steps instead of {scaled_from.steps} to fit the budget", file=sys.stderr)
    with tqdm(total=len(OPTIMIZERS) * config.steps, desc="train", disable=not progress, file=sys.stderr) as bar:
        results = [train_one(name, initial_model, batches, held_out, config, device, bar) for name in OPTIMIZERS]
    return dict(config=asdict(config), results=results, acceptance=acceptance(results),
                corpus_bytes=(len(train), len(held)), held_out_tokens=held_out.shape[0] * config.seq,
                scaled_from=None if scaled_from is None else asdict(scaled_from))


def acceptance(results: list[dict]) -> dict:
    by_name = {r["optimizer"]: r["final_held_out"] for r in results}
    ours, reference = (by_name[name] for name in ACCEPTANCE_PAIR)
    relative = abs(ours - reference) / reference
    return dict(ours=ours, reference=reference, relative=relative, tolerance=ACCEPTANCE_TOLERANCE,
                passed=relative <= ACCEPTANCE_TOLERANCE)


def format_acceptance(acc: dict) -> str:
    verdict = "PASS" if acc["passed"] else "FAIL"
    return (f"{verdict}: {ACCEPTANCE_PAIR[0]} final held-out loss {acc['ours']:.4f} vs {ACCEPTANCE_PAIR[1]} "
            f"{acc['reference']:.4f}: {100 * acc['relative']:.2f}% apart (bound {100 * acc['tolerance']:.0f}%)")


def format_table(run_result: dict) -> str:
    gpu = any(r["peak_memory"] is not None for r in run_result["results"])
    memory_header = " peak memory MiB |" if gpu else ""
    lines = [
        "| optimizer | lr | held-out loss | train loss (last eval window) | tokens/s | optimizer ms/step "
        "(median) | optimizer state MiB |" + memory_header,
        "|---|---|---|---|---|---|---|" + ("---|" if gpu else ""),
    ]
    for r in run_result["results"]:
        memory = f" {r['peak_memory'] / 2**20:.1f} |" if gpu else ""
        lines.append(
            f"| {r['optimizer']} | {r['lr']:g} | {r['final_held_out']:.4f} | {r['final_train']:.4f} | "
            f"{r['tokens_per_s']:.0f} | {r['optimizer_ms']:.2f} | {r['state_bytes'] / 2**20:.3f} |" + memory
        )
    return "\n".join(lines)
