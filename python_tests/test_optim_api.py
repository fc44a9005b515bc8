"""The optimizer classes as torch.optim.Optimizers: schedulers, groups, checkpoints, input checks,
shape handling and non-finite gradients. CPU, ``backend="torch"``."""

import io
import warnings

import pytest
import torch

import galore_kernels as gk
from galore_kernels import projector

CLASSES = [gk.GaLoreAdamW, gk.GaLoreAdamW8bit]


def _has_extension() -> bool:
    try:
        import galore_kernels._C  # noqa: F401
    except ImportError:
        return False
    return True


SVD_METHODS = [
    "exact",
    pytest.param(
        "randomized",
        marks=pytest.mark.skipif(not _has_extension(), reason="svd='randomized' needs the compiled galore_kernels._C"),
    ),
]


@pytest.fixture(autouse=True)
def _fresh_warn_once():
    """warn_once is per process; clear it so each test sees its own first warning."""
    saved = set(projector._warned)
    projector._warned.clear()
    yield
    projector._warned.clear()
    projector._warned.update(saved)


def _galore_group(params, rank=8, gap=200, proj_type="std", scale=0.25):
    return {"params": params, "rank": rank, "update_proj_gap": gap, "scale": scale, "proj_type": proj_type}


# ------------------------------------------------------------------ torch.optim integration


@pytest.mark.parametrize("cls", CLASSES)
def test_is_a_torch_optimizer_and_schedulers_drive_lr(cls):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(33, 50, generator=gen).requires_grad_()
    bias = torch.randn(50, generator=gen).requires_grad_()
    opt = cls([_galore_group([weight]), {"params": [bias]}], lr=1e-2, weight_decay=0.0, svd="exact", backend="torch")
    assert isinstance(opt, torch.optim.Optimizer)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    deltas = []
    for _ in range(2):
        before = bias.detach().clone()
        bias.grad = torch.randn(50, generator=gen)
        weight.grad = torch.randn(33, 50, generator=gen)
        opt.step()
        scheduler.step()
        deltas.append(float((bias.detach() - before).abs().max()))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-4, 1e-4])
    # Adam's first steps move each coordinate by about lr: the second step used lr = 1e-3.
    assert deltas[0] == pytest.approx(1e-2, rel=0.2)
    assert deltas[1] == pytest.approx(1e-3, rel=0.5)

    frozen = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=lambda epoch: 0.0)
    assert all(g["lr"] == 0.0 for g in opt.param_groups)
    before = (weight.detach().clone(), bias.detach().clone())
    weight.grad, bias.grad = torch.randn(33, 50, generator=gen), torch.randn(50, generator=gen)
    opt.step()
    frozen.step()
    assert torch.equal(weight.detach(), before[0]) and torch.equal(bias.detach(), before[1]), "lr=0 must not move"


@pytest.mark.parametrize("cls", CLASSES)
def test_add_param_group_and_zero_grad(cls):
    gen = torch.Generator().manual_seed(1)
    first = torch.randn(8, generator=gen).requires_grad_()
    opt = cls([first], lr=1e-2, svd="exact", backend="torch")
    weight = torch.randn(96, 160, generator=gen).requires_grad_()
    plain = torch.randn(5, 7, generator=gen).requires_grad_()
    opt.add_param_group(_galore_group([weight], rank=48))
    opt.add_param_group({"params": [plain], "lr": 1e-3})
    assert len(opt.param_groups) == 3 and opt.param_groups[1]["rank"] == 48
    assert opt.param_groups[2]["lr"] == 1e-3 and opt.param_groups[2]["betas"] == opt.defaults["betas"]
    for p in (first, weight, plain):
        p.grad = torch.randn(p.shape, generator=gen)
    before = [p.detach().clone() for p in (first, weight, plain)]
    opt.step()
    assert all(not torch.equal(p.detach(), b) for p, b in zip((first, weight, plain), before))
    assert opt.state[weight]["proj_left"].shape == (96, 48)  # wide: std projects on the left
    assert "proj_left" not in opt.state[plain] and "proj_right" not in opt.state[plain]

    opt.zero_grad()
    assert all(p.grad is None for p in (first, weight, plain))
    snapshot = [p.detach().clone() for p in (first, weight, plain)]
    opt.step()  # no gradients: nothing moves, no step is counted
    assert all(torch.equal(p.detach(), s) for p, s in zip((first, weight, plain), snapshot))
    assert opt.state[weight]["step"] == 1


