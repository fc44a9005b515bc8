"""The step-stamped persistent non-finite flag (``kernels/nonfinite.py``), kernels against references.

A step is skipped when its own stamp is in the flag, and only then: a flag left by an
earlier step must read as clear (the flag is never zeroed), a skipped step sets the
flag to its stamp and adds one to ``nonfinite_skips`` inside the kernel, and the
reference does the same. Each family runs the sequence: stale flag + finite gradient
(updated), non-finite gradient (skipped), finite gradient at the next stamp (updated).
"""

from __future__ import annotations

import pytest
import torch
from test_kernels_adamw8bit import DEVICE, needs_triton_backend  # noqa: F401 (autouse fixture)

from galore_kernels import kernels, quant, reference

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.1)
M, N, RANK = 19, 23, 4


def make_case(family: str, side: str, gen: torch.Generator):
    """``(step function name, param, tensors after param and grad, projection kwargs)`` for one family."""
    param = torch.randn(M, N, generator=gen).to(DEVICE)
    projection = {}
    if side != "none":
        proj_left = torch.linalg.qr(torch.randn(M, RANK, generator=gen))[0].to(DEVICE) if side == "left" else None
        proj_right = torch.linalg.qr(torch.randn(N, RANK, generator=gen))[0].t().contiguous().to(DEVICE) if side == "right" else None
        projection = dict(proj_left=proj_left, proj_right=proj_right, scale=0.25)
    low_rank = (RANK, N) if side == "left" else (M, RANK) if side == "right" else (M, N)
    if family == "galore_adamw":
        moments = [torch.zeros(low_rank, device=DEVICE), torch.zeros(low_rank, device=DEVICE)]
        if side == "none":
            projection = dict(proj_left=None, proj_right=None)
        return "galore_adamw_step", param, moments, projection
    layout = quant.lowrank_layout(low_rank, side) if side != "none" else (M, N)
    blocks = -(-M * N // quant.BLOCK_SIZE) if side == "none" else -(-low_rank[0] * low_rank[1] // quant.BLOCK_SIZE)
    quantized = [torch.zeros(layout, dtype=torch.uint8, device=DEVICE), torch.zeros(blocks, device=DEVICE),
                 torch.zeros(layout, dtype=torch.uint8, device=DEVICE), torch.zeros(blocks, device=DEVICE)]
    return ("adamw8bit_step" if side == "none" else "galore_adamw8bit_step"), param, quantized, projection


CASES = [("galore_adamw", side) for side in ("none", "left", "right")] + [("adamw8bit", "none"), ("galore_adamw8bit", "left")]


@pytest.mark.parametrize(("family", "side"), CASES)
def test_stamped_flag_skips_only_its_own_step(family, side):
    gen = torch.Generator().manual_seed(11)
    name, param, state, projection = make_case(family, side, gen)
    runs = {}
    for backend in (kernels, reference):
        p, s = param.clone(), [t.clone() for t in state]
        # A stale flag from step 4 of some earlier skip: must not skip step 5.
        flag = torch.full((), 4, dtype=torch.int32, device=DEVICE)
        skips = torch.full((), 2, dtype=torch.int64, device=DEVICE)
        history = []
        for stamp, poison in ((5, False), (6, True), (7, False)):
            grad = torch.randn(M, N, generator=torch.Generator().manual_seed(stamp)).to(DEVICE)
            if poison:
                grad[M - 1, N - 2] = float("nan")
            before = [p.clone(), *(t.clone() for t in s)]
            getattr(backend, name)(p, grad, *s, skips, **projection, **HYPER, step=stamp - 4, flag=flag, stamp=stamp)
            changed = [not torch.equal(a, b) for a, b in zip([p, *s], before)]
            history.append((changed[0], any(changed[1:]), flag.item(), skips.item()))
        runs[backend.__name__] = (history, p)
    kernel_history, kernel_param = runs["galore_kernels.kernels"]
    assert kernel_history == [(True, True, 4, 2), (False, False, 6, 3), (True, True, 6, 3)]
    assert kernel_history == runs["galore_kernels.reference"][0]
    torch.testing.assert_close(kernel_param, runs["galore_kernels.reference"][1], rtol=1e-5, atol=1e-6)


def test_flag_and_stamp_are_checked():
    param, grad = torch.randn(3, 5, device=DEVICE), torch.randn(3, 5, device=DEVICE)
    moments = [torch.zeros(3, 5, device=DEVICE), torch.zeros(3, 5, device=DEVICE)]
    skips = torch.zeros((), dtype=torch.int64, device=DEVICE)
    kwargs = dict(proj_left=None, proj_right=None, **HYPER, step=1)
    with pytest.raises(ValueError, match="0-d int32"):
        kernels.galore_adamw_step(param, grad, *moments, skips, **kwargs,
                                  flag=torch.zeros((), dtype=torch.int64, device=DEVICE), stamp=1)
    with pytest.raises(ValueError, match="stamp"):
        kernels.galore_adamw_step(param, grad, *moments, skips, **kwargs,
                                  flag=torch.zeros((), dtype=torch.int32, device=DEVICE), stamp=0)


def _trained_optimizer():
    gen = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(24, 40, generator=gen)), torch.nn.Parameter(torch.randn(40, generator=gen))]
    from galore_kernels import GaLoreAdamW

    optimizer = GaLoreAdamW([{"params": params[:1], "rank": 4, "update_proj_gap": 50, "scale": 0.25, "proj_type": "std"},
                             {"params": params[1:]}], lr=1e-2, backend="torch", svd="exact")
    for step in (1, 2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
            if step == 2:
                p.grad.view(-1)[3] = float("inf")
        optimizer.step()
    return optimizer, params


def test_checkpoint_keeps_the_flag_and_loads_without_it(tmp_path):
    import copy

    from galore_kernels import GaLoreAdamW

    optimizer, params = _trained_optimizer()
    assert [optimizer.state[p]["nonfinite_flag"].item() for p in params] == [2, 2]
    path = tmp_path / "optimizer.pt"
    torch.save(optimizer.state_dict(), path)
    saved = torch.load(path, weights_only=True)

    def fresh():
        return GaLoreAdamW([{"params": params[:1], "rank": 4, "update_proj_gap": 50, "scale": 0.25, "proj_type": "std"},
                            {"params": params[1:]}], lr=1e-2, backend="torch", svd="exact")

    restored = fresh()
    restored.load_state_dict(copy.deepcopy(saved))
    assert [restored.state[p]["nonfinite_flag"].item() for p in params] == [2, 2]
    # A checkpoint from before the flag existed loads, and the first update makes the flag.
    old = copy.deepcopy(saved)
    for state in old["state"].values():
        del state["nonfinite_flag"]
    restored = fresh()
    restored.load_state_dict(old)
    for p in params:
        p.grad = torch.randn(p.shape)
    restored.step()
    assert [restored.state[p]["nonfinite_flag"].item() for p in params] == [0, 0]
    assert restored.nonfinite_skips == 2  # the two skips of step 2, carried by the checkpoint
    wrong = copy.deepcopy(saved)
    for state in wrong["state"].values():
        state["nonfinite_flag"] = state["nonfinite_flag"].long()
    with pytest.raises(ValueError, match="nonfinite_flag"):
        fresh().load_state_dict(wrong)


@pytest.mark.parametrize("name", ["natural_galore_adamw_step", "natural_galore_adamw8bit_step"])
def test_stamped_flag_natural_galore(name):
    """Natural GaLore shares the flag: a stale stamp reads clear, a non-finite step leaves the
    parameter, the moments and the history (ring, Gram, count) alone and counts once."""
    from galore_kernels.reference.natural_galore import new_history

    gen = torch.Generator().manual_seed(13)
    family = "galore_adamw" if name == "natural_galore_adamw_step" else "galore_adamw8bit"
    _, param, state, projection = make_case(family, "left", gen)
    history = new_history((RANK, N), 3, torch.float32, torch.device(DEVICE))
    runs = {}
    for backend in (kernels, reference):
        p, s = param.clone(), [t.clone() for t in state]
        h = [t.clone() for t in history.values()]
        flag = torch.full((), 4, dtype=torch.int32, device=DEVICE)
        skips = torch.full((), 2, dtype=torch.int64, device=DEVICE)
        trace = []
        for stamp, poison in ((5, False), (6, True), (7, False)):
            grad = torch.randn(M, N, generator=torch.Generator().manual_seed(stamp)).to(DEVICE)
            if poison:
                grad[M - 1, N - 2] = float("inf")
            before = [p.clone(), *(t.clone() for t in s), *(t.clone() for t in h)]
            getattr(backend, name)(p, grad, *s, skips, *h, damping=1e-3, **projection, **HYPER, step=stamp - 4,
                                   flag=flag, stamp=stamp)
            changed = [not torch.equal(a, b) for a, b in zip([p, *s, *h], before)]
            trace.append((changed[0], any(changed[1:1 + len(s)]), any(changed[1 + len(s):]), flag.item(), skips.item()))
        runs[backend.__name__] = (trace, p, h)
    kernel_trace, kernel_param, kernel_history = runs["galore_kernels.kernels"]
    assert kernel_trace == [(True, True, True, 4, 2), (False, False, False, 6, 3), (True, True, True, 6, 3)]
    assert kernel_trace == runs["galore_kernels.reference"][0]
    torch.testing.assert_close(kernel_param, runs["galore_kernels.reference"][1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kernel_history[2], runs["galore_kernels.reference"][2][2])
