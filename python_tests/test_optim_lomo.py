"""LOMO and AdaLomo against lomo-optim 0.1.1 (the oracle), and their optimizer API.

A small LLaMA-style model is trained for 20+ steps by lomo-optim and by ours from
the same initialization on the same batches, with lomo-optim's call protocol
(``grad_norm`` when clipping by norm, then ``fused_backward``). fp32 parameters must
agree within 1e-5 relative (per tensor, in norm); each parameter's total change must
be far above that, so a missing or halved update fails. In bf16 the reference does
lomo-optim's fp32 operations in its order and rounds once, as lomo-optim does, so the
bf16 runs must agree bit for bit (a bf16 model's 20-step trajectory is too far from an
fp32 twin's for the twin to judge it; the kernels are judged step by step against
an fp32 twin in test_kernels_lomo.py).
"""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch

lomo_optim = pytest.importorskip("lomo_optim")
transformers = pytest.importorskip("transformers")

import galore_kernels as gk  # noqa: E402

VOCAB, SEQ, BATCH, STEPS = 64, 12, 2, 20


def small_llama(dtype=torch.float32):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=SEQ, tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config).to(dtype)


def batches(steps=STEPS):
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator) for _ in range(steps)]


def lomo_oracle(name, model, **kwargs):
    # lomo-optim 0.1.1's AdaLomo moves its states with .cuda() in __init__: identity on the CPU.
    with mock.patch.object(torch.Tensor, "cuda", lambda self, *args, **kw: self):
        return getattr(lomo_optim, name)(model, **kwargs)


def train(model, optimizer, lr, clip_by_norm, steps=STEPS):
    for ids in batches(steps):
        loss = model(input_ids=ids, labels=ids).loss
        if clip_by_norm:
            optimizer.grad_norm(loss)
        optimizer.fused_backward(loss, lr)
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# (oracle class, ours, lr, kwargs): lr large enough that every parameter moves by far more than 1e-5.
CASES = {
    "lomo": ("Lomo", gk.LOMO, 1.0, {}),
    "lomo-clip-norm": ("Lomo", gk.LOMO, 1.0, dict(clip_grad_norm=0.3)),
    "lomo-clip-value": ("Lomo", gk.LOMO, 1.0, dict(clip_grad_value=0.02, weight_decay=0.1)),
    "adalomo": ("AdaLomo", gk.AdaLomo, 5e-2, {}),
    "adalomo-weight-decay": ("AdaLomo", gk.AdaLomo, 5e-2, dict(weight_decay=0.5)),
    "adalomo-clip-norm": ("AdaLomo", gk.AdaLomo, 5e-2, dict(clip_grad_norm=0.3, weight_decay=0.1)),
    "adalomo-clip-value": ("AdaLomo", gk.AdaLomo, 5e-2, dict(clip_grad_value=0.02)),
}


def run_pair(case, dtype):
    oracle_name, ours_cls, lr, kwargs = CASES[case]
    clip_by_norm = "clip_grad_norm" in kwargs
    model = small_llama(dtype)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    oracle_model, ours_model = copy.deepcopy(model), copy.deepcopy(model)
    theirs = train(oracle_model, lomo_oracle(oracle_name, oracle_model, lr=lr, **kwargs), lr, clip_by_norm)
    ours_opt = ours_cls(ours_model, lr=lr, backend="torch", **kwargs)
    ours = train(ours_model, ours_opt, lr, clip_by_norm)
    ours_opt.remove_hooks()
    return initial, theirs, ours


@pytest.mark.parametrize("case", list(CASES))
def test_fp32_matches_lomo_optim(case):
    initial, theirs, ours = run_pair(case, torch.float32)
    for name in theirs:
        change = torch.linalg.vector_norm(theirs[name] - initial[name])
        error = torch.linalg.vector_norm(ours[name] - theirs[name])
        tolerance = 1e-5 * torch.linalg.vector_norm(theirs[name])
        assert change >= 10 * tolerance, f"{name}: the test's update ({change:.3g}) is too small to judge"
        assert error <= tolerance, f"{name}: off lomo-optim by {error:.3g} (update {change:.3g})"


@pytest.mark.parametrize("case", ["lomo", "lomo-clip-norm", "adalomo", "adalomo-weight-decay"])
def test_bf16_matches_lomo_optim_bit_for_bit(case):
    initial, theirs, ours = run_pair(case, torch.bfloat16)
    moved = sum(int((theirs[name] != initial[name]).sum()) for name in theirs) / sum(t.numel() for t in theirs.values())
    assert moved >= 0.5, f"only {moved:.0%} of the bf16 values moved; the test cannot judge the updates"
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), f"{name}: bf16 parameters differ from lomo-optim's"


