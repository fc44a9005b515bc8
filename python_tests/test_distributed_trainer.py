"""GaLoreTrainer in a 2-process run under torchrun (gloo, CPU), on a tiny LLaMA sharded with FSDP2.

accelerate enables its FSDP plugin (``fsdp_version: 2``) only on accelerators: in a CPU run it
is ignored and the Trainer wraps the model in DDP. The FSDP2 route tested here is transformers'
own: ``from_pretrained(..., distributed_config=DistributedConfig(fsdp_size=N))``
(``trainer_fsdp2_worker.py``). The same run under DDP (the unsharded model) is the reference.
"""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from multiprocess_workers import free_port  # noqa: E402

WORLD = 2
TIMEOUT_S = 180


@pytest.fixture(scope="module")
def trainer_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("trainer-fsdp2")
    worker = os.path.join(os.path.dirname(__file__), "trainer_fsdp2_worker.py")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", worker, str(out_dir)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-8000:]
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]


@pytest.mark.parametrize("mode", ["step", "layerwise", "ddp"])
def test_trainer_trains_in_two_processes(trainer_results, mode):
    first = trainer_results[0][mode]
    assert first["world_size"] == WORLD
    assert len(first["losses"]) == 4 and all(torch.isfinite(torch.tensor(first["losses"])))
    for name, initial in first["initial"].items():
        assert (first["final"][name] - initial).abs().max() > 1e-4, f"{name} did not train"
    # Every rank holds the same replicated state (left-projected moments, right projectors) and,
    # gathered, the same parameters.
    assert first["replicated"], "no replicated GaLore state recorded"
    for other in trainer_results[1:]:
        for key, value in first["replicated"].items():
            assert torch.equal(value, other[mode]["replicated"][key]), key
        for name, value in first["final"].items():
            assert torch.equal(value, other[mode]["final"][name]), name


def test_trainer_layerwise_equals_step_on_fsdp2(trainer_results):
    """Layerwise (updates in FSDP2's hooks, once per accumulation window: the Trainer defers the
    reduce-scatter) against step(): the same updates up to rounding."""
    step, layerwise = trainer_results[0]["step"], trainer_results[0]["layerwise"]
    for name, expected in step["final"].items():
        torch.testing.assert_close(layerwise["final"][name], expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")


def test_trainer_on_fsdp2_equals_trainer_on_ddp(trainer_results):
    """The FSDP2 model (sharded refresh and step) against the unsharded one under DDP: same data, same updates."""
    fsdp2, ddp = trainer_results[0]["step"], trainer_results[0]["ddp"]
    for name, expected in ddp["final"].items():
        torch.testing.assert_close(fsdp2["final"][name], expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")
