"""kernels/multi_tensor.py: one launch for many small tensors, against the per-tensor kernels and the reference.

The batch mixes odd sizes (1, 255, 257, 1000, 1025: partial chunks and partial
quantization blocks) and, where asked, one tensor with a NaN or Inf gradient: that
tensor alone is skipped (flag set to the stamp, its skip count + 1), the others
update exactly as the per-tensor kernel updates them, bitwise. Three steps, so the
moments carry; the state starts non-zero for the fp32 moments.
"""

from __future__ import annotations

import pytest
import torch
from test_kernels_adamw8bit import DEVICE, needs_triton_backend  # noqa: F401 (autouse fixture)

from galore_kernels import kernels, quant, reference
from galore_kernels.kernels.multi_tensor import MAX_NUMEL, MultiTensorTable

SIZES = [1, 255, 257, 1000, 1025]
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.1)


def make_batch(kind: str, dtype: torch.dtype, gen: torch.Generator):
    params = [torch.randn(n, generator=gen).to(DEVICE, dtype) for n in SIZES]
    if kind == "fp32":
        states = [[torch.randn(n, generator=gen).to(DEVICE) for n in SIZES],
                  [torch.rand(n, generator=gen).to(DEVICE) for n in SIZES]]
    else:
        blocks = [-(-n // quant.BLOCK_SIZE) for n in SIZES]
        states = [[torch.zeros(n, dtype=torch.uint8, device=DEVICE) for n in SIZES],
                  [torch.zeros(b, device=DEVICE) for b in blocks],
                  [torch.zeros(n, dtype=torch.uint8, device=DEVICE) for n in SIZES],
                  [torch.zeros(b, device=DEVICE) for b in blocks]]
    skips = [torch.zeros((), dtype=torch.int64, device=DEVICE) for _ in SIZES]
    flags = [torch.zeros((), dtype=torch.int32, device=DEVICE) for _ in SIZES]
    return params, states, skips, flags


def clone_batch(batch):
    params, states, skips, flags = batch
    return [p.clone() for p in params], [[t.clone() for t in s] for s in states], [s.clone() for s in skips], [f.clone() for f in flags]


def run_per_tensor(kind, batch, grads, step):
    params, states, skips, flags = batch
    for i, (p, g) in enumerate(zip(params, grads)):
        state = [s[i] for s in states]
        if kind == "fp32":
            kernels.galore_adamw_step(p, g, *state, skips[i], proj_left=None, proj_right=None, **HYPER, step=step,
                                      flag=flags[i], stamp=step)
        else:
            kernels.adamw8bit_step(p, g, *state, skips[i], **HYPER, step=step, flag=flags[i], stamp=step)


def run_batched(backend, kind, batch, grads, step, table=None):
    params, states, skips, flags = batch
    launcher = backend.multi_tensor_adamw_step if kind == "fp32" else backend.multi_tensor_adamw8bit_step
    launcher(params, grads, *states, skips, flags, **HYPER, step=step, stamp=step, table=table)


@pytest.mark.parametrize("poison", [None, float("nan"), float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["fp32", "8bit"])
def test_matches_per_tensor_kernels_and_reference(kind, dtype, poison):
    gen = torch.Generator().manual_seed(21)
    batched = make_batch(kind, dtype, gen)
    per_tensor, referenced = clone_batch(batched), clone_batch(batched)
    table = MultiTensorTable()
    for step in (1, 2, 3):
        grads = [torch.randn(n, generator=gen).to(DEVICE, dtype) for n in SIZES]
        if poison is not None and step == 2:
            grads[3][999] = poison  # the 1000-element tensor, last element
        run_batched(kernels, kind, batched, grads, step, table)
        run_per_tensor(kind, per_tensor, grads, step)
        run_batched(reference, kind, referenced, grads, step)
    for ours, theirs in zip(batched[0] + sum(batched[1], []), per_tensor[0] + sum(per_tensor[1], [])):
        assert torch.equal(ours, theirs)
    expected_skips = [int(poison is not None and i == 3) for i in range(len(SIZES))]
    assert [s.item() for s in batched[2]] == expected_skips == [s.item() for s in referenced[2]]
    assert [f.item() for f in batched[3]] == [2 * s for s in expected_skips] == [f.item() for f in referenced[3]]
    for ours, ref in zip(batched[0], referenced[0]):
        # The reference computes in another op order (torch vs Triton): a few ulps of the parameter.
        torch.testing.assert_close(ours.float(), ref.float(), rtol=2e-2 if dtype != torch.float32 else 1e-5, atol=1e-5)


def test_table_is_cached_and_follows_moved_gradients():
    gen = torch.Generator().manual_seed(3)
    batch = make_batch("fp32", torch.float32, gen)
    params, states, skips, flags = batch
    table = MultiTensorTable()
    grads = [torch.randn(n, generator=gen).to(DEVICE) for n in SIZES]
    state_table, grad_table = table.tables(params, grads, flags, skips, list(zip(*states)))
    again = table.tables(params, grads, flags, skips, list(zip(*states)))
    assert again[0] is state_table and again[1] is grad_table
    moved = [g.clone() for g in grads]
    after = table.tables(params, moved, flags, skips, list(zip(*states)))
    assert after[0] is state_table and after[1] is not grad_table
    assert after[1].view(-1).tolist() == [g.data_ptr() for g in moved]


def test_refuses_mixed_dtypes_and_large_or_strided_tensors():
    gen = torch.Generator().manual_seed(4)
    params, (exp_avgs, exp_avg_sqs), skips, flags = make_batch("fp32", torch.float32, gen)
    grads = [torch.randn(n, generator=gen).to(DEVICE) for n in SIZES]
    kwargs = dict(**HYPER, step=1, stamp=1)
    mixed = [params[0].bfloat16(), *params[1:]]
    with pytest.raises(TypeError, match="one param dtype"):
        kernels.multi_tensor_adamw_step(mixed, grads, exp_avgs, exp_avg_sqs, skips, flags, **kwargs)
    big = torch.zeros(MAX_NUMEL + 1, device=DEVICE)
    with pytest.raises(ValueError, match="MAX_NUMEL"):
        kernels.multi_tensor_adamw_step([big], [big], [big], [big], skips[:1], flags[:1], **kwargs)
    strided = torch.zeros(2 * SIZES[2], device=DEVICE)[::2]
    with pytest.raises(ValueError, match="contiguous"):
        kernels.multi_tensor_adamw_step([params[2]], [strided], [exp_avgs[2]], [exp_avg_sqs[2]], skips[:1], flags[:1], **kwargs)
    with pytest.raises(ValueError, match="equal lengths"):
        kernels.multi_tensor_adamw_step(params, grads[:-1], exp_avgs, exp_avg_sqs, skips, flags, **kwargs)


def test_optimizer_batches_small_parameters_as_per_tensor_steps(monkeypatch):
    """``step()`` through the multi-tensor launches gives bitwise what the per-tensor steps give,
    a non-finite gradient skipping only its own parameter (GaLoreAdamW8bit: fp32 and 8-bit states)."""
    from galore_kernels import GaLoreAdamW8bit

    def train(batched: bool):
        if not batched:
            monkeypatch.setattr(GaLoreAdamW8bit, "_update_small_together", lambda self, ready: ready)
        generator = torch.Generator().manual_seed(8)
        params = [torch.nn.Parameter(torch.randn(n, generator=generator).to(DEVICE)) for n in (33, 300, 1025)]
        optimizer = GaLoreAdamW8bit([{"params": params}], lr=1e-2, min_8bit_size=64, backend="triton")
        for step in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator).to(DEVICE)
            if step == 1:
                params[1].grad[5] = float("nan")
            optimizer.step()
        monkeypatch.undo()
        return [p.detach() for p in params] + [t for p in params for t in optimizer.state[p].values() if torch.is_tensor(t)]

    batched, per_tensor = train(True), train(False)
    assert len(batched) == len(per_tensor)
    for ours, theirs in zip(batched, per_tensor):
        assert torch.equal(ours, theirs)
