"""Trainer integration: hyperparameters honoured, accumulation 2, checkpoint and bit-exact resume (CPU)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import galore_kernels as gk  # noqa: E402
from galore_kernels import GaLoreAdamW8bit  # noqa: E402
from galore_kernels.integrations.transformers import (  # noqa: E402
    GaLoreTrainer,
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


def test_layerwise_refuses_fp16_loss_scaling_unless_two_pass(tmp_path):
    args = training_args(tmp_path, gradient_accumulation_steps=1)
    args.fp16 = True  # set after construction: TrainingArguments refuses fp16 on a CPU-only machine
    with pytest.raises(ValueError, match="fp16 only with clip_strategy='two_pass'"):
        create_galore_optimizer_and_scheduler(tiny_llama(), args, 6, layerwise=True)
    optimizer, _ = create_galore_optimizer_and_scheduler(tiny_llama(), args, 6, layerwise=True, clip_strategy="two_pass")
    assert optimizer.clip_strategy == "two_pass" and optimizer.loss_scaling
    optimizer.remove_hooks()


def test_two_pass_refuses_gradient_accumulation_with_the_reason(tmp_path):
    args = training_args(tmp_path)  # gradient_accumulation_steps=2
    for fp16 in (False, True):
        args.fp16 = fp16
        with pytest.raises(ValueError, match=r"accumulation_steps=1 .*a norm of a sum is not the sum of norms"):
            create_galore_optimizer_and_scheduler(tiny_llama(), args, 6, layerwise=True, clip_strategy="two_pass")
    with pytest.raises(ValueError, match=r"accumulation_steps=1 .*clip_strategy='hold' holds them"):
        gk.GaLoreAdamW(tiny_llama().parameters(), layerwise=True, clip_strategy="two_pass", accumulation_steps=2)


def test_trainer_runs_fp16_layerwise_two_pass(tmp_path):
    """fp16 through GaLoreTrainer: the fp16 flag is accepted with two_pass, and the optimizer's loss scaler
    skips overflowing steps exactly. On a CPU, accelerate runs no fp16 autocast (and TrainingArguments
    refuses fp16 at construction), so the model itself is fp16: its gradients are fp16, as under autocast."""
    model = tiny_llama().half()
    initial = [p.detach().clone() for p in model.parameters()]
    args = training_args(tmp_path, optim="galore_adamw_layerwise", gradient_accumulation_steps=1, max_steps=8,
                         save_steps=100, max_grad_norm=1.0, warmup_steps=0)
    args.fp16 = True  # after construction, as above
    # 2^20 overflows fp16 gradients of this model: the first steps must be skipped while the scale halves.
    options = {"backend": "torch", "rank": 8, "clip_strategy": "two_pass", "loss_scale_args": {"init_scale": 2**20}}
    trainer = GaLoreTrainer(model=model, args=args, train_dataset=RandomTokens(32), galore_options=options)
    optimizer = trainer.create_optimizer()
    assert optimizer.loss_scaling and optimizer.clip_strategy == "two_pass"
    steps = []
    fused_backward = optimizer.fused_backward

    def observed(loss, lr=None):
        before, skipped = [p.detach().clone() for p in model.parameters()], optimizer._skip_step
        fused_backward(loss, lr)
        steps.append((skipped, all(torch.equal(a, p) for a, p in zip(before, model.parameters()))))

    optimizer.fused_backward = observed
    trainer.train()
    assert len(steps) == 8
    assert all(unchanged == skipped for skipped, unchanged in steps), steps  # skipped exactly, and only then
    skips = sum(skipped for skipped, _ in steps)
    assert 0 < skips < 8 and optimizer.loss_scaler.skipped_steps == skips
    assert optimizer.loss_scaler.loss_scale == 2.0**20 / 2**skips
    assert all(p.dtype == torch.float16 and torch.isfinite(p).all() for p in model.parameters())
    assert all(not torch.equal(a, p) for a, p in zip(initial, model.parameters()) if a.dim() == 2)
    optimizer.remove_hooks()


@pytest.mark.parametrize("optim", ["lomo", "adalomo"])
def test_trainer_runs_lomo_with_two_backward_passes(tmp_path, optim):
    model = tiny_llama()
    initial = [p.detach().clone() for p in model.parameters()]
    args = training_args(tmp_path, optim=optim, gradient_accumulation_steps=1, max_steps=3, save_steps=100,
                         optim_target_modules=None, max_grad_norm=1.0, warmup_steps=0)
    trainer = GaLoreTrainer(model=model, args=args, train_dataset=RandomTokens(32), galore_options={"backend": "torch"})
    passes = []
    trainer.create_optimizer()
    original = trainer.optimizer.grad_norm
    trainer.optimizer.grad_norm = lambda loss: (passes.append(1), original(loss))[1]
    trainer.train()
    optimizer = trainer._galore_optimizer()  # accelerate wraps it
    assert isinstance(optimizer, (gk.LOMO, gk.AdaLomo)) and len(passes) == 3
    assert optimizer.clip_grad_norm == 1.0 and optimizer.param_groups[0]["weight_decay"] == 0.05
    assert all(not torch.equal(a, b) for a, b in zip(initial, model.parameters()) if a.dim() == 2)
    assert any("grad_norm" in entry and entry["grad_norm"] > 0 for entry in trainer.state.log_history)
    optimizer.remove_hooks()


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


# ------------------------------------------------ parity with transformers' GaLore options


def galore_group_of(optimizer, name):
    return next(g for g in optimizer.param_groups if "rank" in g and name in g.get("param_names", []))


def test_optim_args_are_parsed_as_transformers_does(tmp_path):
    args = training_args(tmp_path, optim_args="rank=4, update_proj_gap=100, scale=0.10, proj_type=reverse_std")
    optimizer, _ = create_galore_optimizer_and_scheduler(tiny_llama(), args, 6)
    (group,) = [g for g in optimizer.param_groups if "rank" in g]
    assert (group["rank"], group["update_proj_gap"], group["scale"], group["proj_type"]) == (4, 100, 0.1, "reverse_std")
    # An explicit argument wins over optim_args.
    optimizer, _ = create_galore_optimizer_and_scheduler(tiny_llama(), args, 6, rank=2)
    assert [g["rank"] for g in optimizer.param_groups if "rank" in g] == [2]


@pytest.mark.parametrize("optim_args, match", [
    ("rank=4, lr=3, foo=1", r"\['foo', 'lr'\]"),
    ("rank=4, update_proj_gap", "key=value"),
    ("rank=four", "optim_args"),
])
def test_bad_optim_args_are_refused_by_name(tmp_path, optim_args, match):
    args = training_args(tmp_path, optim_args=optim_args)
    with pytest.raises(ValueError, match=match):
        create_galore_optimizer_and_scheduler(tiny_llama(), args, 6)


@pytest.mark.parametrize("name, cls, layerwise", [
    ("galore_adamw", gk.GaLoreAdamW, False),
    ("galore_adamw_8bit", gk.GaLoreAdamW8bit, False),
    ("galore_adamw_layerwise", gk.GaLoreAdamW, True),
    ("galore_adamw_8bit_layerwise", gk.GaLoreAdamW8bit, True),
])
def test_transformers_optim_names_select_class_and_layerwise(tmp_path, name, cls, layerwise):
    args = training_args(tmp_path, optim=name)
    optimizer, _ = create_galore_optimizer_and_scheduler(tiny_llama(), args, 6)
    assert type(optimizer) is cls and optimizer.layerwise is layerwise
    optimizer.remove_hooks()
    optimizer, _ = create_galore_optimizer_and_scheduler(tiny_llama(), training_args(tmp_path), 6, optim=name)
    assert type(optimizer) is cls and optimizer.layerwise is layerwise


@pytest.mark.parametrize("name, layerwise", [("galore_adafactor", False), ("galore_adafactor_layerwise", True)])
def test_galore_adafactor_is_built_as_transformers_builds_it(tmp_path, name, layerwise):
    """transformers' galore_adafactor: GaLoreAdafactor with lr = learning_rate, relative_step and
    scale_parameter off; it used to be refused although the class exists. Weight decay is honoured
    (not on 1-D parameters), the Adam-only fields are not passed, and the Trainer trains with it."""
    model = tiny_llama()
    args = training_args(tmp_path, optim=name, optim_args="rank=8, update_proj_gap=2", max_steps=2)
    optimizer, scheduler = create_galore_optimizer_and_scheduler(model, args, backend="torch")
    assert type(optimizer) is gk.GaLoreAdafactor and optimizer.layerwise is layerwise
    galore_group = next(g for g in optimizer.param_groups if "rank" in g)
    assert galore_group["rank"] == 8 and galore_group["weight_decay"] == 0.05
    assert not galore_group["relative_step"] and not galore_group["scale_parameter"]
    assert optimizer.defaults["lr"] == args.learning_rate
    if layerwise:
        assert optimizer.accumulation_steps == 2 and optimizer.max_grad_norm == args.max_grad_norm
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = transformers.Trainer(model=model, args=args, train_dataset=RandomTokens(16),
                                   optimizers=(optimizer, scheduler))
    trainer.train()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())
    if layerwise:
        optimizer.remove_hooks()


def test_unavailable_or_contradictory_optim_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not available in galore-kernels"):
        create_galore_optimizer_and_scheduler(tiny_llama(), training_args(tmp_path), 6, optim="apollo_adamw")
    # LOMO and AdaLomo update in backward by construction: transformers has no "_layerwise" name for them.
    with pytest.raises(ValueError, match="not available in galore-kernels"):
        create_galore_optimizer_and_scheduler(tiny_llama(), training_args(tmp_path, gradient_accumulation_steps=1), 6,
                                              optim="adalomo_layerwise")
    with pytest.raises(ValueError, match="contradicts"):
        create_galore_optimizer_and_scheduler(
            tiny_llama(), training_args(tmp_path), 6, optim="galore_adamw_layerwise", layerwise=False
        )


def test_rank_per_module_pattern(tmp_path):
    args = training_args(tmp_path, optim_args="rank=6")
    optimizer, _ = create_galore_optimizer_and_scheduler(
        tiny_llama(), args, 6, rank={r"mlp\.(up|gate)_proj": 4, r"self_attn\.q_proj": 2}
    )
    assert galore_group_of(optimizer, "model.layers.0.mlp.up_proj.weight")["rank"] == 4
    assert galore_group_of(optimizer, "model.layers.1.mlp.gate_proj.weight")["rank"] == 4
    assert galore_group_of(optimizer, "model.layers.0.self_attn.q_proj.weight")["rank"] == 2
    assert galore_group_of(optimizer, "model.layers.0.mlp.down_proj.weight")["rank"] == 6  # no pattern: optim_args
    assert sorted(g["rank"] for g in optimizer.param_groups if "rank" in g) == [2, 4, 6]


def test_num_training_steps_is_required_without_max_steps(tmp_path):
    args = training_args(tmp_path, max_steps=-1, num_train_epochs=1)
    with pytest.raises(ValueError, match="GaLoreTrainer"):
        create_galore_optimizer_and_scheduler(tiny_llama(), args)


@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0], ids=["no-clip", "clip"])
def test_galore_trainer_alone_builds_everything_and_logs_the_layerwise_grad_norm(tmp_path, max_grad_norm):
    """Trainer(args) with optim="galore_adamw_layerwise": no max_steps, so num_training_steps comes from
    the Trainer (16 samples / batch 2 / accumulation 2 = 4 steps, and linear decay ends at lr 0)."""
    args = training_args(
        tmp_path, optim="galore_adamw_layerwise", optim_args="rank=8, update_proj_gap=2", max_steps=-1,
        num_train_epochs=1, save_strategy="no", max_grad_norm=max_grad_norm, warmup_steps=0,
    )
    trainer = GaLoreTrainer(
        model=tiny_llama(), args=args, train_dataset=RandomTokens(16), galore_options={"backend": "torch"}
    )
    trainer.train()
    optimizer = trainer._galore_optimizer()
    assert isinstance(optimizer, gk.GaLoreAdamW) and optimizer.layerwise
    assert all(g["rank"] == 8 for g in optimizer.param_groups if "rank" in g)
    assert all(s["step"] == 4 for s in optimizer.state.values())
    assert optimizer.param_groups[0]["lr"] == 0.0
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 4
    assert all(0 < entry["grad_norm"] < float("inf") for entry in logs)  # Trainer alone logs 0 here
    assert logs[-1]["grad_norm"] == pytest.approx(optimizer.last_grad_norm.item())
    assert sum(entry["galore_refresh_seconds"] for entry in logs) == pytest.approx(optimizer.refresh_seconds)
    assert optimizer.refresh_count == 2 * len([g for g in optimizer.param_groups if "rank" in g][0]["params"])


def test_multi_process_layerwise_needs_fsdp2_and_accelerate_fsdp_is_refused(tmp_path, monkeypatch):
    """Layerwise in a multi-process run on plain (DDP) parameters is refused, naming the FSDP2 route;
    accelerate's FSDP (fsdp=...) is refused in any run. The 2-process FSDP2 runs themselves are in
    test_distributed_trainer.py."""
    args = training_args(tmp_path)
    with monkeypatch.context() as patched:
        patched.setattr(type(args), "world_size", property(lambda self: 2))
        with pytest.raises(ValueError, match="DistributedConfig"):
            create_galore_optimizer_and_scheduler(tiny_llama(), args, 6, layerwise=True)
        optimizer, _ = create_galore_optimizer_and_scheduler(tiny_llama(), args, 6, layerwise=False)  # DDP: fine
        assert not optimizer.layerwise
    args.fsdp = True  # set after construction: TrainingArguments checks FSDP against the run
    with pytest.raises(ValueError, match="accelerate's FSDP"):
        create_galore_optimizer_and_scheduler(tiny_llama(), args, 6, layerwise=False)
