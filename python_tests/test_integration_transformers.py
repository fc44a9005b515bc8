"""Trainer integration: hyperparameters honoured, accumulation 2, checkpoint and bit-exact resume (CPU)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from galore_kernels import GaLoreAdamW8bit  # noqa: E402
from galore_kernels.integrations.transformers import (  # noqa: E402
    create_galore_optimizer_and_scheduler,
    galore_target_parameters,
)

SEQ, VOCAB, BATCH = 16, 96, 2


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int):
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
    )
    return transformers.LlamaForCausalLM(config)


def training_args(out_dir, **overrides):
    base = dict(
        output_dir=str(out_dir), per_device_train_batch_size=BATCH, gradient_accumulation_steps=2,
        max_steps=6, save_steps=3, save_strategy="steps", learning_rate=3e-3, weight_decay=0.05,
        adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-7, lr_scheduler_type="linear", warmup_steps=2,
        optim_target_modules=["attn", "mlp"], logging_steps=1, report_to=[], use_cpu=True, seed=0,
        data_seed=0, dataloader_num_workers=0,
    )
    base.update(overrides)
    return transformers.TrainingArguments(**base)


def train(out_dir, layerwise, resume=None):
    model = tiny_llama()
    args = training_args(out_dir)
    optimizer, scheduler = create_galore_optimizer_and_scheduler(
        model, args, args.max_steps, rank=8, update_proj_gap=2, layerwise=layerwise, backend="torch",
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=RandomTokens(64), optimizers=(optimizer, scheduler),
    )
    trainer.train(resume_from_checkpoint=resume)
    return model, optimizer


def test_targets_follow_optim_target_modules():
    model = tiny_llama()
    regex = galore_target_parameters(model, r".*\.mlp\.(up|down)_proj")
    assert regex and all(".mlp.up_proj" in n or ".mlp.down_proj" in n for n in regex)
    all_linear = galore_target_parameters(model, "all-linear")
    linear_count = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert len(all_linear) == linear_count
    with pytest.raises(ValueError, match="no nn.Linear"):
        galore_target_parameters(model, ["does_not_exist"])


def test_hyperparameters_are_honoured(tmp_path):
    model = tiny_llama()
    args = training_args(tmp_path)
    optimizer, scheduler = create_galore_optimizer_and_scheduler(model, args, 6, layerwise=True)
    optimizer.step()  # as Trainer does before stepping the scheduler
    assert isinstance(optimizer, GaLoreAdamW8bit)
    assert optimizer.accumulation_steps == 2 and optimizer.max_grad_norm == args.max_grad_norm
    galore_group = next(g for g in optimizer.param_groups if "rank" in g)
    assert galore_group["betas"] == (0.8, 0.95) and galore_group["eps"] == 1e-7
    assert galore_group["weight_decay"] == 0.05
    assert any(g["weight_decay"] == 0.0 and all(p.dim() == 1 for p in g["params"]) for g in optimizer.param_groups)
    # Linear warm-up over 2 steps: the first update uses lr 0, then lr/2.
    assert galore_group["lr"] == 0.0
    scheduler.step()
    assert galore_group["lr"] == pytest.approx(1.5e-3)


def test_layerwise_refuses_fp16_loss_scaling(tmp_path):
    args = training_args(tmp_path)
    args.fp16 = True  # set after construction: TrainingArguments refuses fp16 on a CPU-only machine
    with pytest.raises(ValueError, match="fp16"):
        create_galore_optimizer_and_scheduler(tiny_llama(), args, 6, layerwise=True)


@pytest.mark.parametrize("layerwise", [False, True], ids=["standard", "layerwise"])
def test_checkpoint_resume_is_bit_exact(tmp_path, layerwise):
    reference_model, _ = train(tmp_path / "full", layerwise)
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert (checkpoint / "optimizer.pt").exists()
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert any("exp_avg_codes" in s or "exp_avg" in s for s in saved["state"].values())
    resumed_model, resumed_optimizer = train(tmp_path / "resumed", layerwise, resume=str(checkpoint))
    assert all(s["step"] == 6 for s in resumed_optimizer.state.values())
    for (name, a), b in zip(reference_model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(a, b), name
