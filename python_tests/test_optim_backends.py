"""The optimizers with backend="triton" against backend="torch": same trajectory, every path.

Runs the kernels natively on a GPU and under TRITON_INTERPRET=1 on the CPU.
"""

import pytest
import torch

import galore_kernels as gk
from galore_kernels.kernels._launch import interpreting

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or interpreting()), reason="the Triton kernels need CUDA or TRITON_INTERPRET=1"
)

DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"


def make_model(dtype):
    torch.manual_seed(3)
    # Its low-rank states (8×72, 40×8, ...) are 8-bit only with a low min_8bit_size (set below).
    return torch.nn.Sequential(torch.nn.Linear(72, 40), torch.nn.Tanh(), torch.nn.Linear(40, 33)).to(DEVICE, dtype)


def groups(model, proj_type):
    matrices = [p for p in model.parameters() if p.dim() == 2]
    return [
        {"params": matrices, "rank": 8, "update_proj_gap": 2, "scale": 0.5, "proj_type": proj_type},
        {"params": [p for p in model.parameters() if p.dim() == 1]},
    ]


def train(cls, backend, dtype, proj_type, steps=4, rounded_to=None, **kwargs):
    """``rounded_to``: start from weights and inputs rounded to that dtype (an fp32 twin of a 16-bit run)."""
    model = make_model(rounded_to or dtype).to(dtype)
    # A low min_8bit_size puts these small low-rank states in 8 bits. Not for `full`:
    # its 8×8 state is one partial block, where the one-code flips that a different
    # summation order causes decide a whole update; the kernel tests check the 8-bit
    # full path step by step from identical inputs instead.
    extra = {"min_8bit_size": 64 if proj_type != "full" else 4096} if cls is gk.GaLoreAdamW8bit else {}
    optimizer = cls(groups(model, proj_type), lr=1e-2, weight_decay=0.1, backend=backend, **extra, **kwargs)
    accumulation = kwargs.get("accumulation_steps", 1)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps * accumulation):
        # 64 samples make every gradient full rank (33 or 40), beyond the randomized
        # sketch of rank + 8 = 16 vectors, so at a refresh the full projection PᵀGQᵀ is a
        # dense 8×8 matrix. With an exact SVD it would be diagonal plus rounding noise,
        # which Adam's normalization (eps 1e-8) turns into ±lr updates whose signs no
        # two summation orders agree on.
        inputs = torch.randn(64, 72, generator=generator).to(DEVICE, rounded_to or dtype).to(dtype)
        (model(inputs).float().square().mean() / accumulation).backward()
        if not optimizer.layerwise:
            optimizer.step()
            optimizer.zero_grad()
    return model, optimizer


@pytest.mark.parametrize("cls", [gk.GaLoreAdamW, gk.GaLoreAdamW8bit])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "full"])
def test_triton_backend_matches_torch_backend(cls, dtype, proj_type):
    initial = make_model(dtype)
    reference, _ = train(cls, "torch", dtype, proj_type)
    fused, optimizer = train(cls, "triton", dtype, proj_type)
    assert optimizer.nonfinite_skips == 0
    if dtype != torch.float32:
        # The kernels multiply in bf16 (the projector rounded to it), the reference in
        # fp32: measure both against an fp32 run from the same rounded start, and allow
        # the kernels twice the reference's own bf16 error (flash-attention's criterion).
        # 8-bit states turn a few of those differences into one-code flips, which
        # concentrate in single elements: there the bound on the largest error is 4×
        # (measured up to 2.5×) and the mean error, which a wrong kernel would move
        # everywhere, stays at 1.5× (measured up to 1.25×).
        max_ratio, mean_ratio = (2.0, 1.25) if cls is gk.GaLoreAdamW else (4.0, 1.5)
        exact, _ = train(cls, "torch", torch.float32, proj_type, rounded_to=dtype)
        for precise, expected, actual in zip(exact.parameters(), reference.parameters(), fused.parameters()):
            reference_error = (expected.float() - precise).abs()
            fused_error = (actual.float() - precise).abs()
            assert fused_error.max() <= max_ratio * reference_error.max() + 1e-6
            assert fused_error.mean() <= mean_ratio * reference_error.mean() + 1e-7
        return
    for start, expected, actual in zip(initial.parameters(), reference.parameters(), fused.parameters()):
        if proj_type == "full":
            # At a refresh PᵀGQᵀ is close to diagonal: its off-diagonal entries are tiny
            # and, with GaLoreAdamW8bit's eps of 1e-8, Adam's normalization amplifies
            # their summation-order differences. Bound the drift by the update instead.
            update = (expected - start).abs().max()
            assert (actual - expected).abs().max() <= 0.05 * update
        else:
            # Kernel and reference differ only by summation order.
            torch.testing.assert_close(actual, expected, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [gk.GaLoreAdamW, gk.GaLoreAdamW8bit])
def test_triton_backend_layerwise_accumulation_and_clipping(cls):
    """Exercises the kernels' projected-gradient input (grad_is_projected)."""
    kwargs = dict(layerwise=True, accumulation_steps=2, max_grad_norm=0.05)
    reference, _ = train(cls, "torch", torch.float32, "std", steps=3, **kwargs)
    fused, _ = train(cls, "triton", torch.float32, "std", steps=3, **kwargs)
    for expected, actual in zip(reference.parameters(), fused.parameters()):
        torch.testing.assert_close(actual, expected, rtol=2e-5, atol=1e-6)


def test_triton_backend_really_launches_the_kernels(monkeypatch):
    from galore_kernels import kernels, reference

    called = []
    for name in ("galore_adamw8bit_step", "adamw8bit_step", "galore_adamw_step", "multi_tensor_adamw_step",
                 "multi_tensor_adamw8bit_step"):
        monkeypatch.setattr(reference, name, lambda *a, _n=name, **k: pytest.fail(f"reference {_n} called"))
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _f=original, _n=name, **k: (called.append(_n), _f(*a, **k)))
    model = make_model(torch.float32)
    # Above the multi-tensor bound (16384 values): the per-tensor 8-bit plain kernel.
    big = torch.nn.Parameter(torch.randn(130, 130, device=DEVICE))
    optimizer = gk.GaLoreAdamW8bit(groups(model, "std") + [{"params": [big]}], backend="triton", min_8bit_size=64)
    model(torch.randn(4, 72, device=DEVICE)).sum().backward()
    big.grad = torch.randn_like(big)
    optimizer.step()
    # GaLore matrices, the large plain parameter, and the small (fp32-state) biases in one multi-tensor launch.
    assert set(called) == {"galore_adamw8bit_step", "adamw8bit_step", "multi_tensor_adamw_step"}
