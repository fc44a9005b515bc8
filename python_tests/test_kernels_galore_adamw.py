"""kernels/galore_adamw.py against reference/galore_adamw.py.

Each step starts the kernel and the reference from the same parameter and moments,
so every comparison is of one step; the inputs evolve over the steps, and the
projector is replaced at the third step, as a refresh does. The gradients cycle
through a contiguous tensor, a transposed view and a slice. Every ``torch.empty``
the launchers allocate is filled with NaN, so a scratch element that is read
before it is written poisons the parameter and fails the test.

Projectors are drawn exactly representable in a 16-bit parameter's dtype: the
kernels multiply a 16-bit gradient on the tensor cores in that dtype, which is
then exact, so the comparison checks the kernels rather than that precision choice.

Tolerances, and why:
* fp32 moments: rtol 1e-5, atol 1e-5 of the largest moment (the low-rank gradient
  is a sum in another order; small entries lose relative precision to cancellation).
* parameters: fp32 rtol 1e-5 / atol 1e-6; 16-bit judged by the update as in
  test_kernels_adamw8bit.py, with lr 5e-2 so that a scale-0.25 projected step
  spans several bf16 ulps.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
from test_kernels_adamw8bit import (  # noqa: F401 (needs_triton_backend: autouse fixture)
    DEVICE, PARAM_SCALE, WEIGHT_DECAYS, assert_param_close, needs_triton_backend,
)

from galore_kernels import reference
from galore_kernels.kernels import galore_adamw_step

HYPER = dict(lr=5e-2, beta1=0.9, beta2=0.999, eps=1e-6, scale=0.25)
PARAM_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@contextlib.contextmanager
def poisoned_empty():
    """``torch.empty`` that returns NaN-filled (float) or 0x5A-filled (integer) tensors."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        tensor = real_empty(*args, **kwargs)
        return tensor.fill_(float("nan") if tensor.is_floating_point() else 0x5A)

    with mock.patch.object(torch, "empty", empty):
        yield


def ranks(rank):
    """``(left rank, right rank)`` from an int or a pair (full may use two ranks)."""
    return (rank, rank) if isinstance(rank, int) else rank


def make_projectors(side, m, n, rank, dtype, gen, device=DEVICE):
    """fp32 ``(proj_left, proj_right)`` for ``side`` ('none' gives neither), representable in ``dtype``."""
    def draw(shape, fan):
        return (torch.randn(shape, generator=gen) / fan**0.5).to(dtype).float().to(device)

    rank_left, rank_right = ranks(rank)
    proj_left = draw((m, rank_left), m) if side in ("left", "full") else None
    proj_right = draw((rank_right, n), n) if side in ("right", "full") else None
    return proj_left, proj_right


def low_rank_shape(side, m, n, rank):
    rank_left, rank_right = ranks(rank)
    return {"none": (m, n), "left": (rank_left, n), "right": (m, rank_right), "full": (rank_left, rank_right)}[side]


def gradient(step, m, n, dtype, gen, device=DEVICE):
    """Step 1: contiguous; step 2: a transposed view; later steps: a slice."""
    if step == 1:
        return torch.randn(m, n, generator=gen).to(device, dtype)
    if step == 2:
        return torch.randn(n, m, generator=gen).to(device, dtype).t()
    return torch.randn(m + 3, 2 * n + 1, generator=gen).to(device, dtype)[2 : m + 2, 1::2]


def assert_moment_close(out, ref):
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def run_steps(side, m, n, rank, dtype, *, weight_decay=1.0, steps=3, param=None, gen=None, device=DEVICE,
              check=True, **options):
    """Kernel vs reference over ``steps`` steps (refresh at step 3); returns the kernel's tensors."""
    gen = gen or torch.Generator().manual_seed(0)
    if param is None:
        param = (torch.randn(m, n, generator=gen) * PARAM_SCALE).to(device, dtype)
    shape = low_rank_shape(side, m, n, rank)
    exp_avg = (torch.randn(shape, generator=gen) * 0.1).to(device)
    exp_avg_sq = (torch.rand(shape, generator=gen) * 0.01).to(device)
    skips = torch.zeros((), dtype=torch.int64, device=device)
    hyper = {**HYPER, "weight_decay": weight_decay, **options}
    projectors = make_projectors(side, m, n, rank, dtype, gen, device)
    for step in range(1, steps + 1):
        if step == 3:
            projectors = make_projectors(side, m, n, rank, dtype, gen, device)
        proj = dict(proj_left=projectors[0], proj_right=projectors[1])
        grad = gradient(step, m, n, dtype, gen, device)
        ref_param, ref_moments, ref_skips = param.clone(), [exp_avg.clone(), exp_avg_sq.clone()], skips.clone()
        before, ref_fp32 = param.clone(), param.to(torch.float32, copy=True)
        reference.galore_adamw_step(ref_param, grad, *ref_moments, ref_skips, step=step, **proj, **hyper)
        reference.galore_adamw_step(
            ref_fp32, grad, exp_avg.clone(), exp_avg_sq.clone(), skips.clone(), step=step, **proj, **hyper
        )
        with poisoned_empty():
            galore_adamw_step(param, grad, exp_avg, exp_avg_sq, skips, step=step, **proj, **hyper)
        if check:
            assert_param_close(param, ref_param, ref_fp32, before)
            assert_moment_close(exp_avg, ref_moments[0])
            assert_moment_close(exp_avg_sq, ref_moments[1])
            assert torch.equal(skips, ref_skips)
    return param, exp_avg, exp_avg_sq, skips


