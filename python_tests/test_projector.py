"""Projector refresh rules: side selection, schedule, stagger, seeds, degenerate gradients."""

import warnings

import pytest
import torch

import galore_kernels as gk
from galore_kernels import projector


@pytest.fixture(autouse=True)
def fresh_warnings():
    projector._warned.clear()
    yield
    projector._warned.clear()


@pytest.mark.parametrize(
    "proj_type, shape, side",
    [
        ("std", (8, 5), "right"), ("std", (5, 8), "left"), ("std", (6, 6), "right"),
        ("reverse_std", (8, 5), "left"), ("reverse_std", (5, 8), "right"), ("reverse_std", (6, 6), "left"),
        ("left", (8, 5), "left"), ("right", (5, 8), "right"), ("full", (5, 8), "full"),
    ],
)
def test_projection_side_follows_galore_torch(proj_type, shape, side):
    assert projector.projection_side(proj_type, shape) == side


def test_unknown_proj_type_names_the_allowed_values():
    with pytest.raises(ValueError, match="proj_type must be one of"):
        projector.projection_side("diagonal", (4, 4))


def test_stagger_spreads_refreshes_evenly_over_the_gap():
    gap, count = 200, 8
    phases = [(-projector.stagger_offset(i, count, gap)) % gap for i in range(count)]
    assert sorted(phases) == [0] + [gap - 25 * i for i in range(count - 1, 0, -1)]
    for i in range(count):  # each parameter refreshes exactly once per gap
        offset = projector.stagger_offset(i, count, gap)
        assert sum(projector.refresh_due(step, gap, offset) for step in range(1000, 1000 + gap)) == 1


def test_stagger_option_refreshes_parameters_at_different_steps():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(24, 32)) for _ in range(4)]
    optimizer = gk.GaLoreAdamW(
        [{"params": params, "rank": 4, "update_proj_gap": 8, "scale": 1.0, "proj_type": "std"}],
        backend="torch", stagger=True,
    )
    refreshed_at = {i: [] for i in range(4)}
    for step in range(17):
        before = [optimizer.state[p].get("proj_left") for p in params]
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
        for i, p in enumerate(params):
            if before[i] is None or not torch.equal(before[i], optimizer.state[p]["proj_left"]):
                refreshed_at[i].append(step)
    assert refreshed_at == {0: [0, 8, 16], 1: [0, 6, 14], 2: [0, 4, 12], 3: [0, 2, 10]}


def test_refresh_seed_depends_on_every_input_and_nothing_else():
    seeds = {projector.refresh_seed(s, i, t) for s in range(3) for i in range(3) for t in (0, 200, 400)}
    assert len(seeds) == 27
    assert projector.refresh_seed(1, 2, 200) == projector.refresh_seed(1, 2, 200)
    assert all(0 <= s < 2**63 for s in seeds)


@pytest.mark.parametrize("svd", ["exact", "randomized"])
@pytest.mark.parametrize("side", ["left", "right", "full"])
def test_projectors_are_orthonormal_and_deterministic(svd, side):
    generator = torch.Generator().manual_seed(0)
    grad = torch.randn(40, 56, generator=generator)
    first = projector.compute_projectors(grad, 6, side, svd=svd, seed=11)
    second = projector.compute_projectors(grad, 6, side, svd=svd, seed=11)
    for a, b in zip(first, second):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b)
            basis = a if a.shape[0] == 40 else a.t()
            torch.testing.assert_close(basis.t() @ basis, torch.eye(6), atol=1e-5, rtol=0)


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_non_finite_gradient_keeps_previous_projector_and_warns_once(svd):
    generator = torch.Generator().manual_seed(0)
    grad = torch.randn(30, 20, generator=generator)
    _, previous = projector.compute_projectors(grad, 4, "right", svd=svd)
    bad = grad.clone()
    bad[3, 4] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        _, kept = projector.compute_projectors(bad, 4, "right", svd=svd, previous=(None, previous))
    assert kept is previous
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time is silent
        bad[0, 0] = float("inf")
        projector.compute_projectors(bad, 4, "right", svd=svd, previous=(None, previous))


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_first_refresh_on_non_finite_gradient_gives_coordinate_axes(svd):
    grad = torch.full((12, 9), float("inf"))
    with pytest.warns(RuntimeWarning):
        left, right = projector.compute_projectors(grad, 3, "full", svd=svd)
    torch.testing.assert_close(left, torch.eye(12, 3))
    torch.testing.assert_close(right, torch.eye(3, 9))