# -------------------------------------------------------------------------- checkpoints


def _make_params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(96, 160, generator=gen).to(dtype).requires_grad_()  # low-rank 48x160: 8-bit state
    matrix = torch.randn(67, 71, generator=gen).to(dtype).requires_grad_()  # plain, 8-bit state
    bias = torch.randn(71, generator=gen).to(dtype).requires_grad_()  # plain, fp32 state
    return [weight, matrix, bias]


def _make_opt(cls, params, svd):
    groups = [_galore_group([params[0]], rank=48, gap=4, proj_type="std"), {"params": params[1:]}]
    return cls(groups, lr=1e-2, weight_decay=0.01, svd=svd, backend="torch")


def _train(opt, params, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()


@pytest.mark.parametrize("svd", SVD_METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls", CLASSES)
def test_state_dict_round_trip_is_bit_exact(cls, dtype, svd):
    """3 steps, save, load into a fresh optimizer on fresh params, 4 more steps (a refresh at
    step 4): identical bits to 7 uninterrupted steps."""
    params = _make_params(dtype)
    opt = _make_opt(cls, params, svd)
    _train(opt, params, 3, seed=10)

    buffer = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "params": [p.detach() for p in params]}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)  # no pickled projector objects
    for state in checkpoint["optimizer"]["state"].values():
        for key, value in state.items():
            assert isinstance(value, (torch.Tensor, int, float)) and not isinstance(value, bool), (key, type(value))

    _train(opt, params, 4, seed=11)

    resumed = [p.clone().requires_grad_() for p in checkpoint["params"]]
    resumed_opt = _make_opt(cls, resumed, svd)
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    state = resumed_opt.state[resumed[0]]
    # A 16-bit parameter's projectors are kept in its dtype, fp32 ones in fp32; a load keeps that.
    assert state["proj_left"].dtype == projector.projector_dtype(resumed[0].dtype)
    moments = [k for k in ("exp_avg", "exp_avg_sq", "exp_avg_absmax") if k in state]
    assert moments and all(state[k].dtype == torch.float32 for k in moments)
    assert resumed_opt.state[resumed[2]]["exp_avg"].dtype == torch.float32
    if cls is gk.GaLoreAdamW8bit:
        assert state["exp_avg_codes"].dtype == torch.uint8
        assert resumed_opt.state[resumed[1]]["exp_avg_codes"].dtype == torch.uint8
    _train(resumed_opt, resumed, 4, seed=11)

    for original, restored in zip(params, resumed):
        assert torch.equal(original.detach(), restored.detach())
    for original, restored in zip(params, resumed):
        for key, value in opt.state[original].items():
            other = resumed_opt.state[restored][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, key


# ----------------------------------------------------------------------- input checking


def _one_step(opt, params):
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()


@pytest.mark.parametrize("cls", CLASSES)
def test_bad_group_keys(cls):
    weight = torch.randn(6, 5, requires_grad=True)
    with pytest.raises(ValueError, match=r"proj_type must be one of .*'std'.*got 'diagonal'"):
        cls([_galore_group([weight], proj_type="diagonal")], backend="torch")
    for rank in (0, -1):
        with pytest.raises(ValueError, match=rf"rank must be an int >= 1, got {rank}"):
            cls([_galore_group([weight], rank=rank)], backend="torch")
    for rank in (2.5, "8", True):
        with pytest.raises((ValueError, TypeError), match="rank must be an int"):
            cls([_galore_group([weight], rank=rank)], backend="torch")
    group = _galore_group([weight])
    del group["scale"]
    with pytest.raises(ValueError, match=r"missing key\(s\) \['scale'\]"):
        cls([group], backend="torch")
    with pytest.raises(ValueError, match="update_proj_gap must be an int >= 1"):
        cls([_galore_group([weight], gap=0)], backend="torch")


@pytest.mark.parametrize("cls", CLASSES)
def test_bad_hyperparameters(cls):
    params = [torch.randn(3, requires_grad=True)]
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'torch', 'triton'\), got 'cuda'"):
        cls(params, backend="cuda")
    with pytest.raises(ValueError, match=r"svd must be one of \('randomized', 'exact'\), got 'qr'"):
        cls(params, svd="qr")
    with pytest.raises(ValueError, match="lr=-0.001"):
        cls(params, lr=-1e-3)
    for betas in ((1.0, 0.999), (0.9, -0.1), (-0.1, 0.9)):
        with pytest.raises(ValueError, match=r"betas=.*\[0, 1\)"):
            cls(params, betas=betas)
    with pytest.raises(ValueError, match="accumulation_steps > 1 needs layerwise=True"):
        cls(params, accumulation_steps=2)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(amsgrad=True), "amsgrad"),
        (dict(percentile_clipping=5), "percentile_clipping"),
        (dict(block_wise=False), "block_wise"),
        (dict(is_paged=True), "is_paged"),
    ],
)
def test_unsupported_8bit_arguments(kwargs, name):
    with pytest.raises(ValueError, match=rf"{name}=.* is not supported by GaLoreAdamW8bit \(only"):
        gk.GaLoreAdamW8bit([torch.randn(3, requires_grad=True)], **kwargs)