@pytest.mark.parametrize("dtype", PARAM_DTYPES)
@pytest.mark.parametrize("weight_decay", WEIGHT_DECAYS)
@pytest.mark.parametrize("side", ["none", "left", "right", "full"])
def test_matches_reference(side, weight_decay, dtype):
    run_steps(side, 37, 53, 5, dtype, weight_decay=weight_decay)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "side, m, n, rank",
    [("left", 53, 37, 1), ("right", 53, 37, 1), ("full", 53, 37, 1),
     ("left", 310, 20, 300), ("right", 20, 310, 300), ("full", 310, 20, (300, 3)), ("full", 20, 310, (3, 300))],
)
def test_ranks(side, m, n, rank, dtype):
    """Rank 1, and a rank above 256 with the other dimension (and the other rank of full) small."""
    run_steps(side, m, n, rank, dtype)


@pytest.mark.parametrize("options", [dict(correct_bias=False), dict(bnb_eps=True)])
@pytest.mark.parametrize("side", ["none", "left"])
def test_bias_and_eps_options(side, options):
    run_steps(side, 37, 53, 5, torch.float32, **options)


@pytest.mark.parametrize("side", ["none", "left", "right"])
def test_strided_param(side):
    gen = torch.Generator().manual_seed(1)
    param = (torch.randn(53, 37, generator=gen) * PARAM_SCALE).to(DEVICE, torch.bfloat16).t()
    out, *_ = run_steps(side, 37, 53, 5, torch.bfloat16, param=param, gen=gen)
    assert out.stride() == (1, 37)


@pytest.mark.parametrize("shape", [(300,), (3, 4, 5)])
def test_plain_adamw_any_shape(shape):
    gen = torch.Generator().manual_seed(2)
    param = torch.randn(shape, generator=gen).to(DEVICE)
    exp_avg = (torch.randn(shape, generator=gen) * 0.1).to(DEVICE)
    exp_avg_sq = (torch.rand(shape, generator=gen) * 0.01).to(DEVICE)
    skips = torch.zeros((), dtype=torch.int64, device=DEVICE)
    ref = [param.clone(), exp_avg.clone(), exp_avg_sq.clone(), skips.clone()]
    grad = torch.randn(shape, generator=gen).to(DEVICE)
    hyper = dict(proj_left=None, proj_right=None, weight_decay=0.1, step=2, **HYPER)
    galore_adamw_step(param, grad, exp_avg, exp_avg_sq, skips, **hyper)
    reference.galore_adamw_step(*ref[:1], grad, *ref[1:], **hyper)
    torch.testing.assert_close(param, ref[0], rtol=1e-5, atol=1e-6)
    assert_moment_close(exp_avg, ref[1])
    assert_moment_close(exp_avg_sq, ref[2])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("side", ["none", "left", "right", "full"])
def test_nonfinite_gradient_skips_step(side, bad):
    gen = torch.Generator().manual_seed(3)
    m, n, rank = 37, 53, 5
    param = torch.randn(m, n, generator=gen).to(DEVICE, torch.bfloat16)
    proj_left, proj_right = make_projectors(side, m, n, rank, torch.bfloat16, gen)
    shape = low_rank_shape(side, m, n, rank)
    exp_avg, exp_avg_sq = torch.randn(shape, generator=gen).to(DEVICE), torch.rand(shape, generator=gen).to(DEVICE)
    skips = torch.full((), 7, dtype=torch.int64, device=DEVICE)
    grad = torch.randn(m, n, generator=gen).to(DEVICE, torch.bfloat16)
    grad[m - 1, n - 2] = bad
    before = [param.clone(), exp_avg.clone(), exp_avg_sq.clone()]
    galore_adamw_step(param, grad, exp_avg, exp_avg_sq, skips, proj_left=proj_left, proj_right=proj_right,
                      weight_decay=0.1, step=3, **HYPER)
    for after, original in zip([param, exp_avg, exp_avg_sq], before):
        assert torch.equal(after, original)
    assert skips.item() == 8


