"""No kernel's result depends on the order in which its grid's programs run.

The interpreter runs a grid's programs one after another in index order; a GPU runs
them concurrently and in any order. ``program_order`` makes the interpreter run every
grid in reverse or in a shuffled order, and each launcher's results (parameters,
moments, flags) must be bit-identical to the natural order's.
"""

import contextlib
import random

import pytest
import torch

import galore_kernels as gk
from galore_kernels import kernels
from galore_kernels.kernels._launch import interpreting

pytestmark = pytest.mark.skipif(not interpreting(), reason="reorders the interpreter's grid loop (TRITON_INTERPRET=1)")

ORDERS = ("reverse", "shuffle")


@contextlib.contextmanager
def program_order(order: str, seed: int = 0):
    """Run each interpreted grid's programs in ``order``; yields a list of the grids reordered.

    The interpreter's loop visits programs (x, y, z) in index order and announces each
    with ``set_grid_idx``; remapping the n-th announced index to the n-th element of a
    permutation runs every program exactly once, in the permuted order.
    """
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    set_grid_dim, set_grid_idx = builder.set_grid_dim, builder.set_grid_idx
    reordered = []
    grid = {}

    def permuted_grid_dim(nx, ny, nz):
        programs = list(range(nx * ny * nz))
        if order == "reverse":
            programs.reverse()
        else:
            random.Random(seed + len(reordered)).shuffle(programs)
        grid.update(dims=(nx, ny, nz), programs=programs)
        if len(programs) > 1:
            reordered.append((nx, ny, nz))
        set_grid_dim(nx, ny, nz)

    def permuted_grid_idx(x, y, z):
        _, ny, nz = grid["dims"]
        program = grid["programs"][(x * ny + y) * nz + z]
        px, rest = divmod(program, ny * nz)
        set_grid_idx(px, *divmod(rest, nz))

    builder.set_grid_dim, builder.set_grid_idx = permuted_grid_dim, permuted_grid_idx
    try:
        yield reordered
    finally:
        del builder.set_grid_dim, builder.set_grid_idx


@contextlib.contextmanager
def count_launcher_calls(monkeypatch):
    """Counts the calls of every launcher ``galore_kernels.kernels`` exports."""
    calls = dict.fromkeys(kernels.__all__, 0)
    for name in kernels.__all__:
        launcher = getattr(kernels, name)

        def counted(*args, _name=name, _launcher=launcher, **kwargs):
            calls[_name] += 1
            return _launcher(*args, **kwargs)

        monkeypatch.setattr(kernels, name, counted)
    yield calls


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's raw bytes, so NaN payloads and signed zeros compare exactly."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def train(cls, order: str | None, **kwargs) -> list[torch.Tensor]:
    """Three steps over left/right/full GaLore matrices and plain vectors; every resulting tensor.

    The matrices' grids span several programs in both dimensions (150×70 at rank 20
    tiles 2×2 at the matmuls' smallest tiles); the 16500-value vector (above the
    multi-tensor bound) spans many programs of the plain kernels, and the 5000- and
    33-value vectors share one multi-tensor launch (a program each). Two more 70×150 right-side
    matrices share one group, so the Adam classes step them in grouped launches (members on the
    grid's second axis). The third step's gradients hold a NaN, so the
    skip path (flag raised by some program, read by all) runs too.
    """
    torch.manual_seed(0)
    matrices = {side: torch.nn.Parameter(torch.randn(150, 70, dtype=torch.bfloat16)) for side in ("left", "right", "full")}
    vectors = [torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(33)),
               torch.nn.Parameter(torch.randn(16500))]
    groups = [{"params": [p], "rank": 20, "update_proj_gap": 100, "scale": 0.5, "proj_type": side}
              for side, p in matrices.items()]
    pair = [torch.nn.Parameter(torch.randn(70, 150, dtype=torch.bfloat16)) for _ in range(2)]
    groups.append({"params": pair, "rank": 20, "update_proj_gap": 100, "scale": 0.5, "proj_type": "right"})
    groups.append({"params": vectors})
    optimizer = cls(groups, lr=1e-2, weight_decay=0.1, backend="triton", **kwargs)
    params = [*matrices.values(), *pair, *vectors]
    generator = torch.Generator().manual_seed(1)
    with program_order(order) if order else contextlib.nullcontext([None]) as reordered:
        for step in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)
                if step == 2:
                    p.grad.view(-1)[7] = float("nan")
            optimizer.step()
        # The projection alone (the optimizer's accumulation and clipping path).
        projections = [
            kernels.project(matrices[side].grad.nan_to_num(), optimizer.state[matrices[side]].get("proj_left"),
                            optimizer.state[matrices[side]].get("proj_right"))
            for side in matrices
        ]
    assert reordered, "no grid was reordered"
    assert optimizer.nonfinite_skips == len(params)
    state = [t for p in params for t in optimizer.state[p].values() if isinstance(t, torch.Tensor)]
    return [p.detach() for p in params] + state + projections


