"""Layerwise mode: updates inside backward, accumulation, clipping, schedulers, checkpoints (CPU, torch backend)."""

import io

import pytest
import torch

import galore_kernels as gk

OPTIMIZERS = [gk.GaLoreAdamW, gk.GaLoreAdamW8bit]


def make_model():
    torch.manual_seed(1)
    # 72×96 with rank 48 gives 48×96 = 4608 low-rank values: 8-bit state, not the fp32 fallback.
    return torch.nn.Sequential(torch.nn.Linear(96, 72), torch.nn.GELU(), torch.nn.Linear(72, 10))


def param_groups(model, rank=48, gap=3):
    matrices = [p for p in model.parameters() if p.dim() == 2]
    others = [p for p in model.parameters() if p.dim() != 2]
    return [
        {"params": matrices, "rank": rank, "update_proj_gap": gap, "scale": 0.25, "proj_type": "std"},
        {"params": others},
    ]


def batches(count, seed=0):
    # 128 samples make each weight gradient full rank, so its top-48 subspace is
    # well separated; with fewer, the SVD's null-space vectors would amplify fp32
    # rounding into a different projector.
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(128, 96, generator=generator), torch.randn(128, 10, generator=generator)) for _ in range(count)]


def loss_of(model, batch, divide=1):
    inputs, targets = batch
    return ((model(inputs) - targets) ** 2).mean() / divide


def run(model, optimizer, data, accumulation, scheduler=None):
    for start in range(0, len(data), accumulation):
        for batch in data[start : start + accumulation]:
            loss_of(model, batch, accumulation).backward()
        optimizer.step()
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()


def max_difference(model_a, model_b):
    return max((a - b).abs().max().item() for a, b in zip(model_a.parameters(), model_b.parameters()))


# Low-rank accumulation sums Pᵀ G_i where the ordinary path projects Σ G_i: equal up
# to fp32 rounding (8-bit: and the rare code that this rounding moves across a boundary).
TOLERANCE = {gk.GaLoreAdamW: 1e-6, gk.GaLoreAdamW8bit: 2e-5}


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("svd", ["exact", "randomized"])
@pytest.mark.parametrize("accumulation", [1, 3])
def test_layerwise_accumulation_matches_ordinary_trajectory(cls, svd, accumulation):
    """Eight updates after the first refresh. Later refreshes are left to the per-update test:
    across one, an SVD turns a rounding-level difference into a rotated basis."""
    ordinary_model, layerwise_model = make_model(), make_model()
    ordinary = cls(param_groups(ordinary_model, gap=100), lr=3e-3, svd=svd, backend="torch")
    layerwise = cls(
        param_groups(layerwise_model, gap=100), lr=3e-3, svd=svd, backend="torch",
        layerwise=True, accumulation_steps=accumulation,
    )
    data = batches(8 * accumulation)
    run(ordinary_model, ordinary, data, accumulation)
    run(layerwise_model, layerwise, data, accumulation)
    assert max_difference(ordinary_model, layerwise_model) < TOLERANCE[cls]
    assert all(p.grad is None for p in layerwise_model.parameters())
    assert all(layerwise.state[p]["step"] == 8 for p in layerwise_model.parameters())


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_every_layerwise_update_matches_ordinary_update_including_refreshes(cls):
    """From the same state, one accumulation cycle of each mode agrees, for refresh cycles too."""
    accumulation, gap = 3, 3
    ordinary_model = make_model()
    ordinary = cls(param_groups(ordinary_model, gap=gap), lr=3e-3, backend="torch")
    data = batches(7 * accumulation)
    for cycle in range(7):  # refreshes at updates 0, 3 and 6
        layerwise_model = make_model()
        layerwise_model.load_state_dict(ordinary_model.state_dict())
        layerwise = cls(
            param_groups(layerwise_model, gap=gap), lr=3e-3, backend="torch",
            layerwise=True, accumulation_steps=accumulation,
        )
        layerwise.load_state_dict(ordinary.state_dict())
        cycle_data = data[cycle * accumulation : (cycle + 1) * accumulation]
        run(ordinary_model, ordinary, cycle_data, accumulation)
        run(layerwise_model, layerwise, cycle_data, accumulation)
        assert max_difference(ordinary_model, layerwise_model) < TOLERANCE[cls], f"update {cycle}"
        for p_ordinary, p_layerwise in zip(ordinary_model.parameters(), layerwise_model.parameters()):
            for key in ("proj_left", "proj_right"):
                if key in ordinary.state[p_ordinary]:
                    # A refresh sees the same full accumulated gradient in both modes.
                    assert torch.equal(ordinary.state[p_ordinary][key], layerwise.state[p_layerwise][key])


