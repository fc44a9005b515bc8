"""kernels/natural_galore.py against reference/natural_galore.py.

Both run the same sequence of gradients on their own copy of the history state: steps
with partial, full and wrapped rings, gradients of different scales, a repeated
gradient (rank-deficient F) and a NaN-poisoned step, for fp32 and bf16 histories.
Every ``torch.empty`` the launcher allocates is NaN-filled, so a scratch value read
before it is written fails the test.

Tolerances, and why:
* ñ: 4 fp32 ulps of the largest entry (both form ñ in fp64 and round once; the dot
  products are summed in another order; measured <= 1.1e-7 relative).
* Gram: 1e-13 relative (fp64 dots in another order).
* the history ring, the count and the non-finite outcome: exact (bf16 rounding is to
  nearest even in both).

The mutation tests plant defects in a copy of the kernel module (a dropped Gram
column, a wrong pivot, a skipped back-substitution, ...) and require this comparison
to catch each one.
"""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch
from test_kernels_adamw8bit import DEVICE, needs_triton_backend  # noqa: F401 (autouse fixture)
from test_kernels_galore_adamw import poisoned_empty

import galore_kernels.kernels.natural_galore as kernel_module
from galore_kernels.reference.natural_galore import natural_gradient as reference_natural_gradient
from galore_kernels.reference.natural_galore import new_history

DAMPING = 1e-3
FP32_ULP = 2.0**-23