@pytest.mark.parametrize("side", ["none", "left", "right", "full"])
def test_deterministic(side):
    first = run_steps(side, 37, 53, 5, torch.bfloat16, steps=2, gen=torch.Generator().manual_seed(4), check=False)
    second = run_steps(side, 37, 53, 5, torch.bfloat16, steps=2, gen=torch.Generator().manual_seed(4), check=False)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_input_validation():
    m, n, rank = 37, 53, 5
    param, grad = torch.randn(m, n, device=DEVICE), torch.randn(m, n, device=DEVICE)
    proj_left = torch.randn(m, rank, device=DEVICE)
    exp_avg, exp_avg_sq = torch.zeros(rank, n, device=DEVICE), torch.zeros(rank, n, device=DEVICE)
    skips = torch.zeros((), dtype=torch.int64, device=DEVICE)
    kwargs = dict(proj_left=proj_left, proj_right=None, weight_decay=0.0, step=1, **HYPER)
    with pytest.raises(TypeError, match="proj_left"):
        galore_adamw_step(param, grad, exp_avg, exp_avg_sq, skips, **{**kwargs, "proj_left": proj_left.double()})
    with pytest.raises(ValueError, match="proj_left"):
        galore_adamw_step(param, grad, exp_avg, exp_avg_sq, skips, **{**kwargs, "proj_left": proj_left[1:]})
    with pytest.raises(ValueError, match="exp_avg_sq"):
        galore_adamw_step(param, grad, exp_avg, exp_avg_sq.t(), skips, **kwargs)
    with pytest.raises(TypeError, match="exp_avg"):
        galore_adamw_step(param, grad, exp_avg.half(), exp_avg_sq, skips, **kwargs)
    with pytest.raises(ValueError, match="grad"):
        galore_adamw_step(param, grad.t(), exp_avg, exp_avg_sq, skips, **kwargs)
    with pytest.raises(ValueError, match="2-D"):
        galore_adamw_step(param.view(m, n, 1), grad.view(m, n, 1), exp_avg, exp_avg_sq, skips, **kwargs)
    with pytest.raises(ValueError, match="nonfinite_skips"):
        galore_adamw_step(param, grad, exp_avg, exp_avg_sq, skips.view(1), **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [128, 1024])
@pytest.mark.parametrize("side, m, n", [("left", 4096, 4096), ("left", 4096, 11008), ("right", 11008, 4096)])
def test_llama7b_shapes_on_gpu(side, m, n, rank, dtype):
    run_steps(side, m, n, rank, dtype, gen=torch.Generator().manual_seed(5), device="cuda")


@pytest.mark.parametrize("side", ["left", "right"])
def test_fp16_stores_the_scaled_update(side):
    """fp16 back-projects the step α·N in fp16 (``lowrank_matmul.folds_step_size``), not N.

    Where v is 0 and m is not, N = m/eps is 9e4 here, above fp16's 65504, while α·N is
    about 3.5: N stored in fp16 would put an Inf into the parameter.
    """
    gen = torch.Generator().manual_seed(8)
    m, n, rank = 37, 53, 5
    proj_left, proj_right = make_projectors(side, m, n, rank, torch.float16, gen)
    proj = dict(proj_left=None if proj_left is None else proj_left.half(),
                proj_right=None if proj_right is None else proj_right.half())
    shape = low_rank_shape(side, m, n, rank)
    param = torch.randn(m, n, generator=gen).to(DEVICE, torch.float16)
    low_rank = torch.zeros(shape, device=DEVICE)  # R = 0 keeps v at 0; m decays to 9e-4
    hyper = dict(HYPER, lr=1e-3, eps=1e-8, weight_decay=0.0, step=10, grad_is_projected=True)
    moments = [torch.full(shape, 1e-3, device=DEVICE), torch.zeros(shape, device=DEVICE)]
    skips = torch.zeros((), dtype=torch.int64, device=DEVICE)
    ref_lowp, ref_fp32, before = param.clone(), param.float(), param.clone()
    reference.galore_adamw_step(ref_lowp, low_rank, *[t.clone() for t in moments], skips.clone(), **proj, **hyper)
    reference.galore_adamw_step(ref_fp32, low_rank, *[t.clone() for t in moments], skips.clone(), **proj, **hyper)
    with poisoned_empty():
        galore_adamw_step(param, low_rank, *moments, skips, **proj, **hyper)
    assert torch.isfinite(param).all()
    assert_param_close(param, ref_lowp, ref_fp32, before)
