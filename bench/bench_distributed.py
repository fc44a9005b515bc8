"""GaLore across 2 processes: step time, bytes sent per step and peak memory per rank.

``python -m bench.bench_distributed`` (2 CPU processes, gloo, 127.0.0.1; on a machine with
2 GPUs, nccl). Configurations, all GaLoreAdamW8bit on the same MLP stack and global batch:
single process, DDP, DDP with ``distributed.low_rank_allreduce_hook``, FSDP2 (``fully_shard``)
with ``step()`` and with ``layerwise=True``.

Bytes are what each rank sends per step with ring collectives, averaged over the timed
steps: an all-reduce of P bytes sends 2(N-1)/N·P, an all-gather or reduce-scatter of a
P-byte result (N-1)/N·P.
* DDP: an all-reduce of the gradients (the parameter bytes);
* the hook: its all-reduces, counted by the hook (``LowRankAllreduceState.bytes_sent``);
* FSDP2: its all-gathers of the parameters (forward, and again in backward with the
  default ``reshard_after_forward=True``) and reduce-scatter of the gradients, from the
  parameter bytes, plus the GaLore all-reduces, counted (``optimizer.sharded_bytes_sent``).
Peak memory: the process's peak resident set on the CPU (includes the interpreter and
torch, ~the same for all); ``torch.cuda.max_memory_allocated`` on a GPU.

Part of ``python -m bench`` (section "distributed"); writes <out>/distributed-<device>.md.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

WORLD = 2
FULL = dict(hidden=512, intermediate=1376, layers=2, batch=16, rank=64, gap=50, steps=8)
QUICK = dict(hidden=32, intermediate=64, layers=1, batch=4, rank=4, gap=3, steps=3)
CONFIGS = ("single", "ddp", "ddp+low-rank hook", "fsdp2", "fsdp2 layerwise")


def _model(size):
    torch.manual_seed(0)
    layers = []
    for _ in range(size["layers"]):
        layers += [torch.nn.Linear(size["hidden"], size["intermediate"], bias=False), torch.nn.GELU(),
                   torch.nn.Linear(size["intermediate"], size["hidden"], bias=False)]
    return torch.nn.Sequential(*layers)


def _optimizer(model, size, layerwise=False):
    import galore_kernels as gk

    groups = [{"params": list(model.parameters()), "rank": size["rank"], "update_proj_gap": size["gap"],
               "scale": 0.25, "proj_type": "std"}]
    return gk.GaLoreAdamW8bit(groups, lr=1e-3, layerwise=layerwise)


def _measure(config, rank, size, device):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from galore_kernels import distributed as gk_distributed

    model = _model(size).to(device)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    batch = size["batch"] if config == "single" else size["batch"] // WORLD
    hook_state = None
    if config.startswith("ddp"):
        wrapped = DistributedDataParallel(model)
        optimizer = _optimizer(model, size)
        if config == "ddp+low-rank hook":
            hook_state, hook = gk_distributed.low_rank_allreduce_hook(optimizer)
            wrapped.register_comm_hook(hook_state, hook)
    elif config.startswith("fsdp2"):
        mesh = init_device_mesh(device.type, (WORLD,))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        wrapped = model
        optimizer = _optimizer(model, size, layerwise=config.endswith("layerwise"))
    else:
        wrapped, optimizer = model, _optimizer(model, size)
    generator = torch.Generator().manual_seed(rank)
    times, sent = [], []
    all_reduce_factor = 2 * (WORLD - 1) / WORLD
    # One refresh (step 0) untimed; the timed steps are steady ones, as most steps are.
    for step in range(size["steps"] + 1):
        inputs = torch.randn(batch, size["hidden"], generator=generator).to(device)
        if hook_state is not None:
            hook_state.reset_counters()
        optimizer.sharded_bytes_sent = 0
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        optimizer.zero_grad()
        wrapped(inputs).square().mean().backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step == 0:
            continue
        times.append(time.perf_counter() - started)
        if config == "single":
            sent.append(0)
        elif config == "ddp":
            sent.append(all_reduce_factor * param_bytes)
        elif hook_state is not None:
            sent.append(all_reduce_factor * hook_state.bytes_sent)
        else:
            sent.append(3 * (WORLD - 1) / WORLD * param_bytes + all_reduce_factor * optimizer.sharded_bytes_sent)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(step_ms=1e3 * statistics.median(times), bytes_per_step=statistics.mean(sent), peak_bytes=peak)


def _worker(rank, port, size, out_file):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.device_count() >= WORLD
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // WORLD))
    rows = {}
    for config in CONFIGS:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if config == "single":
            rows[config] = _measure(config, rank, size, device) if rank == 0 else None
        else:
            rows[config] = _measure(config, rank, size, device)
        dist.barrier()
    if rank == 0:
        from bench import device_name

        torch.save(dict(rows=rows, device=f"{device_name(device)} ({'nccl' if cuda else 'gloo'})"), out_file)
    dist.barrier()
    dist.destroy_process_group()
    # No interpreter finalization: after DDP and FSDP2 the gloo process group outlives
    # destroy_process_group, and its destructor there can abort the process (exit -6,
    # "terminate called without an active exception"; pytorch#179291), as it once did in CI.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def format_table(rows, device, size) -> str:
    lines = [
        f"2 processes on {device}; GaLoreAdamW8bit, {size['layers']} MLP block(s) {size['hidden']}→{size['intermediate']}→"
        f"{size['hidden']}, rank {size['rank']}, global batch {size['batch']}; steady steps (no refresh).",
        "Peak memory on the CPU is the process's peak RSS (interpreter and torch included); "
        "it is rank 0's, measured cumulatively, so later rows cannot be lower than earlier ones.",
        "",
        "| configuration | step (ms) | bytes sent per rank per step | vs DDP | peak memory rank 0 (MiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    ddp_bytes = rows["ddp"]["bytes_per_step"]
    for config in CONFIGS:
        row = rows[config]
        lines.append(f"| {config} | {row['step_ms']:.1f} | {row['bytes_per_step']:,.0f} | "
                     f"{row['bytes_per_step'] / ddp_bytes:.3f} | {row['peak_bytes'] / 2**20:.0f} |")
    return "\n".join(lines)


def run(device: torch.device, out_dir: Path, *, quick: bool = False) -> str:
    """Spawn the 2 processes, write <out>/distributed-<device>[-smoke].md, return the table."""
    size = QUICK if quick else FULL
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as scratch:
        out_file = os.path.join(scratch, "rows.pt")
        workers = [context.Process(target=_worker, args=(rank, port, size, out_file)) for rank in range(WORLD)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(600)
        for worker in workers:
            if worker.is_alive():
                worker.kill()
        if any(worker.exitcode != 0 for worker in workers):
            raise RuntimeError(f"bench_distributed workers failed: exit codes {[w.exitcode for w in workers]}")
        result = torch.load(out_file, weights_only=True)
    table = format_table(result["rows"], result["device"], size)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"distributed-{device.type}{'-smoke' if quick else ''}.md"
    path.write_text(f"# GaLore across processes\n\n`python -m bench.bench_distributed`\n\n{table}\n")
    return table


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    print(run(torch.device("cuda" if torch.cuda.is_available() else "cpu"), args.out, quick=args.quick))
