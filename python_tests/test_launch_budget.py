"""The launch and host-time budget of a steady ``optimizer.step()``, measured without a GPU.

The optimizers run on meta tensors (shapes, no storage) under
``bench.sm90_compile.count_launches()``: every Triton ``kernel[grid](...)`` is
recorded and not executed, and every torch op that would run a device kernel is
counted (views and bare allocations run none). A meta tensor refuses ``.item()``
and every other read of its values, so a step that completes here does no host
synchronization. Goals (issue 12):

* Triton launches per steady GaLore parameter <= 3, and no torch launch per parameter
  (the per-step torch ops, ``_end_step``'s skip bookkeeping, do not grow with it);
* all 1-D parameters of a group together <= 2 launches (one multi-tensor launch per
  state kind: fp32 moments, 8-bit moments);
* host time per parameter per step <= 25 µs (``HOST_US_PER_PARAM``): same-shape GaLore
  matrices step in grouped launches (``kernels/grouped_steps.py``), the 1-D parameters in
  multi-tensor ones.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import warnings

import pytest
import torch

from bench.sm90_compile import count_launches, record_launches
from galore_kernels import optim

RANK = 8
# The goal. Measured on the 2-core development machine (marginal thread CPU time,
# launches recorded, best of 7; the same with two busy loops on both cores): 18-21 µs per steady
# GaLore parameter of a grouped launch (fp32 and 8-bit moments) and 16-18 µs per batched 1-D
# parameter, of which ~5 µs is the meta device's Python decomposition of ``_end_step``'s
# ``torch.stack`` (a C++ op on CUDA); bench/NOTES.md.
HOST_US_PER_PARAM = 25.0

# The recorder replaces the launch of a compiled ``JITFunction``; under the interpreter
# the kernels are interpreter objects and would run on the meta tensors. There
# (``make test`` on a machine without a GPU) this module reruns itself in a child
# process without ``TRITON_INTERPRET``.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
compiling_triton = pytest.mark.skipif(INTERPRETED, reason="run by test_budget_without_the_interpreter")


@pytest.mark.skipif(not INTERPRETED, reason="this process records launches itself")
def test_budget_without_the_interpreter():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-s", __file__],
        env=env, capture_output=True, text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    print(completed.stdout[-3000:])
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-2000:]
    # Everything ran there but this runner itself.
    assert re.search(r"\b\d+ passed, 1 skipped in ", completed.stdout), completed.stdout[-2000:]


def steady_optimizer(cls, n_matrices: int, vector_sizes: list[int], *, side: str = "left", dtype=torch.bfloat16,
                     vector_dtypes=None, distinct_shapes: bool = False, **kwargs):
    """``cls`` over meta parameters, past its first (refresh) step: projectors in place, grads set.
    The matrices share one shape (one grouped launch), or with ``distinct_shapes`` each has its own."""
    m, n = (96, 160) if side == "left" else (160, 96)
    rows = [m + i if distinct_shapes and side == "right" else m for i in range(n_matrices)]
    cols = [n + i if distinct_shapes and side == "left" else n for i in range(n_matrices)]
    matrices = [torch.empty(rows[i], cols[i], dtype=dtype, device="meta", requires_grad=True) for i in range(n_matrices)]
    vector_dtypes = vector_dtypes or [dtype] * len(vector_sizes)
    vectors = [torch.empty(size, dtype=d, device="meta", requires_grad=True) for size, d in zip(vector_sizes, vector_dtypes)]
    groups = [{"params": matrices, "rank": RANK, "update_proj_gap": 10**6, "scale": 0.25, "proj_type": "std"},
              {"params": vectors}]
    optimizer = cls([g for g in groups if g["params"]], lr=1e-3, weight_decay=0.01, backend="triton", **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for p in matrices + vectors:
            state = optimizer._ensure_state(optimizer.param_groups[optimizer._group_index[p]], p)
            state["step"] = 1
            if p.dim() == 2:
                state["proj_left" if side == "left" else "proj_right"] = (
                    torch.empty(m, RANK, device="meta") if side == "left" else torch.empty(RANK, p.shape[1], device="meta"))
            p.grad = torch.empty_like(p)
    return optimizer


def launches_of_one_step(optimizer):
    with count_launches() as counted:
        optimizer.step()  # creates the persistent flags and the multi-tensor tables
        counted.clear()
        optimizer.step()
    return list(counted.triton), list(counted.torch_ops)


@compiling_triton
def test_meta_tensors_refuse_host_reads():
    """The premise of 'completes on meta tensors, so no host synchronization'."""
    with pytest.raises(Exception):
        torch.zeros((), device="meta").item()
    with pytest.raises(Exception):
        bool(torch.zeros((), device="meta") > 0)


@compiling_triton
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize(("cls", "kwargs"), [(optim.GaLoreAdamW, {}), (optim.GaLoreAdamW8bit, {"min_8bit_size": 0})])
@pytest.mark.parametrize("distinct_shapes", [False, True])
def test_steady_galore_parameter_launches(cls, kwargs, side, distinct_shapes):
    """Same-shape matrices share three grouped launches, whatever their number; a matrix of a shape
    of its own takes three launches."""
    few_triton, few_torch = launches_of_one_step(
        steady_optimizer(cls, 2, [], side=side, distinct_shapes=distinct_shapes, **kwargs))
    many_triton, many_torch = launches_of_one_step(
        steady_optimizer(cls, 5, [], side=side, distinct_shapes=distinct_shapes, **kwargs))
    if distinct_shapes:
        assert len(many_triton) - len(few_triton) == 3 * 3 and len(many_triton) == 5 * 3, many_triton
    else:
        assert many_triton == few_triton == ["_lowrank_matmul_kernel", KERNEL_OF_MOMENTS[cls], "_lowrank_matmul_kernel"]
    assert "_nonfinite_flag_kernel" not in many_triton  # the projection raises the flag
    # torch launches: a constant per step (the skip bookkeeping), none per parameter.
    assert many_torch == few_torch and len(many_torch) <= 4, many_torch
    assert not any("zero" in op or "fill" in op for op in many_torch), many_torch


KERNEL_OF_MOMENTS = {optim.GaLoreAdamW: "_adamw_moments_kernel", optim.GaLoreAdamW8bit: "_adamw8bit_kernel"}


@compiling_triton
@pytest.mark.parametrize(("cls", "kwargs"), [(optim.NaturalGaLoreAdamW, {}), (optim.NaturalGaLoreAdamW8bit, {"min_8bit_size": 0})])
def test_steady_natural_galore_parameter_launches(cls, kwargs):
    # GaLore's three plus the history's dots and solve; the flag is stamped, so no zeros,
    # no add_ of the skip count and no fill of λ per parameter.
    few_triton, few_torch = launches_of_one_step(steady_optimizer(cls, 2, [], **kwargs))
    many_triton, many_torch = launches_of_one_step(steady_optimizer(cls, 5, [], **kwargs))
    assert (len(many_triton) - len(few_triton)) / 3 == 5, many_triton
    assert many_torch == few_torch and len(many_torch) <= 4, many_torch


@compiling_triton
@pytest.mark.parametrize(("cls", "kwargs"), [(optim.GaLoreAdamW, {}), (optim.GaLoreAdamW8bit, {"min_8bit_size": 0})])
def test_capturable_steady_step_launches(cls, kwargs):
    """capturable=True keeps the budget: the device step counters and scalar table
    (``optim/capturable.py``) cost torch launches per step(), none per parameter."""
    few_triton, few_torch = launches_of_one_step(steady_optimizer(cls, 2, [64], capturable=True, **kwargs))
    many_triton, many_torch = launches_of_one_step(steady_optimizer(cls, 5, [64], capturable=True, **kwargs))
    per_parameter = (len(many_triton) - len(few_triton)) / 3
    assert per_parameter <= 3, many_triton
    assert len(many_triton) == 5 * per_parameter + 1  # and the 1-D parameter's multi-tensor launch
    assert many_torch == few_torch and len(many_torch) <= CAPTURABLE_TORCH_OPS_PER_STEP, many_torch
    assert many_torch[0] == "aten.add_.Tensor", many_torch  # the counters' increment, before anything reads them


CAPTURABLE_TORCH_OPS_PER_STEP = 30
"""The counters' increment, the fp64 scalar table (about 20 small ops) and the skip bookkeeping."""