def test_adalomo_rejects_three_dimensional_parameters():
    model = torch.nn.Conv1d(2, 3, 3)
    with pytest.raises(ValueError, match="vectors and matrices only"):
        gk.AdaLomo(model)


@pytest.mark.parametrize("kwargs, message", [
    (dict(clip_grad_norm=0.0), "clip_grad_norm should be positive"),
    (dict(clip_grad_value=-1.0), "clip_grad_value should be positive"),
    (dict(lr=-1.0), "learning rate"),
    (dict(backend="cuda"), "backend must be one of"),
])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        gk.LOMO(torch.nn.Linear(3, 2), **kwargs)


def test_fused_backward_without_grad_norm_raises_when_clipping():
    model = torch.nn.Linear(4, 3)
    optimizer = gk.LOMO(model, clip_grad_norm=1.0, backend="torch")
    with pytest.raises(ValueError, match="call optimizer.grad_norm"):
        optimizer.fused_backward(model(torch.randn(2, 4)).sum(), 0.1)
    optimizer.remove_hooks()


def test_scheduler_drives_the_lr_and_state_dict_round_trips(tmp_path):
    model = small_llama()
    optimizer = gk.AdaLomo(model, lr=1e-2, weight_decay=0.1, backend="torch")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    ids = batches(1)[0]
    for _ in range(3):
        optimizer.fused_backward(model(input_ids=ids, labels=ids).loss)
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**3)
    torch.save(optimizer.state_dict(), tmp_path / "opt.pt")
    optimizer.remove_hooks()

    restored_model = copy.deepcopy(model)
    restored = gk.AdaLomo(restored_model, lr=1e-2, weight_decay=0.1, backend="torch")
    restored.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    for p, q in zip(model.parameters(), restored_model.parameters()):
        for key, value in optimizer.state[p].items():
            saved = restored.state[q][key]
            assert (saved == value).all() if torch.is_tensor(value) else saved == value
    # One more identical step on both from the same state gives identical parameters.
    optimizer = gk.AdaLomo(model, lr=1e-2, weight_decay=0.1, backend="torch")
    optimizer.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    for opt, m in ((optimizer, model), (restored, restored_model)):
        opt.fused_backward(m(input_ids=ids, labels=ids).loss, 1e-2)
        opt.remove_hooks()
    for p, q in zip(model.parameters(), restored_model.parameters()):
        assert torch.equal(p, q)


def test_load_state_dict_refuses_a_mismatched_state():
    model = small_llama()
    optimizer = gk.AdaLomo(model, backend="torch")
    ids = batches(1)[0]
    optimizer.fused_backward(model(input_ids=ids, labels=ids).loss, 1e-3)
    state = optimizer.state_dict()
    first_matrix = next(i for i, p in enumerate(model.parameters()) if p.dim() == 2)
    state["state"][first_matrix]["exp_avg_sq_row"] = state["state"][first_matrix]["exp_avg_sq_row"][:-1]
    with pytest.raises(ValueError, match="exp_avg_sq_row"):
        optimizer.load_state_dict(state)
    optimizer.remove_hooks()


def test_a_second_optimizer_on_the_same_model_is_refused():
    model = torch.nn.Linear(4, 3)
    first = gk.LOMO(model)
    with pytest.raises(ValueError, match="remove_hooks"):
        gk.AdaLomo(model)
    first.remove_hooks()
    gk.AdaLomo(model).remove_hooks()


@pytest.mark.parametrize("cls, kwargs, error, message", [
    (gk.LOMO, dict(lr=None), TypeError, "lr must be a number"),
    (gk.LOMO, dict(lr="1e-3"), TypeError, "lr must be a number"),
    (gk.LOMO, dict(weight_decay=None), TypeError, "weight_decay must be a number"),
    (gk.AdaLomo, dict(eps=1e-3), ValueError, r"eps must be \(eps1, eps2\)"),
    (gk.AdaLomo, dict(eps=(None, 1e-3)), ValueError, r"eps must be \(eps1, eps2\)"),
    # eps1 = 0: a gradient row or entry that is exactly zero (an embedding row not in the batch)
    # gives rsqrt(0)·0 = NaN, and the update normalization spreads it over the whole parameter.
    (gk.AdaLomo, dict(eps=(0.0, 1e-3)), ValueError, r"eps must be \(eps1, eps2\)"),
    (gk.AdaLomo, dict(clip_threshold=None), TypeError, "clip_threshold must be a number"),
    (gk.AdaLomo, dict(decay_rate=None), TypeError, "decay_rate must be a number"),
    (gk.LOMO, dict(clip_grad_norm="1"), TypeError, "clip_grad_norm must be a number"),
    # A typo or bad value in loss_scale_args would otherwise surface at the first fp16 backward.
    (gk.LOMO, dict(loss_scale_args={"init_scal": 2.0**16}), TypeError, "loss_scale_args"),
    (gk.AdaLomo, dict(loss_scale_args={"init_scale": -1.0}), ValueError, "init_scale > 0"),
])
def test_bad_arguments_name_the_argument(cls, kwargs, error, message):
    with pytest.raises(error, match=message):
        cls(torch.nn.Linear(3, 2), backend="torch", **kwargs)


