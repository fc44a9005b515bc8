"""clip_strategy="two_pass" and fp16 loss scaling in layerwise mode (CPU, torch backend).

two_pass must clip exactly as the ordinary optimizer does (by the norm of what the
moments see), hold no gradient while doing it, and, with fp16 loss scaling, skip an
overflowing step exactly: no parameter, moment or step count changes, the scale backs off.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from test_optim_layerwise import OPTIMIZERS, TOLERANCE, batches, loss_of, make_model, max_difference, param_groups, run

import galore_kernels as gk


def run_two_pass(model, optimizer, data):
    for batch in data:
        loss = loss_of(model, batch)
        optimizer.grad_norm(loss)
        optimizer.fused_backward(loss)
        optimizer.step()


@pytest.mark.parametrize("moments_on_refresh", ["keep", "rotate", "reset"])
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_two_pass_clipping_matches_ordinary_clipping(cls, moments_on_refresh):
    """Also with the moments carried through a refresh, which the norm pass must not touch."""
    ordinary_model, two_pass_model, unclipped_model = make_model(), make_model(), make_model()
    hyper = dict(lr=3e-3, eps=1e-4, svd="exact", backend="torch", moments_on_refresh=moments_on_refresh)
    ordinary = cls(param_groups(ordinary_model), max_grad_norm=0.02, **hyper)
    two_pass = cls(param_groups(two_pass_model), layerwise=True, clip_strategy="two_pass", max_grad_norm=0.02, **hyper)
    unclipped = cls(param_groups(unclipped_model), **hyper)
    data = batches(5)  # the refresh at step 3 is inside
    run(ordinary_model, ordinary, data, 1)
    run_two_pass(two_pass_model, two_pass, data)
    run(unclipped_model, unclipped, data, 1)
    assert max_difference(ordinary_model, two_pass_model) < TOLERANCE[cls]
    assert max_difference(ordinary_model, unclipped_model) > 10 * TOLERANCE[cls]
    assert two_pass.last_grad_norm is not None


def full_size_gradients_alive(optimizer, params):
    """Full-size gradients that exist besides the one a hook is consuming: on .grad, or held by the optimizer."""
    held = [grad for _, p, grad in getattr(optimizer, "_pending", []) if grad.shape == p.shape and p.dim() == 2]
    return sum(p.grad is not None for p in params) + len(held)


@pytest.mark.parametrize("strategy", ["two_pass", "hold", "LOMO", "AdaLomo"])
def test_no_two_full_size_gradients_coexist_in_two_pass(strategy):
    model = torch.nn.Sequential(torch.nn.Linear(96, 72), torch.nn.GELU(), torch.nn.Linear(72, 64), torch.nn.GELU(),
                                torch.nn.Linear(64, 10))
    params = list(model.parameters())
    if strategy in ("LOMO", "AdaLomo"):
        optimizer = getattr(gk, strategy)(model, lr=1e-3, clip_grad_norm=0.1, backend="torch")
    else:  # no GaLore group: every matrix's gradient is full size, the case LOMO is in
        optimizer = gk.GaLoreAdamW(params, backend="torch", layerwise=True, max_grad_norm=0.1, clip_strategy=strategy)
    alive = []
    original = optimizer._on_grad_ready

    def spy(p):
        alive.append(full_size_gradients_alive(optimizer, params) - (p.grad is not None))
        original(p)
        alive.append(full_size_gradients_alive(optimizer, params))

    for handle in optimizer._hooks:
        handle.remove()
    optimizer._hooks = [p.register_post_accumulate_grad_hook(spy) for p in params]
    for batch in batches(2):
        loss = loss_of(model, batch)
        if strategy == "hold":
            loss.backward()
        else:
            optimizer.grad_norm(loss)
            optimizer.fused_backward(loss)
    if strategy != "hold":
        assert max(alive) == 0
    else:  # the control: "hold" keeps the matrices' gradients until backward ends, so the spy can see them
        assert max(alive) >= 2
    optimizer.remove_hooks()


def fp16_model():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).half()


def fp16_loss(model, seed):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(16, 24, generator=generator).half()
    return model(inputs).float().square().mean().half()


def snapshot(model, optimizer):
    state = {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in optimizer.state[p].items()}
             for p in model.parameters() if p in optimizer.state}
    return [p.detach().clone() for p in model.parameters()], state


def make_fp16_optimizer(name, model, init_scale):
    scale_args = dict(init_scale=init_scale, scale_window=2)
    if name == "galore":
        matrices = [p for p in model.parameters() if p.dim() == 2]
        others = [p for p in model.parameters() if p.dim() != 2]
        groups = [{"params": matrices, "rank": 4, "update_proj_gap": 2, "scale": 0.25, "proj_type": "std"}, {"params": others}]
        return gk.GaLoreAdamW(groups, lr=1e-2, backend="torch", layerwise=True, clip_strategy="two_pass",
                              max_grad_norm=1.0, loss_scaling=True, loss_scale_args=scale_args)
    if name == "lomo":
        return gk.LOMO(model, lr=1e-1, clip_grad_norm=1.0, loss_scale_args=scale_args, backend="torch")
    return gk.AdaLomo(model, lr=1e-2, clip_grad_norm=1.0, loss_scale_args=scale_args, backend="torch")


@pytest.mark.parametrize("name", ["galore", "lomo", "adalomo"])
def test_fp16_overflow_step_is_skipped_exactly(name):
    model = fp16_model()
    # 2^24 times a loss of order 1 overflows fp16 (max 65504): the first step must be skipped.
    optimizer = make_fp16_optimizer(name, model, init_scale=2.0**24)
    warmup = copy.deepcopy(model)
    for step in range(12):
        params_before, state_before = snapshot(model, optimizer)
        scale_before = optimizer.loss_scaler.loss_scale if optimizer.loss_scaler else 2.0**24
        loss = fp16_loss(model, step)
        optimizer.grad_norm(loss)
        overflow = optimizer._skip_step
        optimizer.fused_backward(loss)
        optimizer.step()
        params_after, state_after = snapshot(model, optimizer)
        if overflow:
            assert all(torch.equal(a, b) for a, b in zip(params_before, params_after)), "a parameter changed on an overflow step"
            for key, before in state_before.items():
                for k, v in before.items():
                    assert (torch.equal(v, state_after[key][k]) if torch.is_tensor(v) else v == state_after[key][k]), k
            assert optimizer.loss_scaler.loss_scale == scale_before / 2
        else:
            assert not all(torch.equal(a, b) for a, b in zip(params_before, params_after))
    assert optimizer.loss_scaler.skipped_steps >= 8  # 2^24 backs off to below 2^16 before any step succeeds
    assert optimizer.loss_scaler.skipped_steps < 12
    assert max_difference(model, warmup) > 0
    # The scaler's state travels with the optimizer's (weights_only), and is restored.
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    optimizer.remove_hooks()
    buffer.seek(0)
    restored = make_fp16_optimizer(name, model, init_scale=1.0)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.loss_scaler.state_dict() == optimizer.loss_scaler.state_dict()
    restored.remove_hooks()


def test_two_pass_needs_layerwise_and_loss_scaling_needs_two_pass():
    model = make_model()
    with pytest.raises(ValueError, match="needs layerwise=True"):
        gk.GaLoreAdamW(model.parameters(), clip_strategy="two_pass")
    with pytest.raises(ValueError, match="needs clip_strategy='two_pass'"):
        gk.GaLoreAdamW(model.parameters(), layerwise=True, loss_scaling=True)
    with pytest.raises(ValueError, match="clip_strategy must be one of"):
        gk.GaLoreAdamW(model.parameters(), layerwise=True, clip_strategy="twice")
    optimizer = gk.GaLoreAdamW(model.parameters(), layerwise=True, backend="torch")
    with pytest.raises(ValueError, match="two backward passes of clip_strategy='two_pass'"):
        optimizer.grad_norm(loss_of(model, batches(1)[0]))
    optimizer.remove_hooks()


@pytest.mark.parametrize("cls", [gk.GaLoreAdamW, gk.NaturalGaLoreAdamW])
def test_two_pass_computes_each_refresh_once(cls, monkeypatch):
    """The norm pass's refreshed projector is the one the update pass applies: as many SVDs as with "hold"."""
    from galore_kernels.optim import galore_adamw

    calls = []
    compute_projectors = galore_adamw.compute_projectors

    def counted(*args, **kwargs):
        calls.append(1)
        return compute_projectors(*args, **kwargs)

    monkeypatch.setattr(galore_adamw, "compute_projectors", counted)
    svds = {}
    for strategy in ("hold", "two_pass"):
        model = make_model()
        optimizer = cls(param_groups(model), lr=3e-3, svd="randomized", backend="torch", layerwise=True,
                        clip_strategy=strategy, max_grad_norm=0.02)
        calls.clear()
        data = batches(5)  # refreshes at steps 0 and 3, of both matrices
        if strategy == "hold":
            run(model, optimizer, data, 1)
        else:
            run_two_pass(model, optimizer, data)
        svds[strategy] = len(calls)
        assert optimizer.refresh_count == len(calls)
        assert not optimizer._norm_pass_projectors
        optimizer.remove_hooks()
    assert svds["two_pass"] == svds["hold"] == 4