@compiling_triton
@pytest.mark.parametrize(("cls", "kwargs", "expected"), [
    (optim.GaLoreAdamW, {}, ["_multi_tensor_adamw_kernel"]),
    # Below min_8bit_size fp32 moments, above it 8-bit ones: one launch of each kind.
    (optim.GaLoreAdamW8bit, {"min_8bit_size": 4096}, ["_multi_tensor_adamw_kernel", "_multi_tensor_adamw8bit_kernel"]),
])
def test_one_d_parameters_of_a_group_take_at_most_two_launches(cls, kwargs, expected):
    sizes = [1, 63, 4096, 4097, 11008, 16384, 255]
    triton_launches, torch_ops = launches_of_one_step(steady_optimizer(cls, 0, sizes, **kwargs))
    assert sorted(triton_launches) == sorted(expected)
    _, no_vectors_torch_ops = launches_of_one_step(steady_optimizer(cls, 1, [], **kwargs))
    assert len(torch_ops) == len(no_vectors_torch_ops)  # the skip bookkeeping only


@compiling_triton
def test_mixed_dtypes_launch_once_per_dtype():
    sizes = [64, 65, 66, 67]
    triton_launches, _ = launches_of_one_step(steady_optimizer(
        optim.GaLoreAdamW, 0, sizes, vector_dtypes=[torch.bfloat16, torch.float32, torch.bfloat16, torch.float32]))
    assert triton_launches == ["_multi_tensor_adamw_kernel"] * 2


