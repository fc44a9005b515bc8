"""Parity of the reference (``backend="torch"``) path with galore-torch and bitsandbytes on CPU.

Oracles, all installed packages run on CPU:
* ``galore_torch.GaLoreProjector``, ``GaLoreAdamW`` and ``GaLoreAdamW8bit`` (the latter with
  ``torch.cuda.synchronize`` patched out: galore-torch calls it after every parameter);
* ``bitsandbytes.optim.Adam8bit``. Its CPU path differs from the CUDA kernel our reference
  follows in three documented ways: weight decay before the step, no state1 sign fix, and
  an approximate nearest-code search (see test_quant.py, BNB_CPU_SEARCH_RESOLUTION).
"""

import warnings

import pytest
import torch

import galore_kernels as gk
from galore_kernels import quant
from galore_kernels.reference.projector import GaLoreProjector

galore_torch = pytest.importorskip("galore_torch")
bnb = pytest.importorskip("bitsandbytes")
from galore_torch.galore_projector import GaLoreProjector as TorchGaLoreProjector  # noqa: E402

PROJ_TYPES = ["std", "reverse_std", "left", "right", "full"]
SHAPES = {"tall": (50, 33), "wide": (33, 50), "square": (40, 40)}
BNB_CPU_SEARCH_RESOLUTION = 2.0**-15 + 1e-7  # measured in test_quant.py
# bitsandbytes' own test tolerances for fp32 parameters (tests/test_optim.py).
BNB_PARAM_MEAN_ABS, BNB_PARAM_MEAN_REL = 6e-5, 6e-4


@pytest.fixture(autouse=True)
def _quiet_galore_torch():
    with warnings.catch_warnings():
        # galore-torch's deprecation notices and our one-time clamp warnings are not under test here.
        warnings.simplefilter("ignore")
        yield