@pytest.mark.parametrize("cls", [gk.GaLoreAdamW, gk.GaLoreAdamW8bit, gk.NaturalGaLoreAdamW])
def test_results_do_not_depend_on_program_order(cls, monkeypatch):
    kwargs = {"min_8bit_size": 64} if cls is gk.GaLoreAdamW8bit else {}
    with count_launcher_calls(monkeypatch) as calls:
        natural = train(cls, None, **kwargs)
        for order in ORDERS:
            reordered = train(cls, order, **kwargs)
            assert len(reordered) == len(natural)
            for i, (expected, actual) in enumerate(zip(natural, reordered)):
                assert torch.equal(bits(actual), bits(expected)), f"tensor {i} differs in {order} order"
    # The small vectors take the multi-tensor launches (GaLoreAdamW8bit: the 33-value one fp32, the 5000-value 8-bit).
    if kwargs:
        expected = {"galore_adamw8bit_step", "adamw8bit_step", "multi_tensor_adamw_step", "multi_tensor_adamw8bit_step",
                    "grouped_galore_adamw8bit_step", "project"}
    else:
        expected = {"galore_adamw_step", "multi_tensor_adamw_step", "grouped_galore_adamw_step", "project"}
    if cls is gk.NaturalGaLoreAdamW:  # each matrix steps alone, with its own history
        expected = expected - {"grouped_galore_adamw_step"} | {"natural_galore_adamw_step"}
    assert {name for name, count in calls.items() if count} == expected


def test_adafactor_does_not_depend_on_program_order(monkeypatch):
    """GaLoreAdafactor's four launches (row/column averages, the factored update with per-program
    partial sums, the finalize that adds them in a fixed order) over the same three steps."""
    with count_launcher_calls(monkeypatch) as calls:
        natural = train(gk.GaLoreAdafactor, None, relative_step=False)
        for order in ORDERS:
            for i, (expected, actual) in enumerate(zip(natural, train(gk.GaLoreAdafactor, order, relative_step=False))):
                assert torch.equal(bits(actual), bits(expected)), f"tensor {i} differs in {order} order"
    assert {name for name, count in calls.items() if count} == {"galore_adafactor_step", "project"}


@pytest.mark.parametrize("max_programs", [1024, 4])
def test_lomo_kernels_do_not_depend_on_program_order(max_programs, monkeypatch):
    """LOMO's elementwise grid, and AdaLomo's launches with per-program partials, with both clips:
    a 70×300 matrix (5 row tiles × 3 column strips; with 4 programs allowed, 2 row groups of up
    to 4 tiles, so programs walk several tiles) and a 2500-value vector (3 programs)."""
    from galore_kernels.kernels import lomo as lomo_kernels

    monkeypatch.setattr(lomo_kernels, "MAX_PROGRAMS", max_programs)

    def run(order):
        generator = torch.Generator().manual_seed(2)
        matrix = torch.randn(70, 300, generator=generator)  # 21000 values: eleven LOMO programs
        vector = torch.randn(2500, generator=generator)
        tensors = [matrix.clone(), matrix.clone(), torch.zeros(70), torch.zeros(300), vector, torch.zeros(2500)]
        grads = [torch.randn(t.shape, generator=generator) for t in (matrix, matrix, vector)]
        coef = torch.tensor(0.5)
        with program_order(order) if order else contextlib.nullcontext([None]) as reordered:
            kernels.lomo_step(tensors[0], grads[0], lr=1e-2, clip_coef=coef, clip_grad_value=1.0)
            for step in (1, 2):
                kernels.adalomo_step(tensors[1], grads[1], tensors[2], tensors[3], None, lr=1e-2, step=step,
                                     weight_decay=0.1, clip_coef=coef, clip_grad_value=1.0)
                kernels.adalomo_step(tensors[4], grads[2], None, None, tensors[5], lr=1e-2, step=step,
                                     weight_decay=0.1, clip_coef=coef, clip_grad_value=1.0)
        # LOMO, then per AdaLomo step the matrix's four launches and the vector's two.
        assert order is None or len(reordered) == 1 + 2 * (4 + 2)
        return tensors

    natural = run(None)
    for order in ORDERS:
        for i, (expected, actual) in enumerate(zip(natural, run(order))):
            assert torch.equal(bits(actual), bits(expected)), f"tensor {i} differs in {order} order"


def test_reordering_exposes_a_program_that_reads_another():
    """The mode can fail: a kernel whose program i reads what program i - 1 wrote."""
    import triton
    import triton.language as tl

    @triton.jit
    def running_copy(x_ptr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        previous = tl.load(x_ptr + offs - BLOCK, mask=offs >= BLOCK, other=0.0)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs) + previous)

    def run(order):
        x = torch.arange(64, dtype=torch.float32)
        with program_order(order) if order else contextlib.nullcontext():
            running_copy[(8,)](x, BLOCK=8)
        return x

    natural = run(None)
    for order in ORDERS:
        assert not torch.equal(run(order), natural)