@pytest.mark.parametrize("svd", ["exact", "randomized"])
@pytest.mark.parametrize("kind", ["zero", "rank_deficient"])
def test_degenerate_gradients_never_raise_and_stay_orthonormal(svd, kind):
    generator = torch.Generator().manual_seed(0)
    grad = torch.zeros(32, 24)
    if kind == "rank_deficient":
        grad = torch.randn(32, 2, generator=generator) @ torch.randn(2, 24, generator=generator)
    left, _ = projector.compute_projectors(grad, 8, "left", svd=svd)
    torch.testing.assert_close(left.t() @ left, torch.eye(8), atol=1e-5, rtol=0)


def test_optimizer_survives_a_nan_gradient_at_a_refresh_step():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(16, 24))
    optimizer = gk.GaLoreAdamW8bit(
        [{"params": [p], "rank": 4, "update_proj_gap": 2, "scale": 1.0, "proj_type": "std"}], backend="torch"
    )
    p.grad = torch.randn_like(p)
    optimizer.step()
    projection_before = optimizer.state[p]["proj_left"].clone()
    weights_before = p.detach().clone()
    p.grad = torch.randn_like(p)
    optimizer.step()
    p.grad = torch.full_like(p, float("nan"))  # step 2 is a refresh step
    with pytest.warns(RuntimeWarning, match="non-finite"):
        optimizer.step()
    assert torch.equal(optimizer.state[p]["proj_left"], projection_before)
    assert optimizer.nonfinite_skips == 1
    assert torch.isfinite(p).all() and not torch.equal(p, weights_before)


@pytest.mark.parametrize("side", ["left", "right"])
def test_randomized_refresh_is_continuous_and_sign_aligned_with_previous(side):
    generator = torch.Generator().manual_seed(2)
    grad = torch.randn(48, 64, generator=generator)
    left, right = projector.compute_projectors(grad, 6, side, seed=5)
    basis = left if side == "left" else right.t()
    # A rounding-level perturbation moves the projector by a rounding-level amount:
    # no singular vector flips its sign.
    nudged = projector.compute_projectors(grad * (1 + 1e-7), 6, side, seed=5)
    nudged_basis = nudged[0] if side == "left" else nudged[1].t()
    assert (nudged_basis - basis).abs().max() < 1e-4
    # After a drift, each new vector points the same way as its predecessor.
    drifted = grad + 0.05 * torch.randn(48, 64, generator=generator)
    new_left, new_right = projector.compute_projectors(drifted, 6, side, seed=9, previous=(left, right))
    new_basis = new_left if side == "left" else new_right.t()
    assert ((new_basis * basis).sum(dim=0) > 0).all()


@pytest.mark.parametrize("svd", ["exact", "randomized"])
@pytest.mark.parametrize("grad, rank, side, error, message", [
    # "exact" returned (None, None) for an unknown side, and an (8, 6) basis for rank 10.
    (torch.randn(8, 6), 2, "up", ValueError, "side must be one of"),
    (torch.randn(8, 6), 10, "left", ValueError, r"rank must be an int in \[1, 6\]"),
    (torch.randn(8, 6), 0, "right", ValueError, r"rank must be an int in \[1, 6\]"),
    (torch.randn(8, 6), 2.0, "right", ValueError, "rank must be an int"),
    (torch.randn(2, 3, 4), 1, "left", ValueError, "gradient must be a matrix"),
])
def test_compute_projectors_refuses_bad_arguments(svd, grad, rank, side, error, message):
    with pytest.raises(error, match=message):
        projector.compute_projectors(grad, rank, side, svd=svd)
