"""kernels/galore_adamw8bit.py against reference/galore_adamw8bit.py.

Same protocol as test_kernels_galore_adamw.py: one-step comparisons from common
inputs over evolving steps, a projector refresh at step 3, gradients that are
contiguous, transposed and sliced, NaN-filled ``torch.empty`` scratch, and
projectors representable in the parameter's dtype. The initial codes are random
everywhere.

Tolerances (reasons in test_kernels_adamw8bit.py): codes equal up to ties (≤ 0.1%,
by one code); absmax rtol 1e-5, since the low-rank gradient is a sum in another
order (measured up to 1.8e-6 for a 310-term sum); parameters as there.
"""

from __future__ import annotations

import pytest
import torch
from test_kernels_adamw8bit import (  # noqa: F401 (needs_triton_backend: autouse fixture)
    DEVICE, PARAM_SCALE, WEIGHT_DECAYS, assert_codes_close, assert_param_close, needs_triton_backend,
)
from test_kernels_galore_adamw import gradient, low_rank_shape, make_projectors, poisoned_empty

from galore_kernels import reference
from galore_kernels.kernels import galore_adamw8bit_step
from galore_kernels.quant import lowrank_layout, quantize_blockwise

HYPER = dict(lr=5e-2, beta1=0.9, beta2=0.999, eps=1e-8, scale=0.25)
PARAM_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def random_lowrank_state(side, shape, gen, device=DEVICE):
    """Quantized moments in the layout of ``quant.lowrank_layout``, random in every position."""
    layout_shape = lowrank_layout(shape, side)
    exp_avg = (torch.randn(layout_shape, generator=gen) * 0.1).to(device)
    exp_avg_sq = (torch.rand(layout_shape, generator=gen) * 0.01).to(device)
    return [*quantize_blockwise(exp_avg, signed=True), *quantize_blockwise(exp_avg_sq, signed=False)]


def assert_states_close(states, ref_states, absmax_rtol):
    assert_codes_close(states[0], ref_states[0], "exp_avg_codes")
    assert_codes_close(states[2], ref_states[2], "exp_avg_sq_codes")
    torch.testing.assert_close(states[1], ref_states[1], rtol=absmax_rtol, atol=0)
    torch.testing.assert_close(states[3], ref_states[3], rtol=absmax_rtol, atol=0)


def run_steps(side, m, n, rank, dtype, *, weight_decay=1.0, steps=3, param=None, gen=None, device=DEVICE,
              check=True, absmax_rtol=1e-5):
    """Kernel vs reference over ``steps`` steps (refresh at step 3); returns the kernel's tensors."""
    gen = gen or torch.Generator().manual_seed(0)
    if param is None:
        param = (torch.randn(m, n, generator=gen) * PARAM_SCALE).to(device, dtype)
    states = random_lowrank_state(side, low_rank_shape(side, m, n, rank), gen, device)
    skips = torch.zeros((), dtype=torch.int64, device=device)
    hyper = {**HYPER, "weight_decay": weight_decay}
    projectors = make_projectors(side, m, n, rank, dtype, gen, device)
    for step in range(1, steps + 1):
        if step == 3:
            projectors = make_projectors(side, m, n, rank, dtype, gen, device)
        proj = dict(proj_left=projectors[0], proj_right=projectors[1])
        grad = gradient(step, m, n, dtype, gen, device)
        ref_param, ref_states, ref_skips = param.clone(), [t.clone() for t in states], skips.clone()
        before, ref_fp32 = param.clone(), param.to(torch.float32, copy=True)
        reference.galore_adamw8bit_step(ref_param, grad, *ref_states, ref_skips, step=step, **proj, **hyper)
        reference.galore_adamw8bit_step(
            ref_fp32, grad, *[t.clone() for t in states], skips.clone(), step=step, **proj, **hyper
        )
        with poisoned_empty():
            galore_adamw8bit_step(param, grad, *states, skips, step=step, **proj, **hyper)
        if check:
            assert_param_close(param, ref_param, ref_fp32, before)
            assert_states_close(states, ref_states, absmax_rtol)
            assert torch.equal(skips, ref_skips)
    return [param, *states, skips]


@pytest.mark.parametrize("dtype", PARAM_DTYPES)
@pytest.mark.parametrize("weight_decay", WEIGHT_DECAYS)
@pytest.mark.parametrize("side", ["left", "right", "full"])
def test_matches_reference(side, weight_decay, dtype):
    run_steps(side, 37, 53, 5, dtype, weight_decay=weight_decay)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "side, m, n, rank",
    [("left", 53, 37, 1), ("right", 53, 37, 1), ("full", 53, 37, 1), ("left", 53, 37, 16),
     ("left", 310, 20, 300), ("right", 20, 310, 300), ("full", 310, 20, (300, 3)), ("full", 20, 310, (3, 300))],
)
def test_ranks(side, m, n, rank, dtype):
    """Ranks 1, 16 and 300, odd shapes: blocks that span several short directions or split a long one."""
    run_steps(side, m, n, rank, dtype)


