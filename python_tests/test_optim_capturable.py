"""``capturable=True`` (``optim/capturable.py``): a steady ``step()`` that a CUDA graph can replay.

On the CPU (interpreter) the tests check what makes a step replayable and right:

* two consecutive steady steps make the very same launches (kernels, grids, every
  scalar argument, every persistent tensor's address), where ``capturable=False`` does not;
* capturable steps give bitwise the parameters and state of the default steps, over a
  refresh and a non-finite gradient, for each ``moments_on_refresh``: the bias corrections
  are computed on the device in fp64 from the device step, as the host computes them;
* a refresh writes the new projectors and moments into the tensors it replaces;
* a tensor lr written in place by a scheduler drives the update;
* ``refresh_due_next`` agrees with the refreshes the optimizer makes.

With CUDA, a steady step is captured in a ``torch.cuda.CUDAGraph`` and replayed across
refreshes (eager there), bitwise against eager capturable steps.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from test_kernels_adamw8bit import DEVICE, needs_triton_backend  # noqa: F401 (autouse fixture)

from galore_kernels import optim

CLASSES = [(optim.GaLoreAdamW, {}), (optim.GaLoreAdamW8bit, {"min_8bit_size": 64})]
"""min_8bit_size=64: the 8-bit class runs 8-bit low-rank moments and a batched 8-bit 1-D
parameter, and keeps the 24-value bias in fp32 (its bitsandbytes-eps path)."""


def build(cls, kwargs, *, capturable: bool, gap: int = 3, lr=1e-2, device=DEVICE, **options):
    """Four parameters: fp32 and bf16 GaLore matrices (left and right projections), two 1-D ones."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.1).to(device, dtype))
              for shape, dtype in (((40, 24), torch.float32), ((24, 40), torch.bfloat16),
                                   ((24,), torch.float32), ((100,), torch.float32))]
    groups = [{"params": params[:2], "rank": 4, "update_proj_gap": gap, "scale": 0.25, "proj_type": "std"},
              {"params": params[2:]}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = cls(groups, lr=lr, weight_decay=0.01, backend="triton", capturable=capturable, **kwargs, **options)
    for p in params:
        p.grad = torch.zeros_like(p)
    return params, optimizer


def set_grads(params, step: int, nonfinite: bool = False) -> None:
    """Low-rank-plus-noise gradients for ``step``, written into the same .grad tensors (a graph keeps their addresses)."""
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        values = torch.randn(p.shape, generator=gen)
        if p.dim() == 2:
            values = values * 0.1 + torch.randn(p.shape[0], 2, generator=gen) @ torch.randn(2, p.shape[1], generator=gen)
        p.grad.copy_(values)
    if nonfinite:
        params[0].grad[3, 5] = float("nan")


def state_snapshot(optimizer) -> list:
    return [{key: (value.clone() if torch.is_tensor(value) else value) for key, value in optimizer.state[p].items()}
            for group in optimizer.param_groups for p in group["params"]]


def assert_same_run(params_a, opt_a, params_b, opt_b) -> None:
    for a, b in zip(params_a, params_b):
        assert torch.equal(a, b), (a - b).abs().max()
    for state_a, state_b in zip(state_snapshot(opt_a), state_snapshot(opt_b)):
        assert state_a.keys() == state_b.keys()
        for key in state_a:
            if torch.is_tensor(state_a[key]):
                assert torch.equal(state_a[key], state_b[key]), key
            else:
                assert state_a[key] == state_b[key], key


@pytest.mark.parametrize("moments_on_refresh", ["keep", "reset", "rotate"])
@pytest.mark.parametrize(("cls", "kwargs"), CLASSES)
def test_capturable_steps_equal_default_steps_bitwise(cls, kwargs, moments_on_refresh):
    """Six steps: refreshes at the first and fourth, a NaN gradient at the fifth. The device's fp64
    bias corrections round to the host's fp32 arguments: the runs agree bit for bit."""
    runs = []
    for capturable in (False, True):
        params, optimizer = build(cls, kwargs, capturable=capturable, moments_on_refresh=moments_on_refresh)
        for step in range(6):
            set_grads(params, step, nonfinite=step == 4)
            optimizer.step()
        runs.append((params, optimizer))
    assert runs[1][1].refresh_count == runs[0][1].refresh_count == 4
    assert runs[1][1].nonfinite_skips == runs[0][1].nonfinite_skips == 1
    assert runs[1][1].skipped_steps == runs[0][1].skipped_steps == 1
    assert_same_run(*runs[0], *runs[1])


def _argument(value):
    if torch.is_tensor(value):
        return ("tensor", value.untyped_storage().data_ptr(), value.data_ptr(), value.dtype, tuple(value.shape),
                value.stride())
    return value if isinstance(value, (int, float, bool, str, type(None))) else repr(value)


@contextlib.contextmanager
def recorded_launches():
    """Every Triton launch under the interpreter, run as usual and recorded: kernel, grid, arguments."""
    from triton.runtime.interpreter import InterpretedFunction

    launches = []
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        launches.append((self.fn.__name__, grid, [_argument(a) for a in args],
                         sorted((key, _argument(value)) for key, value in kwargs.items())))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        yield launches
    finally:
        InterpretedFunction.run = original


def persistent_storages(params, optimizer) -> set:
    """Storages that outlive a step: parameters, gradients, state, the device counters and scalar table."""
    tensors = list(params) + [p.grad for p in params]
    tensors += [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    if optimizer.capturable:
        tensors += [optimizer._device_steps.counters, optimizer._device_steps.table]
    return {t.untyped_storage().data_ptr() for t in tensors}


def replayable(launches: list, persistent: set) -> list:
    """The launches as a graph would keep them: persistent tensors by address; scratch tensors (allocated by
    the step; a graph's private pool gives them the same address at every replay) by layout only."""
    kept = []
    for name, grid, args, kwargs in launches:
        def keep(value):
            if isinstance(value, tuple) and value[0] == "tensor" and value[1] not in persistent:
                return ("scratch",) + value[3:]
            return value
        kept.append((name, grid, [keep(a) for a in args], [(k, keep(v)) for k, v in kwargs]))
    return kept


@pytest.mark.skipif(DEVICE != "cpu", reason="records the interpreter's launches")
@pytest.mark.parametrize("capturable", [True, False])
@pytest.mark.parametrize(("cls", "kwargs"), CLASSES)
def test_two_steady_steps_make_identical_launches(cls, kwargs, capturable):
    params, optimizer = build(cls, kwargs, capturable=capturable, gap=100)
    for step in range(2):  # the first refreshes and creates the state; the second is steady
        set_grads(params, step)
        optimizer.step()
    steps = []
    for step in range(2, 4):
        set_grads(params, step)
        with recorded_launches() as launches:
            optimizer.step()
        steps.append(replayable(launches, persistent_storages(params, optimizer)))
    # Two GaLore parameters of three launches, one multi-tensor launch per state kind of the 1-D ones.
    assert len(steps[0]) == 2 * 3 + (1 if cls is optim.GaLoreAdamW else 2)
    if capturable:
        assert steps[0] == steps[1]
    else:  # the stamp and the bias corrections are passed by value: the test can tell
        assert steps[0] != steps[1]
        assert [launch[:2] for launch in steps[0]] == [launch[:2] for launch in steps[1]]


@pytest.mark.parametrize(("cls", "kwargs"), CLASSES)
def test_refresh_writes_into_the_same_storage(cls, kwargs):
    """A graph captured before a refresh reads the projectors and moments the refresh wrote."""
    params, optimizer = build(cls, kwargs, capturable=True, moments_on_refresh="rotate")
    set_grads(params, 0)
    optimizer.step()
    addresses = {id(p): {k: v.data_ptr() for k, v in optimizer.state[p].items() if torch.is_tensor(v)} for p in params}
    projectors = [optimizer.state[params[0]]["proj_left" if "proj_left" in optimizer.state[params[0]] else "proj_right"].clone()]
    for step in range(1, 4):  # the fourth step refreshes
        set_grads(params, step)
        optimizer.step()
    assert optimizer.refresh_count == 4
    state = optimizer.state[params[0]]
    assert not torch.equal(state["proj_left" if "proj_left" in state else "proj_right"], projectors[0])
    for p in params:
        assert {k: v.data_ptr() for k, v in optimizer.state[p].items() if torch.is_tensor(v)} == addresses[id(p)]


@pytest.mark.parametrize(("cls", "kwargs"), CLASSES)
def test_scheduled_tensor_lr_drives_the_update(cls, kwargs):
    """An fp64 tensor lr, changed in place by a scheduler, gives bitwise what the same float schedule gives."""
    runs = []
    for capturable in (False, True):
        lr = torch.tensor(1e-2, dtype=torch.float64, device=DEVICE) if capturable else 1e-2
        params, optimizer = build(cls, kwargs, capturable=capturable, lr=lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
        for step in range(4):
            set_grads(params, step)
            optimizer.step()
            scheduler.step()
        runs.append((params, optimizer))
    assert torch.is_tensor(runs[1][1].param_groups[0]["lr"])
    assert_same_run(*runs[0], *runs[1])
    # And the schedule mattered: a constant tensor lr ends elsewhere.
    params, optimizer = build(cls, kwargs, capturable=True, lr=torch.tensor(1e-2, dtype=torch.float64, device=DEVICE))
    for step in range(4):
        set_grads(params, step)
        optimizer.step()
    assert not torch.equal(params[0], runs[1][0][0])


@pytest.mark.parametrize("refresh", ["fixed", "adaptive"])
def test_refresh_due_next_predicts_the_refreshes(refresh):
    params, optimizer = build(optim.GaLoreAdamW, {}, capturable=True, gap=2, refresh=refresh, stagger=True)
    assert optimizer.refresh_due_next()  # no state yet
    for step in range(7):
        due = optimizer.refresh_due_next()
        before = optimizer.refresh_count
        set_grads(params, step)
        optimizer.step()
        assert due == (optimizer.refresh_count > before), step


def test_replay_keeps_the_host_step_counts(monkeypatch):
    """The host's step counts decide the refreshes: a captured step leaves them (it ran nothing), each
    replay advances them, and a replay or a capture at a refresh step is refused. The capture is
    emulated (``capturing`` answers True; on the CPU the kernels still run), the graph is a stand-in."""
    from galore_kernels.optim import capturable as capturable_steps

    params, optimizer = build(optim.GaLoreAdamW, {}, capturable=True, gap=4)
    for step in range(2):
        set_grads(params, step)
        optimizer.step()
    monkeypatch.setattr(capturable_steps, "capturing", lambda device: True)
    optimizer.step()
    monkeypatch.undo()
    assert [optimizer.state[p]["step"] for p in params] == [2] * 4

    class Graph:
        replays = 0

        def replay(self):
            self.replays += 1

    graph = Graph()
    optimizer.replay(graph)
    optimizer.replay(graph)
    assert [optimizer.state[p]["step"] for p in params] == [4] * 4 and graph.replays == 2
    assert optimizer.refresh_due_next()
    with pytest.raises(ValueError, match="refresh is due"):
        optimizer.replay(graph)
    assert graph.replays == 2
    monkeypatch.setattr(capturable_steps, "capturing", lambda device: True)
    with pytest.raises(ValueError, match="refresh is due"):
        optimizer.step()


def test_capturable_refuses_what_it_cannot_capture():
    params = [torch.nn.Parameter(torch.zeros(8, 8))]
    for options in ({"layerwise": True}, {"max_grad_norm": 1.0}, {"backend": "torch"}):
        with pytest.raises(ValueError, match="capturable"):
            optim.GaLoreAdamW(params, capturable=True, **options)
    with pytest.raises(ValueError, match="capturable"):
        optim.NaturalGaLoreAdamW(params, capturable=True)
    optimizer = optim.GaLoreAdamW(params, capturable=True, backend="auto")
    params[0].grad = torch.zeros(8, 8)
    if DEVICE == "cpu":  # "auto" on CPU tensors is the torch reference, which reads no device scalars
        with pytest.raises(ValueError, match="Triton kernels"):
            optimizer.step()
    with pytest.raises(ValueError, match="replay needs"):
        optimizer.replay(None)
    params, optimizer = build(optim.GaLoreAdamW, {}, capturable=True)
    optimizer.param_groups[0]["lr"] = torch.tensor([1e-2, 1e-3], device=DEVICE)
    with pytest.raises(ValueError, match="tensor lr must hold one value"):
        optimizer.step()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize(("cls", "kwargs"), CLASSES)
def test_cuda_graph_replay_equals_eager_steps(cls, kwargs):
    """The README's pattern: warm up eagerly, capture one steady step, then replay it, with the
    refresh steps (every 4th: three of them after the capture) and a NaN gradient step run as due."""
    steps, nonfinite_step = 14, 6
    runs = []
    for use_graph in (False, True):
        params, optimizer = build(cls, kwargs, capturable=True, gap=4, device="cuda")
        graph, replays = None, 0
        for step in range(steps):
            set_grads(params, step, nonfinite=step == nonfinite_step)
            if use_graph and graph is None and step >= 2 and not optimizer.refresh_due_next():
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    optimizer.step()
            if graph is not None and not optimizer.refresh_due_next():
                optimizer.replay(graph)
                replays += 1
            else:
                optimizer.step()
        torch.cuda.synchronize()
        runs.append((params, optimizer))
        if use_graph:
            assert replays >= steps - 2 - 4 and optimizer.refresh_count == 2 * 4
    assert runs[1][1].nonfinite_skips == runs[0][1].nonfinite_skips == 1
    assert_same_run(*runs[0], *runs[1])
