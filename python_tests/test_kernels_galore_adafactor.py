"""kernels/galore_adafactor.py against reference/galore_adafactor.py, and a planted defect per stage.

As test_kernels_galore_adamw.py: each step starts kernel and reference from the same
state, the projector is replaced at the third step (a refresh), gradients cycle
through contiguous, transposed and sliced layouts, and every ``torch.empty`` the
launcher allocates is NaN-filled. Tolerances: the state to rtol 1e-5 (sums in another
order); fp32 parameters to rtol 1e-5 / atol 1e-6; 16-bit parameters judged by the
update against an fp32 twin (``assert_param_close``).
"""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
from test_kernels_adamw8bit import DEVICE, assert_param_close, needs_triton_backend  # noqa: F401
from test_kernels_galore_adamw import gradient, low_rank_shape, make_projectors, poisoned_empty

import galore_kernels.kernels.galore_adafactor as kernel_module
import galore_kernels as gk
from galore_kernels import reference
from galore_kernels.kernels import galore_adafactor_step

PARAM_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# lr 0.5 with scale_parameter (lr_t = lr·RMS(W)): a projected, scale-0.25
# step then spans several bf16 ulps.
HYPER = dict(lr=0.5, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8, scale=0.25)


def _state(shape, factored: bool, beta1, gen):
    state = dict(exp_avg_sq_row=None, exp_avg_sq_col=None, exp_avg_sq=None, exp_avg=None)
    if factored:
        state["exp_avg_sq_row"] = (torch.rand(shape[:-1], generator=gen) * 0.01).to(DEVICE)
        state["exp_avg_sq_col"] = (torch.rand(shape[:-2] + shape[-1:], generator=gen) * 0.01).to(DEVICE)
    else:
        state["exp_avg_sq"] = (torch.rand(shape, generator=gen) * 0.01).to(DEVICE)
    if beta1 is not None:
        state["exp_avg"] = (torch.randn(shape, generator=gen) * 0.01).to(DEVICE)
    return state


def _clone(state):
    return {k: (v.clone() if v is not None else None) for k, v in state.items()}


def _args(state):
    return state["exp_avg_sq_row"], state["exp_avg_sq_col"], state["exp_avg_sq"], state["exp_avg"]


def run_steps(side, m, n, rank, dtype, *, weight_decay=0.1, beta1=0.9, scale_parameter=True, steps=3, gen=None):
    gen = gen or torch.Generator().manual_seed(0)
    param = (torch.randn(m, n, generator=gen) * 0.5).to(DEVICE, dtype)
    shape = low_rank_shape(side, m, n, rank)
    state = _state(shape, True, beta1, gen)
    skips = torch.zeros((), dtype=torch.int64, device=DEVICE)
    hyper = dict(HYPER, weight_decay=weight_decay, beta1=beta1, scale_parameter=scale_parameter)
    projectors = make_projectors(side, m, n, rank, dtype, gen)
    for step in range(1, steps + 1):
        if step == 3:
            projectors = make_projectors(side, m, n, rank, dtype, gen)
        proj = dict(proj_left=projectors[0], proj_right=projectors[1])
        grad = gradient(step, m, n, dtype, gen)
        ref_param, ref_state, ref_skips = param.clone(), _clone(state), skips.clone()
        before, ref_fp32 = param.clone(), param.to(torch.float32, copy=True)
        reference.galore_adafactor_step(ref_param, grad, *_args(ref_state), ref_skips, step=step, **proj, **hyper)
        reference.galore_adafactor_step(ref_fp32, grad, *_args(_clone(state)), skips.clone(), step=step, **proj, **hyper)
        with poisoned_empty():
            galore_adafactor_step(param, grad, *_args(state), skips, step=step, **proj, **hyper)
        assert_param_close(param, ref_param, ref_fp32, before)
        for key, value in state.items():
            if value is not None:
                torch.testing.assert_close(value, ref_state[key], rtol=1e-5, atol=1e-6 * ref_state[key].abs().max().item())
        assert torch.equal(skips, ref_skips)
    return param, state


@pytest.mark.parametrize("dtype", PARAM_DTYPES)
@pytest.mark.parametrize("side", ["none", "left", "right", "full"])
def test_matches_reference(side, dtype):
    run_steps(side, 37, 53, 5, dtype)


@pytest.mark.parametrize("options", [dict(beta1=None), dict(weight_decay=0.0), dict(scale_parameter=False)])
@pytest.mark.parametrize("side", ["none", "right"])
def test_options(side, options):
    run_steps(side, 37, 53, 5, torch.float32, **options)