@pytest.mark.parametrize("side", ["left", "right"])
def test_strided_param_and_projected_grad(side):
    """A transposed parameter, and an already-projected gradient that is a transposed view."""
    gen = torch.Generator().manual_seed(1)
    m, n, rank = 37, 53, 5
    param = (torch.randn(n, m, generator=gen) * PARAM_SCALE).to(DEVICE, torch.bfloat16).t()
    proj_left, proj_right = make_projectors(side, m, n, rank, torch.bfloat16, gen)
    shape = low_rank_shape(side, m, n, rank)
    states = random_lowrank_state(side, shape, gen)
    before, ref_param, ref_fp32, ref_states = param.clone(), param.clone(), param.float(), [t.clone() for t in states]
    skips = torch.zeros((), dtype=torch.int64, device=DEVICE)
    grad = torch.randn(shape[::-1], generator=gen).to(DEVICE).t()
    hyper = dict(proj_left=proj_left, proj_right=proj_right, weight_decay=0.1, step=2, grad_is_projected=True, **HYPER)
    reference.galore_adamw8bit_step(ref_param, grad, *ref_states, skips.clone(), **hyper)
    reference.galore_adamw8bit_step(ref_fp32, grad, *[t.clone() for t in states], skips.clone(), **hyper)
    with poisoned_empty():
        galore_adamw8bit_step(param, grad, *states, skips, **hyper)
    assert param.stride() == (1, m)
    assert_param_close(param, ref_param, ref_fp32, before)
    assert_states_close(states, ref_states, 1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("side", ["left", "right", "full"])
def test_nonfinite_gradient_skips_step(side, bad):
    gen = torch.Generator().manual_seed(3)
    m, n, rank = 37, 53, 5
    param = (torch.randn(m, n, generator=gen) * PARAM_SCALE).to(DEVICE, torch.bfloat16)
    proj_left, proj_right = make_projectors(side, m, n, rank, torch.bfloat16, gen)
    states = random_lowrank_state(side, low_rank_shape(side, m, n, rank), gen)
    skips = torch.full((), 7, dtype=torch.int64, device=DEVICE)
    grad = torch.randn(m, n, generator=gen).to(DEVICE, torch.bfloat16)
    grad[0, n - 1] = bad
    before = [param.clone(), *[t.clone() for t in states]]
    galore_adamw8bit_step(param, grad, *states, skips, proj_left=proj_left, proj_right=proj_right,
                          weight_decay=0.1, step=3, **HYPER)
    for after, original in zip([param, *states], before):
        assert torch.equal(after, original)
    assert skips.item() == 8


@pytest.mark.parametrize("side", ["left", "right", "full"])
def test_deterministic(side):
    first = run_steps(side, 37, 53, 5, torch.bfloat16, steps=2, gen=torch.Generator().manual_seed(4), check=False)
    second = run_steps(side, 37, 53, 5, torch.bfloat16, steps=2, gen=torch.Generator().manual_seed(4), check=False)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_input_validation():
    m, n, rank = 37, 53, 5
    param, grad = torch.randn(m, n, device=DEVICE), torch.randn(m, n, device=DEVICE)
    proj_left = torch.randn(m, rank, device=DEVICE)
    states = random_lowrank_state("left", (rank, n), torch.Generator().manual_seed(5))
    skips = torch.zeros((), dtype=torch.int64, device=DEVICE)
    kwargs = dict(proj_left=proj_left, proj_right=None, weight_decay=0.0, step=1, **HYPER)
    with pytest.raises(ValueError, match="proj_left, proj_right or both"):
        galore_adamw8bit_step(param, grad, *states, skips, **{**kwargs, "proj_left": None})
    with pytest.raises(ValueError, match="exp_avg_codes"):
        galore_adamw8bit_step(param, grad, states[0][:, :4], *states[1:], skips, **kwargs)
    with pytest.raises(TypeError, match="exp_avg_sq_codes"):
        galore_adamw8bit_step(param, grad, *states[:2], states[2].int(), states[3], skips, **kwargs)
    with pytest.raises(ValueError, match="exp_avg_absmax"):
        galore_adamw8bit_step(param, grad, states[0], states[1][:-1], *states[2:], skips, **kwargs)
    with pytest.raises(ValueError, match="exp_avg_codes must be contiguous"):
        galore_adamw8bit_step(param, grad, states[0].t().contiguous().t(), *states[1:], skips, **kwargs)
    with pytest.raises(TypeError, match="grad"):
        galore_adamw8bit_step(param, grad.double(), *states, skips, **kwargs)
    with pytest.raises(ValueError, match="proj_left"):
        galore_adamw8bit_step(param, grad, *states, skips, **{**kwargs, "proj_left": proj_left.t()})
    with pytest.raises(ValueError, match="step"):
        galore_adamw8bit_step(param, grad, *states, skips, **{**kwargs, "step": 0})


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [128, 1024])
@pytest.mark.parametrize("side, m, n", [("left", 4096, 4096), ("left", 4096, 11008), ("right", 11008, 4096)])
def test_llama7b_shapes_on_gpu(side, m, n, rank, dtype):
    run_steps(side, m, n, rank, dtype, gen=torch.Generator().manual_seed(5), device="cuda")
