"""Layerwise guardrails and visibility: a second optimizer, GradScaler, step() too often,
skipped_steps, the last global gradient norm, refresh time, summary() (CPU, torch backend)."""

import warnings

import pytest
import torch

import galore_kernels as gk
from galore_kernels import projector

OPTIMIZERS = [gk.GaLoreAdamW, gk.GaLoreAdamW8bit]


@pytest.fixture(autouse=True)
def _fresh_warn_once():
    saved = set(projector._warned)
    projector._warned.clear()
    yield
    projector._warned.clear()
    projector._warned.update(saved)


def make_model():
    torch.manual_seed(1)
    # 72×96 at rank 48: a 4608-value low-rank state, so the 8-bit class quantizes it.
    return torch.nn.Sequential(torch.nn.Linear(96, 72), torch.nn.GELU(), torch.nn.Linear(72, 10))


def param_groups(model, rank=48, gap=2):
    matrices = [p for p in model.parameters() if p.dim() == 2]
    others = [p for p in model.parameters() if p.dim() != 2]
    return [
        {"params": matrices, "rank": rank, "update_proj_gap": gap, "scale": 0.25, "proj_type": "std"},
        {"params": others},
    ]


def batch(seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(128, 96, generator=generator), torch.randn(128, 10, generator=generator)


def loss_of(model, data, divide=1):
    inputs, targets = data
    return ((model(inputs) - targets) ** 2).mean() / divide


# ------------------------------------------------------------------------ guardrails


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_second_layerwise_optimizer_on_the_same_parameters_is_refused(cls):
    model = make_model()
    first = cls(param_groups(model), lr=1e-2, layerwise=True, backend="torch")
    with pytest.raises(ValueError, match=r"remove_hooks\(\)"):
        cls(param_groups(model), lr=1e-2, layerwise=True, backend="torch")
    first.remove_hooks()
    second = cls(param_groups(model), lr=1e-2, layerwise=True, backend="torch")
    before = [p.detach().clone() for p in model.parameters()]
    loss_of(model, batch(0)).backward()
    assert first.state == {} and len(second.state) == 4  # the new one trains, the old one does not
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    # A non-layerwise optimizer registers no hooks and is never refused.
    gk.GaLoreAdamW(param_groups(model), backend="torch")


def test_grad_scaler_in_layerwise_mode_is_refused_with_a_message():
    model = make_model()
    optimizer = gk.GaLoreAdamW(param_groups(model), layerwise=True, backend="torch")
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(loss_of(model, batch(0))).backward()
    with pytest.raises(ValueError, match="GradScaler.*bf16"):
        scaler.step(optimizer)


def test_grad_scaler_still_works_without_layerwise():
    model = make_model()
    optimizer = gk.GaLoreAdamW(param_groups(model), backend="torch")
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(loss_of(model, batch(0))).backward()
    scaler.step(optimizer)
    scaler.update()
    assert all(state["step"] == 1 for state in optimizer.state.values())


def test_step_after_every_micro_batch_warns_once():
    model = make_model()
    optimizer = gk.GaLoreAdamW(param_groups(model), layerwise=True, accumulation_steps=2, backend="torch")
    with pytest.warns(RuntimeWarning, match="accumulation_steps=2"):
        for seed in range(3):
            loss_of(model, batch(seed), 2).backward()
            optimizer.step()


def test_step_once_per_window_does_not_warn():
    model = make_model()
    optimizer = gk.GaLoreAdamW(param_groups(model), layerwise=True, accumulation_steps=2, backend="torch")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r"step\(\) ended")
        for seed in range(4):
            loss_of(model, batch(seed), 2).backward()
            if seed % 2 == 1:
                optimizer.step()
    assert all(state["step"] == 2 for state in optimizer.state.values())


# ------------------------------------------------------------------------ visibility