def test_at_most_one_full_gradient_alive_without_accumulation(monkeypatch):
    model = make_model()
    optimizer = gk.GaLoreAdamW8bit(param_groups(model), backend="torch", layerwise=True)
    params = list(model.parameters())
    alive_at_update = []
    original = type(optimizer)._update

    def spy(self, group, p, grad, grad_is_projected):
        alive_at_update.append(sum(q.grad is not None for q in params))
        original(self, group, p, grad, grad_is_projected)

    monkeypatch.setattr(type(optimizer), "_update", spy)
    for batch in batches(4):  # includes the refresh at step 3
        loss_of(model, batch).backward()
        # No gradient held by the optimizer either: nothing is accumulated.
        assert not any("grad_accum" in optimizer.state[p] for p in params)
    # The gradient being consumed was taken off p.grad before the update: none is alive.
    assert alive_at_update and max(alive_at_update) == 0


@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_scheduler_drives_layerwise_lr_exactly(cls):
    ordinary_model, layerwise_model = make_model(), make_model()
    ordinary = cls(param_groups(ordinary_model), lr=1e-2, svd="exact", backend="torch")
    layerwise = cls(param_groups(layerwise_model), lr=1e-2, svd="exact", backend="torch", layerwise=True)
    schedule = lambda step: [1.0, 0.5, 0.0, 2.0, 0.25, 1.0][step % 6]  # noqa: E731
    ordinary_scheduler = torch.optim.lr_scheduler.LambdaLR(ordinary, schedule)
    layerwise_scheduler = torch.optim.lr_scheduler.LambdaLR(layerwise, schedule)
    seen = []
    original = type(layerwise)._run_step

    def record_lr(self, group, p, state, grad, grad_is_projected):
        if self is layerwise:
            seen.append(group["lr"])
        original(self, group, p, state, grad, grad_is_projected)

    type(layerwise)._run_step = record_lr
    try:
        data = batches(6)
        run(ordinary_model, ordinary, data, 1, ordinary_scheduler)
        run(layerwise_model, layerwise, data, 1, layerwise_scheduler)
    finally:
        type(layerwise)._run_step = original
    per_update = [seen[i] for i in range(0, len(seen), len(list(layerwise_model.parameters())))]
    assert per_update == pytest.approx([1e-2 * schedule(i) for i in range(6)], rel=0, abs=1e-15)
    assert max_difference(ordinary_model, layerwise_model) < 1e-6


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("accumulation", [1, 2])
def test_layerwise_clipping_matches_ordinary_clipping(cls, accumulation):
    ordinary_model, layerwise_model, unclipped_model = make_model(), make_model(), make_model()
    max_norm = 0.02  # far below the gradient norm, so every update is clipped
    # Adam is scale-invariant except through eps: an eps near the clipped gradients' size
    # makes clipping change the trajectory visibly, so the comparison is not vacuous.
    hyper = dict(lr=3e-3, eps=1e-4, svd="exact", backend="torch")
    ordinary = cls(param_groups(ordinary_model), max_grad_norm=max_norm, **hyper)
    layerwise = cls(
        param_groups(layerwise_model), layerwise=True, accumulation_steps=accumulation, max_grad_norm=max_norm, **hyper,
    )
    unclipped = cls(param_groups(unclipped_model), **hyper)
    data = batches(5 * accumulation)
    run(ordinary_model, ordinary, data, accumulation)
    run(layerwise_model, layerwise, data, accumulation)
    run(unclipped_model, unclipped, data, accumulation)
    assert max_difference(ordinary_model, layerwise_model) < TOLERANCE[cls]
    assert max_difference(ordinary_model, unclipped_model) > 10 * TOLERANCE[cls]


