"""Checkpoints from elsewhere: another model's, another class's, and galore-torch 1.0's (CPU).

The galore-torch checkpoints are made by galore-torch itself (GaLoreAdamW, and GaLoreAdamW8bit
on bitsandbytes' CPU path with ``torch.cuda.synchronize`` patched out, as in
test_reference_parity.py), saved with ``torch.save`` and read back with ``weights_only=True``.
"""

import io
import warnings

import pytest
import torch

import galore_kernels as gk
from galore_kernels import quant

BNB_PARAM_MEAN_ABS, BNB_PARAM_MEAN_REL = 6e-5, 6e-4  # bitsandbytes' own fp32 parameter tolerances


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # galore-torch's deprecation notice, our clamp notices
        yield


def galore_group(params, rank=48, gap=3, proj_type="std"):
    return {"params": params, "rank": rank, "update_proj_gap": gap, "scale": 0.25, "proj_type": proj_type}


def round_trip(state_dict, safe=()):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    with torch.serialization.safe_globals(list(safe)):
        return torch.load(buffer, weights_only=True)


def train(optimizer, params, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()


def make_params(shape=(72, 96), seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=generator).requires_grad_()
    bias = torch.randn(shape[0], generator=generator).requires_grad_()
    return weight, bias


# ------------------------------------------------------------------- validation


@pytest.mark.parametrize("cls", [gk.GaLoreAdamW, gk.GaLoreAdamW8bit])
def test_another_models_checkpoint_is_refused_naming_the_parameter(cls):
    weight, bias = make_params((72, 96))
    optimizer = cls([galore_group([weight]), {"params": [bias]}], backend="torch")
    train(optimizer, [weight, bias], 1, seed=0)
    saved = round_trip(optimizer.state_dict())
    other = torch.nn.Linear(80, 72)  # same number of parameters per group, another shape
    target = cls(
        [dict(galore_group([]), params=[("layer.weight", other.weight)]), {"params": [("layer.bias", other.bias)]}],
        backend="torch",
    )
    with pytest.raises(ValueError, match=r"parameter 'layer.weight' \(group 0, position 0, shape \(72, 80\)\)"):
        target.load_state_dict(saved)


def test_a_state_with_an_unknown_key_is_refused():
    weight, bias = make_params()
    optimizer = gk.GaLoreAdamW([galore_group([weight]), {"params": [bias]}], backend="torch")
    train(optimizer, [weight, bias], 1, seed=0)
    saved = round_trip(optimizer.state_dict())
    saved["state"][1]["projector"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"position 0, shape \(72,\).*unexpected \['projector'\]"):
        gk.GaLoreAdamW([galore_group([weight]), {"params": [bias]}], backend="torch").load_state_dict(saved)


def test_fp32_checkpoint_is_quantized_into_the_8bit_class():
    weight, bias = make_params()
    bias_big = torch.randn(4099).requires_grad_()  # a plain parameter with an 8-bit state
    source = gk.GaLoreAdamW([galore_group([weight]), {"params": [bias, bias_big]}], eps=1e-8, weight_decay=1e-2, backend="torch")
    train(source, [weight, bias, bias_big], 3, seed=0)
    saved = round_trip(source.state_dict())
    target = gk.GaLoreAdamW8bit([galore_group([weight]), {"params": [bias, bias_big]}], backend="torch")
    target.load_state_dict(saved)
    for p, side in ((weight, "left"), (bias_big, None)):
        state, fp32 = target.state[p], source.state[p]
        assert "exp_avg" not in state and state["exp_avg_codes"].dtype == torch.uint8
        for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            values = quant.dequantize_blockwise(state[f"{name}_codes"], state[f"{name}_absmax"], signed=signed)
            expected = fp32[name] if side is None else quant.to_lowrank_layout(fp32[name], side)
            # One rounding to the dynamic map: within its widest gap near 1 (0.0156) of each block's absmax.
            error = (values - expected).abs().reshape(-1)
            assert float(error.max()) <= 0.0157 * float(expected.abs().max())
    assert "exp_avg" in target.state[bias]  # 72 values: fp32, as bitsandbytes keeps small states
    train(target, [weight, bias, bias_big], 1, seed=1)  # and it steps


def test_8bit_checkpoint_into_the_fp32_class_is_refused():
    weight, bias = make_params()
    source = gk.GaLoreAdamW8bit([galore_group([weight]), {"params": [bias]}], backend="torch")
    train(source, [weight, bias], 1, seed=0)
    target = gk.GaLoreAdamW([galore_group([weight]), {"params": [bias]}], backend="torch")
    with pytest.raises(ValueError, match="8-bit moments.*GaLoreAdamW8bit"):
        target.load_state_dict(round_trip(source.state_dict()))


# ------------------------------------------------------------------- galore-torch

galore_torch = pytest.importorskip("galore_torch")
from galore_torch.galore_projector import GaLoreProjector  # noqa: E402


@pytest.mark.parametrize("proj_type, shape", [("std", (72, 96)), ("std", (96, 72)), ("full", (40, 56))])
def test_galore_torch_adamw_checkpoint_continues_as_galore_torch_would(proj_type, shape):
    """Train 4 steps with galore-torch, switch to ours through its checkpoint for 5 more
    (a refresh at step 6 included): the same weights as galore-torch's 9 steps, to fp32 rounding."""
    rank = 16 if proj_type == "full" else 48

    def groups(weight, bias):
        return [galore_group([weight], rank=rank, proj_type=proj_type), {"params": [bias]}]

    hyper = dict(lr=1e-2, weight_decay=0.1)
    ref_weight, ref_bias = make_params(shape)
    reference = galore_torch.GaLoreAdamW(groups(ref_weight, ref_bias), no_deprecation_warning=True, **hyper)
    train(reference, [ref_weight, ref_bias], 4, seed=0)

    weight, bias = (ref_weight.detach().clone().requires_grad_(), ref_bias.detach().clone().requires_grad_())
    saved = round_trip(reference.state_dict(), safe=[GaLoreProjector])
    ours = gk.GaLoreAdamW(groups(weight, bias), backend="torch", **hyper)
    ours.load_state_dict(gk.convert_galore_torch_state_dict(saved))
    assert ours.param_groups[0]["svd"] == "exact" and ours.state[weight]["step"] == 4

    start = ref_weight.detach().clone()
    train(reference, [ref_weight, ref_bias], 5, seed=1)
    train(ours, [weight, bias], 5, seed=1)
    assert float((ref_weight - start).abs().max()) > 1e-2, "the run must move the weight"
    # Same SVD, same Adam math, ops in another order (see test_reference_parity.py's tolerances).
    tol = 1e-5 if proj_type == "full" else 1e-6
    assert float((weight - ref_weight).abs().max() / ref_weight.abs().max()) <= tol
    assert float((bias - ref_bias).abs().max() / ref_bias.abs().max()) <= 1e-6


@pytest.mark.parametrize("shape, proj_type", [((72, 96), "std"), ((160, 96), "std")])
def test_galore_torch_8bit_checkpoint_continues_within_bitsandbytes_tolerance(monkeypatch, shape, proj_type):
    """galore-torch's GaLoreAdamW8bit (bitsandbytes state1/state2/absmax/qmap) -> ours, then 6 more steps."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)

    def make(seed=0):
        generator = torch.Generator().manual_seed(seed)
        values = torch.randn(shape, generator=generator)
        weight = (torch.sign(values) * (0.05 + 0.1 * values.abs())).requires_grad_()  # away from zero: relative errors
        values = torch.randn(67 * 71, generator=generator)
        bias = (torch.sign(values) * (0.05 + 0.1 * values.abs())).requires_grad_()  # plain group, 8-bit state
        return weight, bias

    def groups(weight, bias):
        return [galore_group([weight], rank=48, gap=4, proj_type=proj_type), {"params": [bias]}]

    ref_weight, ref_bias = make()
    reference = galore_torch.GaLoreAdamW8bit(groups(ref_weight, ref_bias), lr=1e-3, weight_decay=1e-2)
    train(reference, [ref_weight, ref_bias], 5, seed=0)
    saved = round_trip(reference.state_dict(), safe=[GaLoreProjector])
    assert saved["state"][0]["__bnb_optimizer_quant_state__"]["state1"].dtype == torch.uint8, "8-bit state expected"

    weight, bias = (ref_weight.detach().clone().requires_grad_(), ref_bias.detach().clone().requires_grad_())
    ours = gk.GaLoreAdamW8bit(groups(weight, bias), lr=1e-3, weight_decay=1e-2, backend="torch")
    converted = gk.convert_galore_torch_state_dict(saved)
    ours.load_state_dict(converted)
    state, theirs = ours.state[weight], reference.state[ref_weight]
    side = "left" if shape[0] < shape[1] else "right"
    torch.testing.assert_close(state[f"proj_{side}"], theirs["projector"].ortho_matrix, rtol=0, atol=0)
    for name, signed, codes, absmax, qmap in (
        ("exp_avg", True, "state1", "absmax1", "qmap1"), ("exp_avg_sq", False, "state2", "absmax2", "qmap2"),
    ):
        their_values = theirs[qmap][theirs[codes].long()].reshape(-1)
        their_values = (their_values.view(-1, 256) * theirs[absmax][:, None]).view(theirs[codes].shape)
        ours_values = quant.dequantize_blockwise(state[f"{name}_codes"], state[f"{name}_absmax"], signed=signed)
        expected = quant.to_lowrank_layout(their_values, side)
        assert float((ours_values - expected).abs().max()) <= 0.0157 * float(expected.abs().max())

    start = ref_weight.detach().clone()
    train(reference, [ref_weight, ref_bias], 6, seed=1)
    train(ours, [weight, bias], 6, seed=1)
    for mine, reference_param, initial in ((weight, ref_weight, start), (bias, ref_bias, None)):
        error = (mine - reference_param).abs()
        assert float(error.mean()) < BNB_PARAM_MEAN_ABS
        assert float((error / (reference_param.abs() + 1e-9)).mean()) < BNB_PARAM_MEAN_REL
    assert float((weight - ref_weight).abs().mean()) <= 0.05 * float((ref_weight - start).abs().mean())


def test_galore_torch_checkpoint_loads_only_with_the_projector_allowed():
    weight, bias = make_params()
    reference = galore_torch.GaLoreAdamW([galore_group([weight]), {"params": [bias]}], no_deprecation_warning=True)
    train(reference, [weight, bias], 1, seed=0)
    with pytest.raises(Exception, match="GaLoreProjector"):
        round_trip(reference.state_dict())
    with pytest.raises(ValueError, match="exactly the keys"):
        gk.convert_galore_torch_state_dict({"state": {}})
