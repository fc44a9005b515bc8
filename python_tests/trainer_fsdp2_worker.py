"""One rank of ``test_distributed_trainer.py``: GaLoreTrainer on a tiny LLaMA sharded with FSDP2.

Run under torchrun (2 processes, gloo, CPU): ``python -m torch.distributed.run --nproc_per_node 2
trainer_fsdp2_worker.py OUT_DIR``. The model is sharded by transformers itself
(``from_pretrained(..., distributed_config=DistributedConfig(fsdp_size=2))``): the Trainer then
leaves it unwrapped (no DDP) and defers FSDP2's reduce-scatter to the last micro-batch of each
accumulation window. Trains the same steps with ``layerwise=False`` and ``layerwise=True``, and
with ``layerwise=False`` on the unsharded model (which the Trainer wraps in DDP), and writes
``rank<r>.pt``: losses, parameters before and after (gathered) and the replicated state.
"""

import os
import sys

import torch
import torch.distributed as dist
import transformers
from torch.distributed.tensor import DTensor
from transformers.distributed import DistributedConfig

from galore_kernels.integrations.transformers import GaLoreTrainer
from multiprocess_workers import leave_process_group_and_exit

SEQ, VOCAB, STEPS = 16, 96, 4


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int):
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _full(p: torch.Tensor) -> torch.Tensor:
    return (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()


def train(out_dir: str, initial_dir: str, layerwise: bool, fsdp2: bool = True) -> dict:
    """``fsdp2=False``: the plain model, which the Trainer wraps in DDP."""
    distributed_config = DistributedConfig(fsdp_size=dist.get_world_size()) if fsdp2 else None
    model = transformers.LlamaForCausalLM.from_pretrained(initial_dir, distributed_config=distributed_config)
    initial = {n: _full(p) for n, p in model.named_parameters()}
    args = transformers.TrainingArguments(
        output_dir=os.path.join(out_dir, f"run-{layerwise}-{fsdp2}"), per_device_train_batch_size=2, gradient_accumulation_steps=2,
        max_steps=STEPS, learning_rate=3e-3, optim="galore_adamw" + ("_layerwise" if layerwise else ""),
        optim_args="rank=8, update_proj_gap=2, scale=0.25", optim_target_modules=["attn", "mlp"],
        # No clipping: Trainer's (full gradients) and the layerwise optimizer's (low-rank) norms differ by design.
        max_grad_norm=0.0, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, seed=0, data_seed=0,
        ddp_backend="gloo", dataloader_num_workers=0,
    )
    trainer = GaLoreTrainer(model=model, args=args, train_dataset=RandomTokens(32), galore_options={"backend": "torch"})
    trainer.train()
    optimizer = trainer._galore_optimizer()
    names = {p: n.removeprefix("module.") for n, p in trainer.model.named_parameters()}
    replicated = {
        f"{names[p]}.{key}": value.clone()
        for p, state in optimizer.state.items()
        for key, value in state.items()
        if key in ("proj_right",) or (key.startswith("exp_avg") and "proj_left" in state)
    }
    if layerwise:
        optimizer.remove_hooks()
    return dict(
        losses=[entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        initial=initial,
        final={n: _full(p) for n, p in model.named_parameters()},
        replicated=replicated,
        world_size=args.world_size,
    )


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    initial_dir = os.path.join(out_dir, "initial")
    if rank == 0:
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
        )
        transformers.LlamaForCausalLM(config).save_pretrained(initial_dir)
    dist.barrier()
    results = {
        "step": train(out_dir, initial_dir, layerwise=False),
        "layerwise": train(out_dir, initial_dir, layerwise=True),
        "ddp": train(out_dir, initial_dir, layerwise=False, fsdp2=False),
    }
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    leave_process_group_and_exit()


if __name__ == "__main__":
    main(sys.argv[1])
