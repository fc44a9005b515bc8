"""kernels/grouped_steps.py: the steps of many same-shape GaLore matrices in three launches.

Against the per-parameter kernels (bitwise: a member's programs run exactly its own
launch's code and tiles) and against the reference (``reference/grouped_steps.py``, with
the tolerances of the per-parameter tests). Three members of an odd shape, gradients with
low-rank structure plus noise, three steps so the moments carry, NaN-filled scratch, and
(where asked) a non-finite gradient for one member at step 2: that member alone is
skipped. A small ``SCRATCH_BYTES`` splits a group into several launches of three.
"""

from __future__ import annotations

import pytest
import torch
from test_kernels_adamw8bit import DEVICE, PARAM_SCALE, assert_param_close, needs_triton_backend  # noqa: F401
from test_kernels_galore_adamw import poisoned_empty
from test_kernels_galore_adamw8bit import assert_states_close, random_lowrank_state

from galore_kernels import kernels, reference
from galore_kernels.kernels import grouped_steps
from galore_kernels.projector import projector_dtype

HYPER = dict(lr=5e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, scale=0.25)
M, N, RANK, MEMBERS = 37, 53, 5, 3


def low_rank_shape(side):
    return (RANK, N) if side == "left" else (M, RANK)


def make_group(kind, side, dtype, gen, members=MEMBERS):
    """``(params, states, skips, flags, projectors)``: per-member lists, moments random and non-zero."""
    params = [(torch.randn(M, N, generator=gen) * PARAM_SCALE).to(DEVICE, dtype) for _ in range(members)]
    shape = low_rank_shape(side)
    if kind == "fp32":
        states = [[(torch.randn(shape, generator=gen) * 0.1).to(DEVICE) for _ in range(members)],
                  [(torch.rand(shape, generator=gen) * 0.01).to(DEVICE) for _ in range(members)]]
    else:
        per_member = [random_lowrank_state(side, shape, gen) for _ in range(members)]
        states = [list(column) for column in zip(*per_member)]
    skips = [torch.zeros((), dtype=torch.int64, device=DEVICE) for _ in range(members)]
    flags = [torch.zeros((), dtype=torch.int32, device=DEVICE) for _ in range(members)]
    proj_shape, fan = ((M, RANK), M) if side == "left" else ((RANK, N), N)
    # As a refresh stores them: in a 16-bit parameter's dtype.
    projs = [(torch.randn(proj_shape, generator=gen) / fan**0.5).to(DEVICE, projector_dtype(dtype))
             for _ in range(members)]
    return params, states, skips, flags, projs


def clone_group(group):
    params, states, skips, flags, projs = group
    return ([p.clone() for p in params], [[t.clone() for t in column] for column in states],
            [s.clone() for s in skips], [f.clone() for f in flags], projs)


def structured_grads(dtype, gen, members=MEMBERS):
    """Rank-3 signal plus noise, the structure the 8-bit moments' errors hide from in isotropic data."""
    return [(torch.randn(M, 3, generator=gen) @ torch.randn(3, N, generator=gen)
             + 0.1 * torch.randn(M, N, generator=gen)).to(DEVICE, dtype) for _ in range(members)]


def run_grouped(backend, kind, side, group, grads, step, table=None):
    params, states, skips, flags, projs = group
    launcher = backend.grouped_galore_adamw_step if kind == "fp32" else backend.grouped_galore_adamw8bit_step
    launcher(params, grads, *states, skips, flags, **{f"proj_{side}s": projs}, **HYPER, step=step, stamp=step,
             table=table)


def run_per_member(kind, side, group, grads, step):
    params, states, skips, flags, projs = group
    for i, (p, g) in enumerate(zip(params, grads)):
        projection = dict(proj_left=projs[i] if side == "left" else None, proj_right=projs[i] if side == "right" else None)
        state = [column[i] for column in states]
        launcher = kernels.galore_adamw_step if kind == "fp32" else kernels.galore_adamw8bit_step
        launcher(p, g, *state, skips[i], **projection, **HYPER, step=step, flag=flags[i], stamp=step)


def assert_member_close_to_reference(kind, group, referenced, fp32_twin, before, skipped):
    for i in range(len(group[0])):
        if i in skipped:
            assert torch.equal(group[0][i], before[i]) and torch.equal(referenced[0][i], before[i])
        else:
            assert_param_close(group[0][i], referenced[0][i], fp32_twin[0][i], before[i])
        ours, theirs = [column[i] for column in group[1]], [column[i] for column in referenced[1]]
        if kind == "fp32":
            for a, b in zip(ours, theirs):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        else:
            assert_states_close(ours, theirs, 1e-5)


