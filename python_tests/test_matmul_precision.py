"""``matmul_precision``: how the kernels multiply fp32 projection operands ("tf32x3" or "ieee").

* bad values raise, in the launchers, the references and the optimizers (argument and group key);
* the key is in ``param_groups`` and ``state_dict()``, and a checkpoint without it loads with the default;
* it reaches the kernel: the ``FP32_PRECISION`` constexpr of every projection launch of an fp32
  parameter, recorded by the sm_90 gate's ``record_launches`` (the interpreter multiplies fp32 in
  numpy, IEEE, whatever it is asked, so only the launch can show the choice on a CPU);
* on a GPU, both precisions are within 1e-6 (relative, norm-wise) of the fp64 product
  (fp32 rounding of a 4096-term sum; TF32 alone, 10 mantissa bits, could not meet it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import galore_kernels as gk
from galore_kernels import kernels, reference

REPO_ROOT = Path(__file__).resolve().parent.parent


def _group(param, **extra):
    return {"params": [param], "rank": 4, "update_proj_gap": 2, "scale": 0.25, "proj_type": "std", **extra}


@pytest.mark.parametrize("backend", [reference, kernels])
def test_step_functions_refuse_unknown_precision(backend):
    if backend is kernels and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the kernels run on CPU tensors only under TRITON_INTERPRET=1")
    param, grad = torch.randn(24, 40), torch.randn(24, 40)
    moments = [torch.zeros(4, 40), torch.zeros(4, 40)]
    skips = torch.zeros((), dtype=torch.int64)
    with pytest.raises(ValueError, match="matmul_precision"):
        backend.galore_adamw_step(param, grad, *moments, skips, proj_left=torch.randn(24, 4), proj_right=None, lr=1e-3,
                                  beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1, matmul_precision="tf32")
    with pytest.raises(ValueError, match="matmul_precision"):
        backend.project(grad, torch.randn(24, 4), None, matmul_precision="fp64")


@pytest.mark.parametrize("optimizer_class", [gk.GaLoreAdamW, gk.GaLoreAdamW8bit, gk.GaLoreAdafactor])
def test_optimizers_take_and_check_the_key(optimizer_class):
    param = torch.nn.Parameter(torch.randn(24, 40))
    options = dict(relative_step=False, lr=1e-3) if optimizer_class is gk.GaLoreAdafactor else {}
    with pytest.raises(ValueError, match="matmul_precision"):
        optimizer_class([_group(param)], backend="torch", matmul_precision="tf32", **options)
    with pytest.raises(ValueError, match="matmul_precision"):
        optimizer_class([_group(param, matmul_precision="IEEE")], backend="torch", **options)
    optimizer = optimizer_class([_group(param), {"params": [torch.nn.Parameter(torch.randn(3))],
                                                 "matmul_precision": "ieee"}], backend="torch", **options)
    assert [g["matmul_precision"] for g in optimizer.param_groups] == ["tf32x3", "ieee"]
    assert [g["matmul_precision"] for g in optimizer.state_dict()["param_groups"]] == ["tf32x3", "ieee"]


def test_checkpoint_without_the_key_loads_with_default():
    param = torch.nn.Parameter(torch.randn(24, 40))
    optimizer = gk.GaLoreAdamW([_group(param)], backend="torch", matmul_precision="ieee")
    param.grad = torch.randn(24, 40)
    optimizer.step()
    saved = optimizer.state_dict()
    for group in saved["param_groups"]:
        del group["matmul_precision"]
    resumed = gk.GaLoreAdamW([_group(torch.nn.Parameter(param.detach().clone()))], backend="torch",
                             matmul_precision="ieee")
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["matmul_precision"] == "ieee"


RECORD = textwrap.dedent('''
    import json, warnings
    import torch
    from bench import sm90_compile as gate
    from galore_kernels import optim

    found = {}
    for dtype in ("fp32", "bf16"):
        for precision in ("tf32x3", "ieee"):
            for state in ("fp32", "8bit", "adafactor"):
                for side in ("left", "right", "full"):
                    with gate.record_launches() as launches, warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        launches.case = gate.Case(state, dtype, (64, 96), 8, side, precision)
                        gate._drive(launches.case, torch, optim)
                    found[f"{dtype} {precision} {state} {side}"] = [
                        launch.spec for launch in launches if launch.kernel == "_lowrank_matmul_kernel"]
    print(json.dumps(found))
''')


def test_precision_reaches_every_projection_launch(tmp_path):
    """Recorded (not run) launches of each optimizer's step: fp32 parameters multiply at the group's
    precision in every projection and back-projection; bf16 ones multiply in bf16 except where an
    operand is fp32 (``full``'s intermediate, Adafactor's update)."""
    script = tmp_path / "record.py"
    script.write_text(RECORD)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(REPO_ROOT))
    completed = subprocess.run([sys.executable, str(script)], cwd=REPO_ROOT, env=env, capture_output=True,
                               text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    found = json.loads(completed.stdout.strip().splitlines()[-1])
    for case, specs in found.items():
        dtype, precision, state, side = case.split()
        assert specs, case
        assert all(f"FP32_PRECISION={precision}" in spec for spec in specs), (case, specs)
        fp32_dots = [spec for spec in specs if "OPERAND_DTYPE=fp32" in spec]
        if dtype == "fp32":
            assert fp32_dots == specs, (case, specs)
        elif side != "full" and state != "adafactor":  # Adafactor back-projects its fp32 update
            assert not fp32_dots, (case, specs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="tf32x3 and IEEE differ only on a GPU")
@pytest.mark.parametrize("side, m, n", [("left", 1024, 4096), ("right", 4096, 1024)])
def test_fp32_projection_accuracy_against_fp64(side, m, n):
    """Norm-wise relative error of the kernels' fp32 projection R against the fp64 product of the same inputs."""
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(m, n, generator=gen).cuda()
    proj = torch.linalg.qr(torch.randn(m if side == "left" else n, 128, generator=gen, dtype=torch.float64))[0]
    proj_left, proj_right = (proj.float().cuda(), None) if side == "left" else (None, proj.t().float().cuda())
    exact = reference.project(grad.double(), *(None if p is None else p.double() for p in (proj_left, proj_right)))
    errors = {}
    for precision in ("tf32x3", "ieee"):
        low_rank = kernels.project(grad, proj_left, proj_right, matmul_precision=precision)
        errors[precision] = float(torch.linalg.vector_norm(low_rank.double() - exact) / torch.linalg.vector_norm(exact))
    assert errors["ieee"] <= 1e-6 and errors["tf32x3"] <= 1e-6, errors