def test_clipping_scales_the_consumed_gradient_to_max_norm():
    model = make_model()
    optimizer = gk.GaLoreAdamW(param_groups(model), svd="exact", backend="torch", layerwise=True, max_grad_norm=0.05)
    consumed = []
    original = type(optimizer)._update

    def spy(self, group, p, grad, grad_is_projected):
        consumed.append(grad.float().norm())
        original(self, group, p, grad, grad_is_projected)

    type(optimizer)._update = spy
    try:
        loss_of(model, batches(1)[0]).backward()
    finally:
        type(optimizer)._update = original
    assert torch.linalg.vector_norm(torch.stack(consumed)).item() == pytest.approx(0.05, rel=1e-4)


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("layerwise", [False, True])
def test_resume_is_bit_exact_across_refresh(cls, layerwise):
    """Stop after 4 updates and 1 of 2 micro-batches of the 5th, save, load with weights_only, resume."""
    accumulation = 2 if layerwise else 1
    kwargs = dict(lr=3e-3, backend="torch", layerwise=layerwise, accumulation_steps=accumulation, seed=7)
    data = batches(10 * accumulation)
    straight_model = make_model()
    straight = cls(param_groups(straight_model), **kwargs)
    run(straight_model, straight, data, accumulation)

    first_model = make_model()
    first = cls(param_groups(first_model), **kwargs)
    cut = 4 * accumulation + (1 if layerwise else 0)
    if layerwise:
        for batch in data[:cut]:
            loss_of(first_model, batch, accumulation).backward()
    else:
        run(first_model, first, data[:cut], accumulation)
    buffer = io.BytesIO()
    torch.save({"model": first_model.state_dict(), "optimizer": first.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    resumed_model = make_model()
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = cls(param_groups(resumed_model), **kwargs)
    resumed.load_state_dict(checkpoint["optimizer"])
    if layerwise:
        loss_of(resumed_model, data[cut], accumulation).backward()
        cut += 1
    run(resumed_model, resumed, data[cut:], accumulation)
    for a, b in zip(straight_model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    for p_straight, p_resumed in zip(straight_model.parameters(), resumed_model.parameters()):
        for key, value in straight.state[p_straight].items():
            other = resumed.state[p_resumed][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, key


def test_step_and_zero_grad_are_harmless_in_layerwise_mode():
    model = make_model()
    optimizer = gk.GaLoreAdamW(param_groups(model), backend="torch", svd="exact", layerwise=True)
    loss_of(model, batches(1)[0]).backward()
    before = [p.detach().clone() for p in model.parameters()]
    assert optimizer.step(lambda: torch.tensor(3.0)) == 3.0
    optimizer.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_frozen_parameters_are_left_alone_in_layerwise_mode():
    model = make_model()
    model[0].bias.requires_grad_(False)
    optimizer = gk.GaLoreAdamW(param_groups(model), backend="torch", svd="exact", layerwise=True)
    frozen = model[0].bias.detach().clone()
    loss_of(model, batches(1)[0]).backward()
    assert torch.equal(model[0].bias, frozen) and model[0].bias not in optimizer.state


class Routed(torch.nn.Module):
    """Two experts; the batch index picks one, so each expert misses some backward passes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(96, 10) for _ in range(2))

    def forward(self, inputs, expert):
        return self.experts[expert](inputs)


@pytest.mark.parametrize("cls", OPTIMIZERS)
@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
def test_step_ends_windows_that_a_parameter_did_not_complete(cls, max_grad_norm):
    """Expert 1 gets gradients in 1 of 3 micro-batches, expert 0 in 2; the last window is cut short."""
    routes = [0, 0, 1, 0, 1, 0, 1, 1]  # windows of 3, then a partial window of 2 (end of an epoch)
    models = [Routed(), Routed()]
    kwargs = dict(lr=3e-3, svd="exact", backend="torch", max_grad_norm=max_grad_norm)
    groups = [[{"params": list(m.parameters()), "rank": 4, "update_proj_gap": 2, "scale": 0.5, "proj_type": "std"}]
              for m in models]
    ordinary = cls(groups[0], **kwargs)
    layerwise = cls(groups[1], layerwise=True, accumulation_steps=3, **kwargs)
    data = batches(len(routes))
    for start in (0, 3, 6):
        for (inputs, targets), expert in zip(data[start : start + 3], routes[start : start + 3]):
            for model in models:
                ((model(inputs, expert) - targets) ** 2).mean().div(3).backward()
        for optimizer in (ordinary, layerwise):
            optimizer.step()
            optimizer.zero_grad()
    assert max_difference(*models) < TOLERANCE[cls]
    assert all(layerwise.state[p]["step"] == ordinary.state[q]["step"]
               for p, q in zip(models[1].parameters(), models[0].parameters()))


def test_remove_hooks_detaches_the_optimizer():
    model = make_model()
    optimizer = gk.GaLoreAdamW(param_groups(model), backend="torch", svd="exact", layerwise=True)
    optimizer.remove_hooks()
    loss_of(model, batches(1)[0]).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert not optimizer.state