@pytest.mark.parametrize("shape", [(300,), (3, 4, 5), (2, 3, 17, 9)])
def test_plain_parameter_any_shape(shape):
    """1-D is unfactored; N-d is factored over its last two dims, as a batch."""
    gen = torch.Generator().manual_seed(2)
    param = torch.randn(shape, generator=gen).to(DEVICE)
    state = _state(shape, len(shape) >= 2, 0.9, gen)
    skips = torch.zeros((), dtype=torch.int64, device=DEVICE)
    ref_param, ref_state = param.clone(), _clone(state)
    grad = torch.randn(shape, generator=gen).to(DEVICE)
    hyper = dict(HYPER, proj_left=None, proj_right=None, weight_decay=0.1, beta1=0.9, scale_parameter=True, step=2)
    with poisoned_empty():
        galore_adafactor_step(param, grad, *_args(state), skips, **hyper)
    reference.galore_adafactor_step(ref_param, grad, *_args(ref_state), skips.clone(), **hyper)
    torch.testing.assert_close(param, ref_param, rtol=1e-5, atol=1e-6)
    for key, value in state.items():
        if value is not None:
            torch.testing.assert_close(value, ref_state[key], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("side", ["none", "left", "right", "full"])
def test_nonfinite_gradient_skips_step(side):
    gen = torch.Generator().manual_seed(3)
    m, n, rank = 37, 53, 5
    param = torch.randn(m, n, generator=gen).to(DEVICE)
    proj_left, proj_right = make_projectors(side, m, n, rank, torch.float32, gen)
    state = _state(low_rank_shape(side, m, n, rank), True, 0.9, gen)
    before = [param.clone(), *[v.clone() for v in state.values() if v is not None]]
    grad = torch.randn(m, n, generator=gen).to(DEVICE)
    grad[m - 1, n - 2] = float("nan")
    skips = torch.full((), 7, dtype=torch.int64, device=DEVICE)
    galore_adafactor_step(param, grad, *_args(state), skips, proj_left=proj_left, proj_right=proj_right,
                          weight_decay=0.1, beta1=0.9, scale_parameter=True, step=3, **HYPER)
    for after, original in zip([param, *[v for v in state.values() if v is not None]], before):
        assert torch.equal(after, original)
    assert skips.item() == 8


def test_input_validation():
    m, n, rank = 37, 53, 5
    param, grad = torch.randn(m, n, device=DEVICE), torch.randn(m, n, device=DEVICE)
    proj_left, _ = make_projectors("left", m, n, rank, torch.float32, torch.Generator().manual_seed(0))
    state = _state((rank, n), True, None, torch.Generator().manual_seed(1))
    skips = torch.zeros((), dtype=torch.int64, device=DEVICE)
    common = dict(proj_left=proj_left, proj_right=None, weight_decay=0.0, scale_parameter=True, **HYPER)
    with pytest.raises(ValueError, match="exp_avg_sq_row must have shape"):
        galore_adafactor_step(param, grad, state["exp_avg_sq_row"][:-1], state["exp_avg_sq_col"], None, None, skips,
                              beta1=None, step=1, **common)
    with pytest.raises(ValueError, match="exp_avg must be given exactly when beta1 is"):
        galore_adafactor_step(param, grad, *_args(state), skips, beta1=0.9, step=1, **common)
    with pytest.raises(ValueError, match="step must be >= 1"):
        galore_adafactor_step(param, grad, *_args(state), skips, beta1=None, step=0, **common)
    with pytest.raises(TypeError, match="exp_avg_sq_col must have dtype"):
        galore_adafactor_step(param, grad, state["exp_avg_sq_row"], state["exp_avg_sq_col"].double(), None, None,
                              skips, beta1=None, step=1, **common)


# ------------------------------------------------------------------ planted defects


@contextlib.contextmanager
def planted(mutation: str):
    """Break one stage of the launch, as a bug there would."""
    if mutation == "skip_column_ema":  # the second _mean_square_ema_kernel launch does nothing
        real = kernel_module._mean_square_ema_kernel
        calls = []

        class Launcher:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    calls.append(grid)
                    if len(calls) % 2 == 1:
                        real[grid](*args, **kwargs)
                return launch

        with mock.patch.object(kernel_module, "_mean_square_ema_kernel", Launcher()):
            yield
    elif mutation == "no_clipping":  # clip_threshold so large that the RMS clip never acts
        real_step = kernel_module.galore_adafactor_step

        def mutant(*args, **kwargs):
            return real_step(*args, **{**kwargs, "clip_threshold": 1e30})

        with mock.patch(f"{__name__}.galore_adafactor_step", mutant):
            yield
    elif mutation == "drop_weight_decay":
        real_step = kernel_module.galore_adafactor_step

        def mutant(*args, **kwargs):
            return real_step(*args, **{**kwargs, "weight_decay": 0.0})

        with mock.patch(f"{__name__}.galore_adafactor_step", mutant):
            yield
    else:  # "wrong_beta2t": the decay of the next step
        real_step = kernel_module.galore_adafactor_step

        def mutant(*args, **kwargs):
            return real_step(*args, **{**kwargs, "step": kwargs["step"] + 1})

        with mock.patch(f"{__name__}.galore_adafactor_step", mutant):
            yield


@pytest.mark.parametrize("mutation", ["skip_column_ema", "no_clipping", "drop_weight_decay", "wrong_beta2t"])
@pytest.mark.parametrize("side", ["none", "right"])
def test_planted_defect_fails_the_kernel_test(mutation, side):
    with planted(mutation), pytest.raises(AssertionError):
        run_steps(side, 37, 53, 5, torch.float32)


def test_optimizer_triton_backend_matches_torch_backend():
    """GaLoreAdafactor dispatches to the kernel: a GaLore weight, a bias and a 3-D tensor, across a refresh."""
    results = []
    for backend in ("torch", "triton"):
        gen = torch.Generator().manual_seed(5)
        params = [torch.nn.Parameter(torch.randn(shape, generator=gen).to(DEVICE)) for shape in ((24, 17), (24,), (3, 4, 5))]
        groups = [{"params": params[:1], "rank": 4, "update_proj_gap": 2, "scale": 0.25, "proj_type": "std"},
                  {"params": params[1:]}]
        optimizer = gk.GaLoreAdafactor(groups, beta1=0.9, weight_decay=0.1, backend=backend, svd="exact",
                                       moments_on_refresh="rotate")
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(DEVICE)
            optimizer.step()
        results.append([p.detach() for p in params])
    for ours, ref in zip(*results):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