@pytest.mark.parametrize("group, error, message", [
    ({"lr": -1.0}, ValueError, "Invalid learning rate"),
    ({"weight_decay": -0.1}, ValueError, "Invalid weight_decay"),
    ({"decay_rate": 0.5}, ValueError, "decay_rate must be < 0"),
    ({"eps": (1e-30, -1.0)}, ValueError, r"eps must be \(eps1, eps2\)"),
])
def test_add_param_group_checks_its_hyperparameters(group, error, message):
    optimizer = gk.AdaLomo(torch.nn.Linear(3, 2), backend="torch")
    with pytest.raises(error, match=message):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.ones(4))], **group})
    assert len(optimizer.param_groups) == 1
    optimizer.remove_hooks()


def test_adalomo_add_param_group_refuses_three_dimensional_parameters():
    optimizer = gk.AdaLomo(torch.nn.Linear(3, 2), backend="torch")
    with pytest.raises(ValueError, match="vectors and matrices only"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.ones(3, 4, 2))]})
    optimizer.remove_hooks()


@pytest.mark.parametrize("cls", [gk.LOMO, gk.AdaLomo])
def test_complex_parameters_are_refused_at_construction(cls):
    model = torch.nn.Linear(3, 2, dtype=torch.complex64)
    with pytest.raises(TypeError, match="complex"):
        cls(model, backend="torch")


def test_fp16_resume_keeps_the_automatic_clip_threshold():
    """An fp16 loss turns on loss scaling and, with no clip_grad_norm given, a clip at 1.0. A
    resumed optimizer restores the scaler from the checkpoint, so it must also restore that clip:
    it used to resume unclipped, and its first step then differed from the uninterrupted run's."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4).half()
    inputs = 10 * torch.randn(16, 8).half()  # gradient norm far above 1: the clip matters

    def one_step(optimizer, m):
        loss = m(inputs).float().pow(2).mean().half()
        optimizer.grad_norm(loss)
        optimizer.fused_backward(loss, 1e-2)

    optimizer = gk.LOMO(model, loss_scale_args=dict(init_scale=2.0**4), backend="torch")
    with pytest.warns(UserWarning, match="clip threshold is set to 1.0"):
        one_step(optimizer, model)
    saved = optimizer.state_dict()
    resumed_model = copy.deepcopy(model)
    resumed = gk.LOMO(resumed_model, loss_scale_args=dict(init_scale=2.0**4), backend="torch")
    resumed.load_state_dict(saved)
    assert resumed.clip_grad_norm == 1.0
    one_step(optimizer, model)
    one_step(resumed, resumed_model)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
    optimizer.remove_hooks()
    resumed.remove_hooks()


def test_loading_a_lomo_checkpoint_into_adalomo_names_what_is_missing():
    model = torch.nn.Linear(3, 2)
    lomo = gk.LOMO(model, backend="torch")
    saved = lomo.state_dict()  # no state yet: only the groups, which lack AdaLomo's keys
    lomo.remove_hooks()
    adalomo = gk.AdaLomo(model, backend="torch")
    with pytest.raises(ValueError, match=r"param group 0 .* lacks .*'clip_threshold'"):
        adalomo.load_state_dict(saved)
    adalomo.remove_hooks()


def test_add_param_group_with_named_parameters_gets_torchs_message():
    """The groups' checks look at the tensor of a (name, tensor) pair, so torch's own refusal of a
    named group beside the model's unnamed one comes through (not an AttributeError on the tuple)."""
    optimizer = gk.AdaLomo(torch.nn.Linear(3, 2), backend="torch")
    with pytest.raises(ValueError, match="with/without names"):
        optimizer.add_param_group({"params": [("extra", torch.nn.Parameter(torch.ones(4)))]})
    optimizer.remove_hooks()