@pytest.mark.parametrize("cls", CLASSES)
def test_sparse_gradient_is_refused(cls):
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    opt = cls(embedding.parameters(), backend="torch")
    embedding(torch.tensor([1, 3])).sum().backward()
    assert embedding.weight.grad.is_sparse
    with pytest.raises(TypeError, match="sparse gradients"):
        opt.step()


@pytest.mark.parametrize("cls", CLASSES)
def test_complex_parameter_is_refused(cls):
    # (torch itself refuses a complex .grad on a real parameter, so only this case can arise.)
    param = torch.randn(4, 4, dtype=torch.complex64, requires_grad=True)
    opt = cls([_galore_group([param], rank=2)], backend="torch")
    param.grad = torch.ones_like(param)
    with pytest.raises(TypeError, match="does not support complex parameters or gradients"):
        opt.step()


# ------------------------------------------------------------------------ shape handling


@pytest.mark.parametrize("cls", CLASSES)
def test_rank_at_least_min_dim_is_clamped_once_with_a_warning(cls):
    weight = torch.randn(33, 50, requires_grad=True)
    opt = cls([_galore_group([weight], rank=64)], svd="exact", backend="torch")
    with pytest.warns(RuntimeWarning, match=r"rank=64 >= min\(m, n\) for a 33x50 parameter: clamped to 33"):
        _one_step(opt, [weight])
    assert opt.state[weight]["proj_left"].shape == (33, 33)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per process: a second step is silent
        _one_step(opt, [weight])


@pytest.mark.parametrize("cls", CLASSES)
def test_1d_param_in_galore_group_is_plain_adamw(cls):
    gen = torch.Generator().manual_seed(2)
    start = torch.randn(50, generator=gen)
    in_galore = start.clone().requires_grad_()
    in_plain = start.clone().requires_grad_()
    galore_opt = cls([_galore_group([in_galore])], lr=1e-2, svd="exact", backend="torch")
    plain_opt = cls([in_plain], lr=1e-2, svd="exact", backend="torch")
    for step in range(3):
        grad = torch.randn(50, generator=gen)
        in_galore.grad, in_plain.grad = grad.clone(), grad.clone()
        if step == 0:
            with pytest.warns(RuntimeWarning, match="1-D parameters in a GaLore group take plain AdamW"):
                galore_opt.step()
        else:
            galore_opt.step()
        plain_opt.step()
    assert torch.equal(in_galore.detach(), in_plain.detach())
    assert "proj_left" not in galore_opt.state[in_galore] and "proj_right" not in galore_opt.state[in_galore]


@pytest.mark.parametrize("cls", CLASSES)
def test_nd_param_is_a_first_dim_by_rest_matrix(cls):
    """A 4x3x5 (conv-like) weight is GaLore'd exactly as the 4x15 matrix it reshapes to."""
    gen = torch.Generator().manual_seed(3)
    start = torch.randn(4, 3, 5, generator=gen)
    conv = start.clone().requires_grad_()
    matrix = start.reshape(4, 15).clone().requires_grad_()
    conv_opt = cls([_galore_group([conv], rank=2, gap=2)], lr=1e-2, svd="exact", backend="torch")
    matrix_opt = cls([_galore_group([matrix], rank=2, gap=2)], lr=1e-2, svd="exact", backend="torch")
    for _ in range(4):
        grad = torch.randn(4, 3, 5, generator=gen)
        conv.grad, matrix.grad = grad.clone(), grad.reshape(4, 15).clone()
        conv_opt.step()
        matrix_opt.step()
    assert conv.shape == (4, 3, 5)
    assert conv_opt.state[conv]["proj_left"].shape == (4, 2)  # 4 < 15: std projects on the left
    assert torch.equal(conv.detach().reshape(4, 15), matrix.detach())