def _gradients(shape, steps, gen):
    grads = []
    for t in range(steps):
        if t == 4 and grads:
            grads.append(grads[-1].clone())  # repeated: F rank-deficient
        else:
            grads.append(torch.randn(shape, generator=gen) * 10.0 ** (t % 4 - 2))
    poisoned = torch.randn(shape, generator=gen)
    poisoned.view(-1)[poisoned.numel() // 2] = float("nan")
    grads.insert(min(steps - 1, 3), poisoned)
    return grads


def compare_with_reference(natural_gradient, shape, size, history_dtype, grad_dtype=torch.float32, steps=None, seed=0):
    """Run kernel and reference side by side; assert they agree at every step."""
    gen = torch.Generator().manual_seed(seed)
    ours = {k: v.to(DEVICE) for k, v in new_history(shape, size, history_dtype, torch.device("cpu")).items()}
    theirs = {k: v.clone() for k, v in ours.items()}
    for t, grad in enumerate(_gradients(shape, steps or 2 * size + 3, gen)):
        grad = grad.to(grad_dtype).to(DEVICE)
        with poisoned_empty():
            natural = natural_gradient(grad, ours["grad_history"], ours["history_gram"], ours["history_count"], damping=DAMPING)
        expected = reference_natural_gradient(
            grad, theirs["grad_history"], theirs["history_gram"], theirs["history_count"], damping=DAMPING,
        )
        assert natural.dtype == torch.float32 and natural.shape == grad.shape
        finite = bool(torch.isfinite(expected).all())
        assert bool(torch.isfinite(natural).all()) == finite, f"step {t}: non-finite outcome differs"
        if finite:
            error = float((natural - expected).abs().max() / expected.abs().max())
            assert error <= 4 * FP32_ULP, f"step {t}: ñ off by {error:.3g} relative"
        assert torch.equal(ours["grad_history"], theirs["grad_history"]), f"step {t}: history differs"
        assert torch.equal(ours["history_count"], theirs["history_count"]), f"step {t}: count differs"
        gram_error = (ours["history_gram"] - theirs["history_gram"]).abs().max()
        assert float(gram_error) <= 1e-13 * float(theirs["history_gram"].abs().max()), f"step {t}: Gram differs"


CASES = [
    # (low-rank shape, s): odd sizes, a single vector, a padded 64-wide solve.
    ((7, 5), 4),
    ((9, 13), 3),
    ((3, 3), 1),
    ((33,), 7),
    ((5, 6), 33),
]


@pytest.mark.parametrize("history_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, size", CASES)
def test_kernel_matches_reference(shape, size, history_dtype):
    compare_with_reference(kernel_module.natural_gradient, shape, size, history_dtype, steps=min(2 * size + 3, 12))


@pytest.mark.parametrize("history_dtype", [torch.float32, torch.bfloat16])
def test_many_chunks_strided_over_few_partials(monkeypatch, history_dtype):
    """k = 2400 in five 512-wide chunks over 3 programs: the strided loop and the partial sums."""
    monkeypatch.setattr(kernel_module, "MAX_PARTIALS", 3)
    compare_with_reference(kernel_module.natural_gradient, (48, 50), 5, history_dtype, steps=8)


def test_bf16_gradient_input():
    compare_with_reference(kernel_module.natural_gradient, (6, 10), 4, torch.float32, grad_dtype=torch.bfloat16)


def test_launcher_errors():
    state = {k: v.to(DEVICE) for k, v in new_history((4, 5), 3, torch.float32, torch.device("cpu")).items()}
    args = (state["grad_history"], state["history_gram"], state["history_count"])
    grad = torch.randn(4, 5, device=DEVICE)
    with pytest.raises(ValueError, match="low_rank_grad must have shape"):
        kernel_module.natural_gradient(grad.t(), *args, damping=DAMPING)
    with pytest.raises(TypeError, match="history_gram"):
        kernel_module.natural_gradient(grad, args[0], args[1].float(), args[2], damping=DAMPING)
    with pytest.raises(TypeError, match="grad_history"):
        kernel_module.natural_gradient(grad, args[0].half(), *args[1:], damping=DAMPING)
    with pytest.raises(ValueError, match="damping"):
        kernel_module.natural_gradient(grad, *args, damping=0.0)
    big = {k: v.to(DEVICE) for k, v in new_history((4, 5), 65, torch.float32, torch.device("cpu")).items()}
    with pytest.raises(ValueError, match="natural_history <= 64"):
        kernel_module.natural_gradient(grad, big["grad_history"], big["history_gram"], big["history_count"], damping=DAMPING)


# ------------------------------------------------------------------ planted defects

MUTATIONS = {
    "gram column not written": ("        gram = tl.where(cols == slot, dots[:, None], gram)\n", ""),
    "slot keeps the old dot": ("    dots = tl.where(offs == slot, self_dot, dots)\n", ""),
    "pivot not square-rooted": ("column / tl.sqrt(pivot)", "column / pivot"),
    "back substitution skipped": ("tl.where(offs < j, solution - row * value, solution)", "solution"),
    "damping dropped from the diagonal": ("tl.where(rows < size, damping, 1.0)", "tl.where(rows < size, 0.0, 1.0)"),
    "slot row not replaced in F": ("    rows = tl.where((offs_s == slot)[:, None] & finite, entering[None, :], rows)\n", ""),
    "non-finite flag never raised": ("        _raise_flag_if_nonfinite(entering, mask_k, flag_ptr)\n", ""),
    "history row not stored": ("        tl.store(history_ptr + slot.to(tl.int64) * stride_row + offs_k, stored, mask=mask_k)\n", "        pass\n"),
    "only the first partial summed": ("for index in range(num_partials)", "for index in range(1)"),
    "bf16 truncated, not rounded": ("    bits = bits + (0x7FFF + ((bits >> 16) & 1))\n", ""),
}


def _mutant(tmp_path: pathlib.Path, name: str, original: str, replacement: str):
    """A copy of the kernel module with one planted defect, importable by its own path."""
    source = pathlib.Path(kernel_module.__file__).read_text()
    assert source.count(original) == 1, f"mutation {name!r} no longer matches the kernel source"
    source = source.replace(original, replacement).replace("from ._launch", "from galore_kernels.kernels._launch")
    source = source.replace("from .nonfinite", "from galore_kernels.kernels.nonfinite")
    path = tmp_path / f"mutant_{abs(hash(name))}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.MAX_PARTIALS = 3
    return module


@pytest.mark.skipif(DEVICE != "cpu", reason="mutants are interpreted copies of the module (CPU interpreter run)")
@pytest.mark.parametrize("name", list(MUTATIONS))
def test_planted_defect_is_caught(tmp_path, name):
    mutant = _mutant(tmp_path, name, *MUTATIONS[name])
    caught = []
    for history_dtype in (torch.float32, torch.bfloat16):
        try:
            compare_with_reference(mutant.natural_gradient, (48, 50), 5, history_dtype, steps=8)
        except AssertionError as error:
            caught.append(str(error))
    assert caught, f"planted defect {name!r} passed the comparison"


# ------------------------------------------------------------- the optimizers on the kernels


@pytest.mark.parametrize("cls", ["NaturalGaLoreAdamW", "NaturalGaLoreAdamW8bit"])
@pytest.mark.parametrize("proj_type, kwargs", [
    ("std", {}),
    ("reverse_std", {"history_dtype": torch.bfloat16, "history_on_refresh": "rotate"}),
    ("std", {"layerwise": True, "accumulation_steps": 2, "max_grad_norm": 0.05}),
])
def test_triton_backend_matches_torch_backend(cls, proj_type, kwargs):
    """fp32 parameters, 4 updates across 2 refreshes: only summation orders differ.

    With a bf16 history, an h whose two projections (kernel, reference) straddle a bf16
    tie rounds to neighbouring values, 2^-8 apart, and 8-bit moments can turn that into
    a one-code flip: there the drift is bounded by 0.5% of the update (measured 0.09%).
    """
    import galore_kernels as gk
    from test_optim_backends import make_model, train

    cls = getattr(gk, cls)
    extra = {"min_8bit_size": 64} if cls is gk.NaturalGaLoreAdamW8bit else {}
    reference, _ = train(cls, "torch", torch.float32, proj_type, natural_history=3, **extra, **kwargs)
    fused, optimizer = train(cls, "triton", torch.float32, proj_type, natural_history=3, **extra, **kwargs)
    assert optimizer.nonfinite_skips == 0
    for start, expected, actual in zip(make_model(torch.float32).parameters(), reference.parameters(), fused.parameters()):
        if kwargs.get("history_dtype") == torch.bfloat16 and extra:
            assert (actual - expected).abs().max() <= 5e-3 * (expected - start).abs().max()
        else:
            torch.testing.assert_close(actual, expected, rtol=2e-5, atol=1e-6)


def test_triton_backend_really_launches_the_kernel(monkeypatch):
    import galore_kernels as gk
    from galore_kernels import kernels, reference
    from test_optim_backends import groups, make_model

    called = []
    monkeypatch.setattr(reference, "natural_gradient", lambda *a, **k: pytest.fail("reference natural_gradient called"))
    original = kernels.natural_gradient
    monkeypatch.setattr(kernels, "natural_gradient", lambda *a, **k: (called.append(1), original(*a, **k))[1])
    model = make_model(torch.float32)
    optimizer = gk.NaturalGaLoreAdamW(groups(model, "std"), backend="triton")
    model(torch.randn(4, 72, device=DEVICE)).sum().backward()
    optimizer.step()
    assert len(called) == 2  # the two GaLore matrices