@pytest.mark.parametrize("poison", [None, float("nan"), float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind", ["fp32", "8bit"])
def test_matches_per_parameter_kernels_and_reference(kind, side, dtype, poison):
    gen = torch.Generator().manual_seed(31)
    grouped = make_group(kind, side, dtype, gen)
    per_member, referenced = clone_group(grouped), clone_group(grouped)
    table = kernels.GroupedTable()
    for step in (1, 2, 3):
        grads = structured_grads(dtype, gen)
        if poison is not None and step == 2:
            grads[1][M - 1, N - 1] = poison
        before = [p.clone() for p in grouped[0]]
        fp32_twin = clone_group(referenced)
        fp32_twin = ([p.float() for p in fp32_twin[0]], *fp32_twin[1:])
        with poisoned_empty():
            run_grouped(kernels, kind, side, grouped, grads, step, table)
        run_per_member(kind, side, per_member, grads, step)
        run_grouped(reference, kind, side, referenced, grads, step)
        run_grouped(reference, kind, side, fp32_twin, grads, step)
        skipped = {1} if poison is not None and step == 2 else set()
        assert_member_close_to_reference(kind, grouped, referenced, fp32_twin, before, skipped)
        # Compared with the reference from the kernels' own state, as the per-parameter tests do.
        referenced = clone_group(grouped)
    for ours, theirs in zip(grouped[0] + sum(grouped[1], []), per_member[0] + sum(per_member[1], [])):
        assert torch.equal(ours, theirs)
    expected_skips = [int(poison is not None and i == 1) for i in range(MEMBERS)]
    assert [s.item() for s in grouped[2]] == expected_skips == [s.item() for s in per_member[2]]
    assert [f.item() for f in grouped[3]] == [2 * s for s in expected_skips]


@pytest.mark.parametrize("side", ["left", "right"])
def test_8bit_state_over_several_programs(side, monkeypatch):
    """1505 low-rank values per member (6 quantization blocks): a grouped launch takes 2 blocks per
    program, a per-matrix one 4, and the blocks are independent, so the results are still bitwise."""
    monkeypatch.setitem(globals(), "N" if side == "left" else "M", 301)
    test_matches_per_parameter_kernels_and_reference("8bit", side, torch.bfloat16, float("nan"))


@pytest.mark.parametrize("kind", ["fp32", "8bit"])
def test_large_group_runs_in_several_launches(kind, monkeypatch):
    """Five members with room for two per launch: three launches of three, one scratch, still bitwise."""
    members, side, dtype = 5, "right", torch.bfloat16
    per_member_bytes = -(-M * RANK // 8) * 8 * (4 + 2)  # R and N, in slots padded to 8 values
    monkeypatch.setattr(grouped_steps, "SCRATCH_BYTES", 2 * per_member_bytes + 1)
    projections = []
    real_matmul = grouped_steps.lowrank_matmul

    def counted(*args, epilogue, table, **kwargs):
        projections.append((epilogue, table.shape[0]))
        real_matmul(*args, epilogue=epilogue, table=table, **kwargs)

    monkeypatch.setattr(grouped_steps, "lowrank_matmul", counted)
    gen = torch.Generator().manual_seed(32)
    grouped = make_group(kind, side, dtype, gen, members)
    per_member = clone_group(grouped)
    for step in (1, 2):
        grads = structured_grads(dtype, gen, members)
        with poisoned_empty():
            run_grouped(kernels, kind, side, grouped, grads, step)
        run_per_member(kind, side, per_member, grads, step)
    assert projections[:6] == [("project", 2), ("apply", 2), ("project", 2), ("apply", 2), ("project", 1), ("apply", 1)]
    for ours, theirs in zip(grouped[0] + sum(grouped[1], []), per_member[0] + sum(per_member[1], [])):
        assert torch.equal(ours, theirs)


def test_offset_table_rebuilt_only_when_an_offset_changes():
    """A step's new scratch keeps the table; a gradient that moved rebuilds it."""
    gen = torch.Generator().manual_seed(33)
    group = make_group("8bit", "left", torch.bfloat16, gen)
    table = kernels.GroupedTable()
    grads = structured_grads(torch.bfloat16, gen)
    run_grouped(kernels, "8bit", "left", group, grads, 1, table)
    first = table._table
    run_grouped(kernels, "8bit", "left", group, grads, 2, table)
    assert table._table is first
    grads[2] = grads[2].clone()  # a new gradient tensor: its address is in the table
    run_grouped(kernels, "8bit", "left", group, grads, 3, table)
    assert table._table is not first
    column = table._table[: 4 * MEMBERS].view(MEMBERS, 4)[:, 1]  # the projection's y: the gradients
    assert column.tolist() == [(g.data_ptr() - grads[0].data_ptr()) // 2 for g in grads]


def test_bad_groups_are_refused():
    gen = torch.Generator().manual_seed(34)
    params, states, skips, flags, projs = make_group("fp32", "left", torch.bfloat16, gen)
    grads = structured_grads(torch.bfloat16, gen)

    def call(**changes):
        arguments = dict(params=params, grads=grads, exp_avgs=states[0], exp_avg_sqs=states[1], nonfinite_skips=skips,
                         flags=flags, proj_lefts=projs, **HYPER, step=1, stamp=1)
        arguments.update(changes)
        kernels.grouped_galore_adamw_step(**arguments)

    with pytest.raises(ValueError, match="one of them"):
        call(proj_rights=projs)
    with pytest.raises(ValueError, match="one of them"):
        call(proj_lefts=None)
    with pytest.raises(ValueError, match="must not be empty"):
        call(params=[], grads=[], exp_avgs=[], exp_avg_sqs=[], nonfinite_skips=[], flags=[], proj_lefts=[])
    with pytest.raises(ValueError, match="equal lengths"):
        call(grads=grads[:2])
    with pytest.raises(ValueError, match="start at one address"):
        call(params=[params[0], params[1], params[0]])
    with pytest.raises(ValueError, match="start at one address"):  # two tensors over one storage
        call(params=[params[0], params[1], params[0].view(M, N)])
    with pytest.raises(ValueError, match=r"grads\[2\] is \(37, 53\), strides \(1, 37\)"):
        call(grads=[*grads[:2], grads[2].t().contiguous().t()])
    with pytest.raises(ValueError, match=r"params\[1\] .*float16"):
        call(params=[params[0], params[1].half(), params[2]])
    with pytest.raises(ValueError, match="stamp"):
        call(stamp=0)
    with pytest.raises(ValueError, match="grad must have shape"):
        call(grads=[g[:, :-1] for g in grads])
    # Views into one buffer whose addresses disagree modulo 16 bytes: the kernels are specialized on grads[0]'s.
    padded = -(-M * N // 8) * 8  # 16-byte steps, but the third view one element further
    buffer = torch.zeros(3 * padded + 1, dtype=torch.bfloat16, device=DEVICE)
    views = [buffer[i * padded + (i == 2): i * padded + (i == 2) + M * N].view(M, N) for i in range(3)]
    with pytest.raises(ValueError, match=r"grads\[2\] lies 2 bytes off grads\[0\]'s alignment to 16 bytes"):
        call(grads=views)


@pytest.mark.parametrize("side, dtype, moments_on_refresh", [
    ("left", torch.bfloat16, "keep"), ("right", torch.float16, "rotate"), ("right", torch.float32, "reset")])
@pytest.mark.parametrize("cls, kwargs", [("GaLoreAdamW", {}), ("GaLoreAdamW8bit", {"min_8bit_size": 0}),
                                         ("GaLoreAdamW8bit", {"min_8bit_size": 10**6})])
def test_optimizer_steps_same_shape_matrices_together(cls, kwargs, side, dtype, moments_on_refresh):
    """step() groups the matrices of one shape and step (three, then two once one of them missed a
    step), across refreshes and a NaN step, and leaves the others alone; every tensor ends bitwise
    as with one launch set per matrix."""
    from galore_kernels import optim

    def train(grouping: bool):
        torch.manual_seed(0)
        shapes = [(40, 24)] * 3 + [(24, 40), (40, 24)]
        params = [torch.nn.Parameter(torch.randn(shape, dtype=dtype)) for shape in shapes]
        vector = torch.nn.Parameter(torch.randn(24))
        groups = [{"params": params[:4], "rank": 6, "update_proj_gap": 2, "scale": 0.25, "proj_type": side},
                  {"params": params[4:], "rank": 6, "update_proj_gap": 2, "scale": 0.5, "proj_type": side},
                  {"params": [vector]}]
        optimizer = getattr(optim, cls)(groups, lr=1e-2, weight_decay=0.1, backend="triton",
                                        moments_on_refresh=moments_on_refresh, **kwargs)
        calls = []
        real = optimizer._update_galore_together

        def recorded(ready):
            rest = real(ready) if grouping else ready
            calls.append(len(ready) - len(rest))
            return rest

        optimizer._update_galore_together = recorded
        generator = torch.Generator().manual_seed(1)
        for step in range(5):
            for p in [*params, vector]:
                p.grad = (torch.randn(p.shape[0], 2, generator=generator) @ torch.randn(2, p.shape[-1], generator=generator)
                          + 0.1 * torch.randn(p.shape, generator=generator)).to(p.dtype) if p.dim() == 2 else torch.randn(
                              p.shape, generator=generator)
            if step == 2:
                params[2].grad = None  # one step behind from now on: it no longer shares the others' launch
            if step == 3:
                params[1].grad[0, 0] = float("nan")
            optimizer.step()
        tensors = [p.detach() for p in params] + [t for p in params for t in optimizer.state[p].values()
                                                 if isinstance(t, torch.Tensor)]
        return tensors, calls, optimizer.nonfinite_skips

    grouped, calls, skips = train(True)
    alone, _, alone_skips = train(False)
    # The three (40, 24) matrices of the first group, then the two that stay in step.
    assert calls == [3, 3, 2, 2, 2], calls
    assert skips == alone_skips == 1
    assert len(grouped) == len(alone)
    for ours, theirs in zip(grouped, alone):
        assert torch.equal(ours.reshape(-1).view(torch.uint8), theirs.reshape(-1).view(torch.uint8))