@pytest.mark.parametrize("layerwise", [False, True], ids=["standard", "layerwise"])
@pytest.mark.parametrize("max_grad_norm", [None, 1.0], ids=["no-clip", "clip"])
def test_skipped_steps_counts_one_event_once(layerwise, max_grad_norm):
    model = make_model()
    optimizer = gk.GaLoreAdamW(
        param_groups(model), layerwise=layerwise, max_grad_norm=max_grad_norm, backend="torch"
    )
    for seed in range(3):
        if seed == 1:  # one NaN in one parameter's gradient
            model[0].weight.register_hook(lambda grad: grad.index_put((torch.tensor([0]), torch.tensor([0])), torch.tensor(float("nan"))))
        loss_of(model, batch(seed)).backward()
        optimizer.step()
        optimizer.zero_grad()
        if seed == 1:
            model[0].weight._backward_hooks.clear()
    # Clipping makes the global norm NaN, so every parameter skips; without it only the one.
    assert optimizer.nonfinite_skips == (4 if max_grad_norm else 1)
    assert optimizer.skipped_steps == 1


@pytest.mark.parametrize("accumulation", [1, 2])
def test_last_grad_norm_in_layerwise_mode_without_clipping(accumulation):
    """The layerwise norm (tracked, no clipping) is the one the ordinary step clips by."""
    data = [batch(seed) for seed in range(2 * accumulation)]
    models = [make_model(), make_model()]
    layerwise = gk.GaLoreAdamW(param_groups(models[0]), layerwise=True, accumulation_steps=accumulation, backend="torch")
    layerwise.track_grad_norm = True
    ordinary = gk.GaLoreAdamW(param_groups(models[1]), max_grad_norm=1e9, backend="torch")
    assert layerwise.last_grad_norm is None
    for start in range(0, len(data), accumulation):
        for item in data[start : start + accumulation]:
            loss_of(models[0], item, accumulation).backward()
            loss_of(models[1], item, accumulation).backward()
        grads = {p: p.grad.clone() for p in models[1].parameters()}
        ordinary.step()
        ordinary.zero_grad()
        layerwise.step()
        # By hand: the low-rank gradient PᵀG (or G Qᵀ) of each matrix, the full gradient of the rest.
        squares = torch.zeros(())
        for p, grad in grads.items():
            state = ordinary.state[p]
            if "proj_left" in state:
                grad = state["proj_left"].t() @ grad
            if "proj_right" in state:
                grad = grad @ state["proj_right"].t()
            squares += grad.square().sum()
        torch.testing.assert_close(ordinary.last_grad_norm, squares.sqrt(), rtol=1e-5, atol=0)
        assert layerwise.last_grad_norm is not None and layerwise.last_grad_norm.dim() == 0
        torch.testing.assert_close(layerwise.last_grad_norm, ordinary.last_grad_norm, rtol=1e-5, atol=0)
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_refresh_time_is_counted_per_refresh():
    model = make_model()
    optimizer = gk.GaLoreAdamW(param_groups(model, gap=2), backend="torch")
    for seed in range(4):  # refreshes at steps 0 and 2, for both matrices
        loss_of(model, batch(seed)).backward()
        optimizer.step()
        optimizer.zero_grad()
        assert optimizer.refresh_count == 2 * (seed // 2 + 1)
    assert optimizer.refresh_seconds > 0


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_summary_rows_and_bytes_match_the_real_states(cls):
    model = make_model()
    groups = param_groups(model, rank=100)  # clamped: 72 for the 72×96 weight, 10 for the 10×72 one
    optimizer = cls(groups, backend="torch")
    adamw = torch.optim.AdamW(model.parameters())
    before = optimizer.summary(model)
    loss_of(model, batch(0)).backward()
    optimizer.step()
    adamw.step()
    after = optimizer.summary(model)
    rows = {row.name: row for row in after.rows}
    assert rows["0.weight"].shape == (72, 96) and rows["0.weight"].side == "left" and rows["0.weight"].rank == 72
    assert rows["2.weight"].rank == 10 and rows["0.bias"].side is None and rows["0.bias"].rank is None
    for row, p in zip(after.rows, [p for g in optimizer.param_groups for p in g["params"]]):
        state = optimizer.state[p]
        assert row.state_bytes == sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
        assert row.adamw_state_bytes == sum(
            v.numel() * v.element_size() for v in adamw.state[p].values() if torch.is_tensor(v)
        )
    assert [row.state_bytes for row in before.rows] == [row.state_bytes for row in after.rows]  # predicted = actual
    table = str(after)
    assert "0.weight" in table and "72x96" in table and "total" in table.splitlines()[-1]
    # Without a model the names come from named param groups, as torch.optim takes them.
    named = cls([{"params": list(model.named_parameters())}], backend="torch").summary()
    assert [row.name for row in named.rows] == [name for name, _ in model.named_parameters()]