@pytest.mark.parametrize("cls", CLASSES)
def test_channels_last_conv_weight_is_updated_like_a_contiguous_one(cls):
    """Its trailing dimensions cannot be viewed as one: the step must not land in a reshape copy."""
    gen = torch.Generator().manual_seed(5)
    start = torch.randn(8, 3, 4, 4, generator=gen)
    strided = start.clone().to(memory_format=torch.channels_last).requires_grad_()
    contiguous = start.clone().requires_grad_()
    assert not strided.is_contiguous()
    optimizers = [cls([_galore_group([p], rank=2, gap=2)], lr=1e-2, svd="exact", backend="torch")
                  for p in (strided, contiguous)]
    for _ in range(3):
        grad = torch.randn(8, 3, 4, 4, generator=gen)
        strided.grad, contiguous.grad = grad.to(memory_format=torch.channels_last), grad.clone()
        for optimizer in optimizers:
            optimizer.step()
    assert not torch.equal(strided, start)
    assert torch.equal(strided, contiguous)


@pytest.mark.parametrize("galore", [True, False])
@pytest.mark.parametrize("cls", CLASSES)
def test_non_contiguous_gradient(cls, galore):
    gen = torch.Generator().manual_seed(4)
    shape = (96, 160)  # 8-bit state either way
    start = torch.randn(shape, generator=gen)
    strided = start.clone().requires_grad_()
    contiguous = start.clone().requires_grad_()

    def make(p):
        groups = [_galore_group([p], rank=48, gap=2)] if galore else [p]
        return cls(groups, lr=1e-2, svd="exact", backend="torch")

    strided_opt, contiguous_opt = make(strided), make(contiguous)
    for _ in range(3):
        transposed = torch.randn(shape[::-1], generator=gen)
        strided.grad = transposed.t()
        assert not strided.grad.is_contiguous()
        contiguous.grad = transposed.t().contiguous()
        strided_opt.step()
        contiguous_opt.step()
    assert torch.equal(strided.detach(), contiguous.detach())


# --------------------------------------------------------------------- non-finite gradients


def _snapshot(opt, params):
    state = {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()} for p in params}
    return [p.detach().clone() for p in params], state