def _max_rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest difference relative to the largest magnitude of ``expected``."""
    return float((actual.float() - expected.float()).abs().max() / expected.float().abs().max())


# --------------------------------------------------------------------------- projector


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_projector_matches_galore_torch(proj_type, shape_name, dtype):
    shape = SHAPES[shape_name]
    ours = GaLoreProjector(8, update_proj_gap=2, scale=0.25, proj_type=proj_type)
    theirs = TorchGaLoreProjector(8, update_proj_gap=2, scale=0.25, proj_type=proj_type)
    # fp32: the same SVD call and products, in a different association at most (measured
    # 4.9e-7). bf16: galore-torch rounds P^T G to bf16 before the second product of `full`,
    # we round once at the end: up to two bf16 roundings (measured 7.5e-3 < 2^-6).
    tol = 1e-6 if dtype == torch.float32 else 2.0**-6
    gen = torch.Generator().manual_seed(0)
    for step in range(5):  # refreshes at steps 0, 2 and 4: a stale basis would not match
        grad = torch.randn(shape, generator=gen).to(dtype)
        low_ours, low_theirs = ours.project(grad, step), theirs.project(grad, step)
        assert low_ours.shape == low_theirs.shape and low_ours.dtype == low_theirs.dtype == dtype
        assert _max_rel(low_ours, low_theirs) <= tol
        normalized = torch.randn(low_ours.shape, generator=gen).to(dtype)
        back_ours, back_theirs = ours.project_back(normalized), theirs.project_back(normalized)
        assert back_ours.shape == back_theirs.shape == shape and back_ours.dtype == dtype
        assert _max_rel(back_ours, back_theirs) <= tol


# ---------------------------------------------------------------------- GaLoreAdamW


def _run_adamw(make_optimizer, shape, proj_type, dtype, steps=10, param_scale=1.0):
    """Train a GaLore weight plus a plain 1-D bias from fresh seeded gradients; returns fp32 copies."""
    gen = torch.Generator().manual_seed(0)
    # Start from bf16-representable values so every dtype starts from the same point.
    weight = (param_scale * torch.randn(shape, generator=gen)).bfloat16().to(dtype).requires_grad_()
    bias = (param_scale * torch.randn(shape[0], generator=gen)).bfloat16().to(dtype).requires_grad_()
    start = weight.detach().float().clone()
    groups = [
        {"params": [weight], "rank": 8, "update_proj_gap": 3, "scale": 0.25, "proj_type": proj_type},
        {"params": [bias]},
    ]
    optimizer = make_optimizer(groups)
    for _ in range(steps):  # refreshes at steps 0, 3, 6, 9
        weight.grad = torch.randn(shape, generator=gen).bfloat16().to(dtype)
        bias.grad = torch.randn(shape[0], generator=gen).bfloat16().to(dtype)
        optimizer.step()
    return weight.detach().float(), bias.detach().float(), start


def _ours(groups):
    return gk.GaLoreAdamW(groups, lr=1e-2, weight_decay=0.1, svd="exact", backend="torch")


def _theirs(groups):
    return galore_torch.GaLoreAdamW(groups, lr=1e-2, weight_decay=0.1, no_deprecation_warning=True)


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_galore_adamw_fp32_matches_galore_torch(proj_type, shape_name):
    shape = SHAPES[shape_name]
    weight, bias, start = _run_adamw(_ours, shape, proj_type, torch.float32)
    ref_weight, ref_bias, _ = _run_adamw(_theirs, shape, proj_type, torch.float32)
    assert float((ref_weight - start).abs().max()) > 1e-2, "the run must move the weight for the test to mean anything"
    # One-sided projections: same SVD, same Adam math, ops in a different order (measured
    # <= 3.5e-7 of max|W|). `full`: at a refresh step P^T G Q^T is diag(S) up to rounding, and
    # Adam's m / (sqrt(v) + eps) turns those rounding-level off-diagonal entries into O(1)
    # normalized updates whose value depends on summation order (measured 2.7e-6, all of it
    # from the first step).
    tol = 1e-5 if proj_type == "full" else 1e-6
    assert _max_rel(weight, ref_weight) <= tol
    assert _max_rel(bias, ref_bias) <= 1e-6  # plain AdamW (measured 2.1e-7)


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_galore_adamw_bf16_no_worse_than_galore_torch(proj_type, shape_name):
    """bf16 parameters: both are compared with an fp32 run on the same (bf16-valued) inputs.

    galore-torch keeps bf16 moments and rounds the parameter twice per step (update, then
    decay); ours keeps fp32 moments and rounds once, so its error must not exceed galore-torch's
    by more than 2x (flash-attention's criterion; measured ratio 0.5-0.9). Parameters of scale
    0.05 keep the lr=1e-2 update above a bf16 ulp, otherwise both errors equal the update.
    """
    shape = SHAPES[shape_name]
    reference = _run_adamw(_theirs, shape, proj_type, torch.float32, param_scale=0.05)
    ours = _run_adamw(_ours, shape, proj_type, torch.bfloat16, param_scale=0.05)
    theirs = _run_adamw(_theirs, shape, proj_type, torch.bfloat16, param_scale=0.05)
    slack = 1e-5  # well under a bf16 ulp at 0.05 (2.4e-4)
    for index in (0, 1):  # GaLore weight, plain bias
        error_ours = (ours[index] - reference[index]).abs()
        error_theirs = (theirs[index] - reference[index]).abs()
        assert float(error_ours.max()) <= 2 * float(error_theirs.max()) + slack
        assert float(error_ours.mean()) <= 2 * float(error_theirs.mean()) + slack
    assert float((reference[0] - reference[2]).abs().max()) > 4e-3, "updates must exceed the bf16 resolution"


# ------------------------------------------------------------------ GaLoreAdamW8bit


# (shape, rank, proj_type): every low-rank state has >= 4096 values, so galore-torch uses
# 8-bit state (its small-state 32-bit path is broken on CPU; see reference-notes.md).
GALORE_8BIT_CASES = [
    ((160, 96), 48, "std"),  # right, 160x48: stored as its transpose, one direction per row
    ((160, 96), 48, "reverse_std"),  # left, 48x96: the same blocks as galore-torch
    ((96, 160), 48, "std"),  # left
    ((96, 160), 48, "reverse_std"),  # right
    ((96, 160), 48, "left"),
    ((160, 96), 48, "right"),
    ((128, 128), 32, "std"),  # right, 128x32
    ((96, 160), 64, "full"),  # 64x64 = 4096
]


@pytest.fixture
def no_cuda_sync(monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args, **kwargs: None)


def _away_from_zero(size, gen: torch.Generator) -> torch.Tensor:
    """Parameters of scale 0.1 with |p| >= 0.05.

    bitsandbytes' mean relative error err / (|p| + 1e-9) is otherwise dominated by the one or
    two parameters within 1e-6 of zero (its test re-synchronizes every step; ours drift freely).
    """
    values = torch.randn(size, generator=gen)
    return torch.sign(values) * (0.05 + 0.1 * values.abs())


def _run_8bit(optimizer_cls, shape, rank, proj_type, steps=15, **kwargs):
    gen = torch.Generator().manual_seed(0)
    weight = _away_from_zero(shape, gen).requires_grad_()
    bias = _away_from_zero((67 * 71,), gen).requires_grad_()  # plain group, 8-bit state in both
    start = (weight.detach().clone(), bias.detach().clone())
    groups = [
        {"params": [weight], "rank": rank, "update_proj_gap": 4, "scale": 0.25, "proj_type": proj_type},
        {"params": [bias]},
    ]
    optimizer = optimizer_cls(groups, lr=1e-3, weight_decay=1e-2, **kwargs)
    for _ in range(steps):  # refreshes at steps 0, 4, 8, 12
        weight.grad = torch.randn(shape, generator=gen)
        bias.grad = torch.randn(bias.shape, generator=gen)
        optimizer.step()
    return (weight.detach(), bias.detach()), start, optimizer


@pytest.mark.usefixtures("no_cuda_sync")
@pytest.mark.parametrize("shape, rank, proj_type", GALORE_8BIT_CASES)
def test_galore_adamw8bit_matches_galore_torch(shape, rank, proj_type):
    """Free-running for 15 steps (4 refreshes): within bitsandbytes' parameter tolerances.

    For right projections the 8-bit blocks hold different values (our direction-major Rᵀ vs
    galore-torch's row-major R), so the quantizations differ and the runs drift apart:
    codes are not compared.
    bitsandbytes' tolerances alone exceed a few steps' updates at lr=1e-3, so the drift is
    also bounded relative to the total update: measured <= 2.2% of it for one-sided
    projections and 5.6% for `full` (its refresh-step rounding amplification, see the fp32
    test, on top of the block differences).
    """
    ours, start, optimizer = _run_8bit(gk.GaLoreAdamW8bit, shape, rank, proj_type, svd="exact", backend="torch")
    theirs, _, _ = _run_8bit(galore_torch.GaLoreAdamW8bit, shape, rank, proj_type)
    state = optimizer.state[optimizer.param_groups[0]["params"][0]]
    assert "exp_avg_codes" in state, "the low-rank state must be 8-bit for this comparison"
    for mine, reference, initial, drift_tol in zip(ours, theirs, start, (0.1 if proj_type == "full" else 0.05, 0.05)):
        error = (mine - reference).abs()
        assert float(error.mean()) < BNB_PARAM_MEAN_ABS
        assert float((error / (reference.abs() + 1e-9)).mean()) < BNB_PARAM_MEAN_REL
        assert float(error.mean()) <= drift_tol * float((reference - initial).abs().mean())


# ------------------------------------------------------ 8-bit state vs bitsandbytes Adam8bit

ADAM8BIT_SHAPES = [(67, 71), (4099,), (3, 37, 41), (64, 96)]
BETAS, EPS, LR = (0.9, 0.995), 1e-8, 1e-3


def _pair(shape, weight_decay, seed=0):
    gen = torch.Generator().manual_seed(seed)
    start = _away_from_zero(shape, gen)
    ours = start.clone().requires_grad_()
    theirs = start.clone().requires_grad_()
    ours_opt = gk.GaLoreAdamW8bit([ours], lr=LR, betas=BETAS, eps=EPS, weight_decay=weight_decay, backend="torch")
    theirs_opt = bnb.optim.Adam8bit([theirs], lr=LR, betas=BETAS, eps=EPS, weight_decay=weight_decay)
    return ours, ours_opt, theirs, theirs_opt, gen


@pytest.mark.parametrize("shape", ADAM8BIT_SHAPES)
def test_adam8bit_codes_match_bitsandbytes_stepwise(shape):
    """Each step starts both optimizers from the same parameter and quantized state, then compares.

    absmax: same fp32 moments, so equal up to rounding (rtol 1e-5; measured 1.1e-7).
    codes: ours are exactly the nearest code (+ sign fix) of the updated moments; where
    bitsandbytes' CPU search picks another code it is no nearer and at most its 2^-15
    resolution farther (measured 0.1-3.4% of codes differ, mostly tiny exp_avg_sq values).
    params: with identical inputs and weight_decay=0 only rounding differs (rtol 1e-6).
    """
    ours, ours_opt, theirs, theirs_opt, gen = _pair(shape, weight_decay=0.0)
    for step in range(6):
        grad = torch.randn(shape, generator=gen) * 0.01
        if step > 0:
            state, their_state = ours_opt.state[ours], theirs_opt.state[theirs]
            their_state["state1"].copy_(state["exp_avg_codes"].view_as(their_state["state1"]))
            their_state["state2"].copy_(state["exp_avg_sq_codes"].view_as(their_state["state2"]))
            their_state["absmax1"].copy_(state["exp_avg_absmax"])
            their_state["absmax2"].copy_(state["exp_avg_sq_absmax"])
            with torch.no_grad():
                theirs.copy_(ours)
            previous = {key: state[key].clone() for key in state if key.startswith("exp_avg")}
        else:
            previous = None  # the moments start at zero
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        ours_opt.step()
        theirs_opt.step()
        state, their_state = ours_opt.state[ours], theirs_opt.state[theirs]
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(state["exp_avg_absmax"], their_state["absmax1"], rtol=1e-5, atol=0)
        torch.testing.assert_close(state["exp_avg_sq_absmax"], their_state["absmax2"], rtol=1e-5, atol=0)

        flat_grad = grad.reshape(-1)
        for signed, codes_key, absmax_key, their_codes_key, beta, new_moment in (
            (True, "exp_avg_codes", "exp_avg_absmax", "state1", BETAS[0], lambda g: g),
            (False, "exp_avg_sq_codes", "exp_avg_sq_absmax", "state2", BETAS[1], lambda g: g * g),
        ):
            if previous is None:
                old = torch.zeros(flat_grad.numel())
            else:
                old = quant.dequantize_blockwise(previous[codes_key], previous[absmax_key], signed=signed).reshape(-1)
            moment = old * beta + (1.0 - beta) * new_moment(flat_grad)  # the reference's expression
            absmax = state[absmax_key]
            inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
            normalized = moment * inv[torch.arange(moment.numel()) // quant.BLOCK_SIZE]
            qmap = quant.create_dynamic_map(signed)
            nearest = (normalized.unsqueeze(-1) - qmap).abs().argmin(-1)
            sign_fixed = torch.zeros_like(nearest, dtype=torch.bool)
            if signed:
                sign_fixed = (nearest == 127) & torch.signbit(normalized)
                nearest = torch.where(sign_fixed, nearest - 1, nearest)
            mine = state[codes_key].reshape(-1).long()
            theirs_codes = their_state[their_codes_key].reshape(-1).long()
            assert torch.equal(mine, nearest), f"step {step + 1}: {codes_key} is not the nearest code"
            extra = (qmap[theirs_codes] - normalized).abs() - (qmap[mine] - normalized).abs()
            extra = torch.where(sign_fixed & (theirs_codes == 127), torch.zeros_like(extra), extra)
            assert float(extra.min()) >= 0 and float(extra.max()) <= BNB_CPU_SEARCH_RESOLUTION


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("shape", ADAM8BIT_SHAPES)
def test_adam8bit_free_running_within_bitsandbytes_tolerance(shape, weight_decay):
    """20 steps without re-synchronizing. With weight decay bitsandbytes' CPU path decays
    before the step and ours after (its CUDA kernel's order): a difference of lr*wd*update
    per step, far below the tolerance."""
    ours, ours_opt, theirs, theirs_opt, gen = _pair(shape, weight_decay)
    start = theirs.detach().clone()
    for _ in range(20):
        grad = torch.randn(shape, generator=gen) * 0.01
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        ours_opt.step()
        theirs_opt.step()
        error = (ours - theirs).detach().abs()
        assert float(error.mean()) < BNB_PARAM_MEAN_ABS
        assert float((error / (theirs.detach().abs() + 1e-9)).mean()) < BNB_PARAM_MEAN_REL
    # Sensitivity: the drift is a small fraction of the update (measured < 0.5%).
    assert float(error.mean()) <= 0.02 * float((theirs.detach() - start).abs().mean())
    assert ours_opt.state[ours]["exp_avg_codes"].dtype == torch.uint8


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_small_param_fp32_state_matches_bitsandbytes_32bit(weight_decay):
    """Under min_8bit_size (33x50 = 1650 values) both keep fp32 state, eps scaled by sqrt(1 - beta2^t)."""
    shape = (33, 50)
    ours, ours_opt, theirs, theirs_opt, gen = _pair(shape, weight_decay)
    for _ in range(10):
        grad = torch.randn(shape, generator=gen) * 0.01
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        ours_opt.step()
        theirs_opt.step()
    state, their_state = ours_opt.state[ours], theirs_opt.state[theirs]
    assert their_state["state1"].dtype == torch.float32 and state["exp_avg"].dtype == torch.float32
    # Same recurrences, rounded in a different order: atol is 1e-7 of each moment's scale
    # (grads ~1e-2, so exp_avg ~1e-2 and exp_avg_sq ~1e-4), for entries that cancel near zero.
    torch.testing.assert_close(state["exp_avg"], their_state["state1"], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(state["exp_avg_sq"], their_state["state2"], rtol=1e-5, atol=1e-11)
    # wd=0: rounding only. wd>0: decay before vs after the step, lr*wd*|update| ~ 1e-7 per step.
    atol = 1e-8 if weight_decay == 0 else 2e-6
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-6, atol=atol)
