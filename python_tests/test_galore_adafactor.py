"""GaLoreAdafactor: parity with galore-torch 1.0's ``GaLoreAdafactor`` on CPU, and its API.

galore-torch's class is transformers' Adafactor with the gradient projected; ours
runs the reference step (``backend="torch"``) with ``svd="exact"`` (galore-torch's
SVD call). Runs cross refreshes (gap 3, 10 steps) with a GaLore weight, a plain
1-D bias (unfactored) and a plain 3-D tensor (factored over its last two dims).
"""

import io
import os
import warnings

import pytest
import torch

import galore_kernels as gk

galore_torch = pytest.importorskip("galore_torch")
pytest.importorskip("transformers")  # galore-torch's Adafactor module imports it

PROJ_TYPES = ["std", "reverse_std", "left", "right", "full"]
SHAPES = {"tall": (50, 33), "wide": (33, 50), "square": (40, 40)}
CONFIGS = {
    "relative-step": dict(),
    "beta1-decay": dict(beta1=0.9, weight_decay=0.1),
    "manual-lr": dict(lr=1e-2, relative_step=False, scale_parameter=False, beta1=0.5, clip_threshold=0.5),
    # The warm-up lr (1e-6·t) is below fp32 resolution at |W| ~ 1 unless the RMS floor eps2 lifts it.
    "warmup-init": dict(warmup_init=True, decay_rate=-0.5, eps=(1e-20, 1e3)),
}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _run(make_optimizer, shape, proj_type, options, steps=10, param_scale=1.0):
    """Returns the (start, end) of every parameter."""
    gen = torch.Generator().manual_seed(0)
    weight = (param_scale * torch.randn(shape, generator=gen)).requires_grad_()
    bias = (param_scale * torch.randn(shape[0], generator=gen)).requires_grad_()
    kernel = (param_scale * torch.randn(3, 4, 5, generator=gen)).requires_grad_()
    params = (weight, bias, kernel)
    starts = [p.detach().clone() for p in params]
    groups = [{"params": [weight], "rank": 8, "update_proj_gap": 3, "scale": 0.25, "proj_type": proj_type},
              {"params": [bias, kernel]}]
    optimizer = make_optimizer(groups, **options)
    for _ in range(steps):  # refreshes at steps 0, 3, 6, 9
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        optimizer.step()
    return list(zip(starts, (p.detach() for p in params)))


def _ours(groups, **options):
    return gk.GaLoreAdafactor(groups, svd="exact", backend="torch", **options)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_fp32_matches_galore_torch(proj_type, shape_name, config):
    """fp32 parameters, both sides fp32: the same SVD, the same math, ops in a different association.

    Judged against max|W| (as the GaLoreAdamW parity test): with ``scale_parameter`` the
    step is lr·RMS(W)·scale, about 2.5e-3 of W, so storing W in fp32 alone moves the
    two runs' updates apart by ~2^-24/2.5e-3 = 2.4e-5 of a step; the update itself is
    judged in ``test_update_matches_galore_torch``. Measured <= 3e-7.
    """
    ours = _run(_ours, SHAPES[shape_name], proj_type, CONFIGS[config])
    theirs = _run(galore_torch.GaLoreAdafactor, SHAPES[shape_name], proj_type, CONFIGS[config])
    for (start, ours_end), (_, theirs_end) in zip(ours, theirs):
        assert float((theirs_end - start).abs().max()) > 1e-3, "the run must move the parameter"
        assert float((ours_end - theirs_end).abs().max() / theirs_end.abs().max()) <= 1e-6


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_update_matches_galore_torch(proj_type, shape_name):
    """The update over 10 steps, within 1e-5 of its largest element.

    With an absolute lr (1e-2, no parameter scaling) and parameters of scale 0.05, W's
    fp32 storage rounding (an ulp of 3.7e-9) is 1.5e-6 of a step, so the criterion
    sees the update's own arithmetic.
    """
    options = dict(CONFIGS["manual-lr"], weight_decay=0.1)
    ours = _run(_ours, SHAPES[shape_name], proj_type, options, param_scale=0.05)
    theirs = _run(galore_torch.GaLoreAdafactor, SHAPES[shape_name], proj_type, options, param_scale=0.05)
    for (start, ours_end), (_, theirs_end) in zip(ours, theirs):
        theirs_update, ours_update = theirs_end - start, ours_end - start
        assert float(theirs_update.abs().max()) > 1e-3, "the run must move the parameter"
        relative = float((ours_update - theirs_update).abs().max() / theirs_update.abs().max())
        assert relative <= 1e-5, relative