def _assert_unchanged(opt, params, snapshot):
    values, state = snapshot
    for p, before in zip(params, values):
        assert torch.equal(p.detach(), before)
        for key, value in opt.state[p].items():
            if key in ("step", "nonfinite_skips", "nonfinite_flag"):
                continue  # an attempted update is counted, see below
            old = state[id(p)][key]
            assert torch.equal(value, old) if torch.is_tensor(value) else value == old, key
        # The persistent flag holds the stamp (the step) of the skipped update.
        assert opt.state[p]["nonfinite_flag"].item() == opt.state[p]["step"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("cls", CLASSES)
def test_nonfinite_gradient_skips_the_update(cls, bad):
    gen = torch.Generator().manual_seed(5)
    # GaLore with 8-bit low-rank state, plain with 8-bit state, plain with fp32 state.
    params = [torch.randn(shape, generator=gen).requires_grad_() for shape in ((96, 160), (67, 71), (71,))]
    groups = [_galore_group(params[:1], rank=48, gap=2), {"params": params[1:]}]
    opt = cls(groups, lr=1e-2, svd="exact", backend="torch")

    def grads(poison):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
            if poison:
                p.grad.view(-1)[p.numel() // 2] = bad

    grads(False)
    opt.step()  # step 1: refresh, finite
    assert opt.nonfinite_skips == 0

    snapshot = _snapshot(opt, params)
    grads(True)
    opt.step()  # step 2: not a refresh step
    _assert_unchanged(opt, params, snapshot)
    assert opt.nonfinite_skips == 3
    assert [opt.state[p]["step"] for p in params] == [2, 2, 2]

    snapshot = _snapshot(opt, params)
    grads(True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the skipped refresh warns once
        opt.step()  # step 3: a refresh step; the projector is kept
    _assert_unchanged(opt, params, snapshot)
    assert opt.nonfinite_skips == 6

    before = [p.detach().clone() for p in params]
    grads(False)
    opt.step()
    assert opt.nonfinite_skips == 6
    for p, old in zip(params, before):
        assert bool(torch.isfinite(p).all()) and not torch.equal(p.detach(), old)
        for value in opt.state[p].values():
            if torch.is_tensor(value) and value.is_floating_point():
                assert bool(torch.isfinite(value).all())


@pytest.mark.parametrize("cls", CLASSES)
def test_nonfinite_gradient_in_one_param_does_not_block_others(cls):
    gen = torch.Generator().manual_seed(6)
    good = torch.randn(40, 30, generator=gen).requires_grad_()
    poisoned = torch.randn(40, 30, generator=gen).requires_grad_()
    opt = cls([_galore_group([good, poisoned], rank=4)], lr=1e-2, svd="exact", backend="torch")
    good.grad, poisoned.grad = torch.randn(40, 30, generator=gen), torch.randn(40, 30, generator=gen)
    opt.step()
    before_good, before_poisoned = good.detach().clone(), poisoned.detach().clone()
    good.grad = torch.randn(40, 30, generator=gen)
    poisoned.grad = torch.full((40, 30), float("nan"))
    opt.step()
    assert opt.nonfinite_skips == 1
    assert not torch.equal(good.detach(), before_good)
    assert torch.equal(poisoned.detach(), before_poisoned)


@pytest.mark.parametrize("cls", [gk.GaLoreAdamW, gk.GaLoreAdamW8bit])
def test_group_hyperparameters_are_checked_like_the_constructors(cls):
    p = torch.nn.Parameter(torch.randn(8, 6))
    galore = dict(rank=2, update_proj_gap=10, scale=0.25, proj_type="std")
    with pytest.raises(ValueError, match="betas"):
        cls([{"params": [p], "betas": (1.5, 0.9), **galore}], backend="torch")
    optimizer = cls([torch.nn.Parameter(torch.randn(3))], backend="torch")
    with pytest.raises(ValueError, match="learning rate"):
        optimizer.add_param_group({"params": [p], "lr": -1.0})
    with pytest.raises(TypeError, match="lr must be a number"):
        cls([p], lr=None, backend="torch")
    with pytest.raises(TypeError, match="betas must be a pair"):
        cls([p], betas=0.9, backend="torch")
    # eps = 0 would make a zero gradient entry 0/0 = NaN in the update.
    with pytest.raises(ValueError, match="eps"):
        cls([p], eps=0.0, backend="torch")


def test_a_parameter_twice_in_a_group_is_refused():
    p = torch.nn.Parameter(torch.randn(8, 6))
    with pytest.raises(ValueError, match="more than once"):
        gk.GaLoreAdamW([{"params": [p, p], "rank": 2, "update_proj_gap": 10, "scale": 0.25, "proj_type": "std"}],
                    backend="torch")


def test_a_zero_size_parameter_in_a_galore_group_steps_like_torch():
    empty, p = torch.nn.Parameter(torch.randn(0, 4)), torch.nn.Parameter(torch.randn(8, 6))
    optimizer = gk.GaLoreAdamW([{"params": [empty, p], "rank": 2, "update_proj_gap": 10, "scale": 0.25,
                              "proj_type": "std"}], backend="torch")
    for param in (empty, p):
        param.grad = torch.randn(param.shape)
    optimizer.step()
    assert empty.shape == (0, 4) and optimizer.state[empty]["step"] == 1
    assert "proj_left" not in optimizer.state[empty] and "proj_right" not in optimizer.state[empty]


def test_loading_another_classs_checkpoint_names_what_is_missing():
    p = torch.nn.Parameter(torch.randn(8, 6))
    saved = gk.GaLoreAdafactor([p], lr=1e-3, relative_step=False, backend="torch").state_dict()
    with pytest.raises(ValueError, match=r"lacks \['betas'\].*another optimizer class"):
        gk.GaLoreAdamW([p], backend="torch").load_state_dict(saved)