@compiling_triton
def test_large_one_d_parameter_takes_the_per_tensor_launches():
    triton_launches, _ = launches_of_one_step(steady_optimizer(optim.GaLoreAdamW, 0, [16385, 7]))
    assert sorted(triton_launches) == ["_adamw_moments_kernel", "_multi_tensor_adamw_kernel", "_nonfinite_flag_kernel"]


@compiling_triton
def test_lr_schedule_and_steps_compile_nothing_new():
    """lr, bias corrections and the non-finite stamp are runtime arguments: 20 steps under a
    changing lr compile exactly what the first step compiled (Triton's own specialization key)."""
    optimizer = steady_optimizer(optim.GaLoreAdamW8bit, 2, [64, 4096], min_8bit_size=4096)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    with record_launches() as launches:
        optimizer.step()
        first = len(launches)
        for _ in range(20):
            scheduler.step()
            optimizer.step()
    assert optimizer.state[optimizer.param_groups[0]["params"][0]]["step"] == 22  # stamp 16 (divisible by 16) seen
    assert first == 5 and len(launches) == first, [launch.kernel for launch in launches]


def marginal_host_us(build, small: int = 8, large: int = 72, repeats: int = 7, steps: int = 5) -> float:
    """Host µs of one more parameter per step: the best-of-``repeats`` step time at ``large``
    parameters minus that at ``small``, over ``large - small`` (the per-step constant cancels).

    Time is this thread's CPU time: the host work itself, which other processes sharing the
    cores do not inflate (wall time under two busy loops on the 2-core machine read 3-4x).
    """
    def best_step_seconds(optimizer):
        best = float("inf")
        optimizer.step()
        for _ in range(repeats):
            started = time.thread_time()
            for _ in range(steps):
                optimizer.step()
            best = min(best, (time.thread_time() - started) / steps)
        return best

    with count_launches(torch_ops=False):
        seconds = best_step_seconds(build(large)) - best_step_seconds(build(small))
    return seconds / (large - small) * 1e6


@compiling_triton
def test_host_time_per_parameter():
    measured = {
        "GaLore fp32": marginal_host_us(lambda k: steady_optimizer(optim.GaLoreAdamW, k, [])),
        "GaLore 8-bit": marginal_host_us(lambda k: steady_optimizer(optim.GaLoreAdamW8bit, k, [], min_8bit_size=0)),
        "batched 1-D": marginal_host_us(lambda k: steady_optimizer(optim.GaLoreAdamW, 0, [160] * k)),
    }
    print("host µs per parameter per step: " + ", ".join(f"{name} {us:.1f}" for name, us in measured.items()))
    assert all(us <= HOST_US_PER_PARAM for us in measured.values()), measured