def test_constructor_errors():
    params = [torch.nn.Parameter(torch.ones(4, 3))]
    for options, message in (
        (dict(lr=1e-3), "Cannot combine manual `lr` and `relative_step=True`"),
        (dict(warmup_init=True, relative_step=False, lr=1e-3), "warmup_init=True` requires `relative_step=True"),
        (dict(relative_step=False), "lr=None needs relative_step=True"),
        (dict(eps=1e-30), "eps must be a pair"),
        (dict(eps=(1e-30, -1.0)), "eps must be a pair"),
        (dict(clip_threshold=0.0), "clip_threshold must be > 0"),
        (dict(decay_rate=0.8), "decay_rate must be < 0"),
        (dict(beta1=1.0), r"beta1 must be in \[0, 1\) or None"),
        (dict(weight_decay=-0.1), "Invalid weight_decay"),
        (dict(lr=-1.0, relative_step=False), "Invalid learning rate"),
    ):
        with pytest.raises(ValueError, match=message):
            gk.GaLoreAdafactor(params, **options)


def test_state_dict_round_trip_resumes_bit_exactly():
    def run(steps, checkpoint=None, start=0):
        gen = torch.Generator().manual_seed(1)
        grads = [torch.randn(30, 20, generator=gen) for _ in range(steps)]
        weight = torch.nn.Parameter(torch.ones(30, 20))
        groups = [{"params": [weight], "rank": 4, "update_proj_gap": 3, "scale": 0.25, "proj_type": "std"}]
        optimizer = gk.GaLoreAdafactor(groups, beta1=0.9, backend="torch")
        if checkpoint is not None:
            weight.data.copy_(checkpoint["weight"])
            optimizer.load_state_dict(checkpoint["optimizer"])
        for grad in grads[start:]:
            weight.grad = grad
            optimizer.step()
        return weight, optimizer

    full, _ = run(8)
    part, optimizer = run(5)
    buffer = io.BytesIO()
    torch.save({"weight": part.detach(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    resumed, _ = run(8, torch.load(buffer, weights_only=True), start=5)
    assert torch.equal(resumed, full)


@pytest.mark.parametrize("layerwise", [False, True])
def test_layerwise_matches_step(layerwise):
    """The shared engine: layerwise updates in backward give the same result as step()."""
    gen = torch.Generator().manual_seed(2)
    data = torch.randn(16, 20, generator=gen)
    results = []
    for mode in (False, layerwise):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(20, 24), torch.nn.Tanh(), torch.nn.Linear(24, 3))
        groups = [{"params": [model[0].weight, model[2].weight], "rank": 4, "update_proj_gap": 2, "scale": 0.25,
                   "proj_type": "std"}, {"params": [model[0].bias, model[2].bias]}]
        optimizer = gk.GaLoreAdafactor(groups, backend="torch", layerwise=mode)
        for _ in range(5):
            model(data).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("options, error, message", [
    (dict(eps=(None, 1e-3)), ValueError, "eps must be a pair"),
    # eps1 = 0: an exactly-zero gradient row gives rsqrt(0)·0 = NaN in the factored update, and
    # the update's RMS clip spreads it over the whole parameter.
    (dict(eps=(0.0, 1e-3)), ValueError, "eps must be a pair"),
    (dict(clip_threshold=None), TypeError, "clip_threshold must be a number"),
    (dict(decay_rate=None), TypeError, "decay_rate must be a number"),
    (dict(weight_decay=None), TypeError, "weight_decay must be a number"),
    (dict(lr="1e-3", relative_step=False), TypeError, "lr must be a number"),
    (dict(beta1="0.9"), TypeError, "beta1 must be a number"),
])
def test_constructor_errors_name_the_argument(options, error, message):
    with pytest.raises(error, match=message):
        gk.GaLoreAdafactor([torch.nn.Parameter(torch.ones(4, 3))], **options)


@pytest.mark.parametrize("group, message", [
    (dict(eps=(1e-30, -1.0)), "eps must be a pair"),
    (dict(clip_threshold=0.0), "clip_threshold must be > 0"),
    (dict(decay_rate=0.5), "decay_rate must be < 0"),
    (dict(beta1=1.0), r"beta1 must be in \[0, 1\) or None"),
    (dict(weight_decay=-0.1), "Invalid weight_decay"),
    # The relative step would silently replace this group's lr.
    (dict(lr=1e-2), "Cannot combine manual `lr` and `relative_step=True`"),
])
def test_param_groups_are_checked_like_the_constructor(group, message):
    """A group's own hyperparameters, in the constructor's list or through add_param_group, are
    checked as the constructor's arguments are: otherwise a negative eps or beta1 = 1 steps silently."""
    weight, other = torch.nn.Parameter(torch.ones(4, 3)), torch.nn.Parameter(torch.ones(5, 2))
    with pytest.raises(ValueError, match=message):
        gk.GaLoreAdafactor([{"params": [weight], **group}], backend="torch")
    optimizer = gk.GaLoreAdafactor([weight], backend="torch")
    with pytest.raises(ValueError, match=message):
        optimizer.add_param_group({"params": [other], **group})
    assert len(optimizer.param_groups) == 1


def test_a_parameter_twice_in_a_group_is_refused():
    """torch only warns, and step() then updates the parameter twice per step (two steps'
    worth of moments and refresh schedule) while its twin in a clean group moves once."""
    weight = torch.nn.Parameter(torch.ones(4, 3))
    group = {"params": [weight, weight], "rank": 2, "update_proj_gap": 2, "scale": 0.25, "proj_type": "std"}
    with pytest.raises(ValueError, match="appears more than once"):
        gk.GaLoreAdafactor([group], backend="torch")
    optimizer = gk.GaLoreAdafactor([torch.nn.Parameter(torch.ones(5, 2))], backend="torch")
    with pytest.raises(ValueError, match="appears more than once"):
        optimizer.add_param_group({"params": [weight, weight]})


def test_loading_another_optimizers_checkpoint_names_what_is_missing():
    """A GaLoreAdamW checkpoint has no Adafactor hyperparameters in its groups: refused by name,
    not a KeyError from inside the state check (or, for a group without state, at a later step)."""
    weight = torch.nn.Parameter(torch.ones(6, 5))
    galore = {"rank": 2, "update_proj_gap": 2, "scale": 0.25, "proj_type": "std"}
    adamw = gk.GaLoreAdamW([{"params": [weight], **galore}], backend="torch")
    weight.grad = torch.ones(6, 5)
    adamw.step()
    optimizer = gk.GaLoreAdafactor([{"params": [weight], **galore}], backend="torch")
    with pytest.raises(ValueError, match=r"param group 0 .* lacks .*'beta1'"):
        optimizer.load_state_dict(adamw.state_dict())


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="the Triton kernels need CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("galore", [False, True])
def test_transposed_parameter_with_the_kernels_steps_like_a_contiguous_one(galore):
    """A transposed-view (non-contiguous 2-D) parameter: the plain Adafactor kernel takes only a
    contiguous one, and the optimizer stepped the view itself, so backend="auto" on CUDA refused
    a plain group holding one. It is stepped in a contiguous copy now, as N-d parameters are."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(5, 6, generator=gen)
    grads = [torch.randn(6, 5, generator=gen) for _ in range(3)]
    keys = {"rank": 2, "update_proj_gap": 2, "scale": 0.25, "proj_type": "std"} if galore else {}
    results = []
    for view in (True, False):
        weight = torch.nn.Parameter(base.clone().to(device).t() if view else base.t().contiguous().to(device))
        optimizer = gk.GaLoreAdafactor([{"params": [weight], **keys}], beta1=0.9, backend="triton")
        for grad in grads:
            weight.grad = grad.to(device)
            optimizer.step()
        assert weight.is_contiguous() is not view  # the view itself was updated, not replaced
        results.append(weight.detach().cpu())
    assert not torch.equal(results[1], base.t())
    assert torch.equal(results[0], results[1])
