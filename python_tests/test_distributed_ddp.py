"""DDP with GaLore: plain DDP and ``distributed.low_rank_allreduce_hook`` against single-process training.

Two processes on 127.0.0.1 with gloo, on the CPU. One spawn runs every case (starting
processes costs more than the cases); each test reads its case's results. The
reference is one process training on the concatenated batch: with equal halves, the
mean of the two ranks' mean-loss gradients is the full batch's mean-loss gradient.
"""

import atexit
import os
import traceback

import pytest
import torch
import torch.distributed as dist
from multiprocess_workers import leave_process_group_and_exit, spawn
from torch.nn.parallel import DistributedDataParallel

import galore_kernels as gk
from galore_kernels import distributed as gk_distributed

WORLD = 2
STEPS = 7  # update_proj_gap=3: refreshes at steps 0, 3 and 6, so two after the first
RANK = 3
# fp32: the ranks' averaged gradient differs from the full batch's by rounding, which the
# randomized SVD and Adam's normalization carry along; 1e-5 relative on the parameters.
RTOL = 1e-5

FOUR_RANK_CASES = ("adamw", "adamw_hook")
CASES = {
    "adamw": dict(optimizer="GaLoreAdamW", hook=False),
    "adamw8bit": dict(optimizer="GaLoreAdamW8bit", hook=False),
    "adamw_hook": dict(optimizer="GaLoreAdamW", hook=True),
    "adamw8bit_hook": dict(optimizer="GaLoreAdamW8bit", hook=True),
}


class TinyMLP(torch.nn.Module):
    """A 20×12 and a 12×20 matrix, so that proj_type="std" projects on the right for one and the left for the other."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(12, 20, bias=False)
        self.down = torch.nn.Linear(20, 12, bias=False)
        self.norm = torch.nn.LayerNorm(12)

    def forward(self, x):
        return self.norm(self.down(torch.tanh(self.up(x))))


def _model():
    torch.manual_seed(0)
    return TinyMLP()


def _batches():
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 12, generator=generator), torch.randn(8, 12, generator=generator)) for _ in range(STEPS)]


def _optimizer(name, model):
    galore = [model.up.weight, model.down.weight]
    groups = [
        {"params": galore, "rank": RANK, "update_proj_gap": 3, "scale": 0.5, "proj_type": "std"},
        {"params": list(model.norm.parameters())},
    ]
    if name == "GaLoreAdamW":
        return gk.GaLoreAdamW(groups, lr=1e-2, backend="torch")
    # min_8bit_size=0: the tiny moments take the 8-bit path.
    return gk.GaLoreAdamW8bit(groups, lr=1e-2, backend="torch", min_8bit_size=0)


def _train(case, model, optimizer, batches, rank=None, hook_state=None):
    per_step_bytes = []
    for inputs, targets in batches:
        if rank is not None:
            part = inputs.shape[0] // dist.get_world_size()
            inputs, targets = inputs[rank * part:(rank + 1) * part], targets[rank * part:(rank + 1) * part]
        optimizer.zero_grad()
        if hook_state is not None:
            hook_state.reset_counters()
        torch.nn.functional.mse_loss(model(inputs), targets).backward()
        if hook_state is not None:
            per_step_bytes.append(
                (hook_state.galore_bytes_sent, hook_state.galore_dense_bytes, hook_state.bytes_sent, hook_state.dense_bytes)
            )
        optimizer.step()
    return per_step_bytes


def _single_process(case):
    model = _model()
    _train(case, model, _optimizer(CASES[case]["optimizer"], model), _batches())
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _worker(rank, port, out_dir, world):
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        torch.set_num_threads(1)
        results = {}
        # 4 ranks: the fp32 cases only (the 8-bit ones differ from them only in the state).
        for case, spec in CASES.items() if world == WORLD else [(c, CASES[c]) for c in FOUR_RANK_CASES]:
            model = _model()
            ddp = DistributedDataParallel(model)
            optimizer = _optimizer(spec["optimizer"], model)
            hook_state = None
            if spec["hook"]:
                hook_state, hook = gk_distributed.low_rank_allreduce_hook(optimizer)
                ddp.register_comm_hook(hook_state, hook)
            per_step_bytes = _train(case, ddp, optimizer, _batches(), rank=rank, hook_state=hook_state)
            low_rank_shapes = {
                name: tuple(optimizer._low_rank_grad(p, optimizer.state[p], p.detach()).shape)
                for name, p in model.named_parameters() if p in optimizer._galore_position
            }
            results[case] = dict(
                params={name: p.detach().clone() for name, p in model.named_parameters()},
                bytes=per_step_bytes, low_rank_shapes=low_rank_shapes,
            )
        if world != WORLD:
            torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
            leave_process_group_and_exit()
        layerwise_model = _model()
        layerwise_ddp = DistributedDataParallel(layerwise_model)
        layerwise = gk.GaLoreAdamW(layerwise_model.parameters(), lr=1e-2, layerwise=True, backend="torch")
        try:
            layerwise_ddp(torch.randn(4, 12)).sum().backward()
            results["layerwise_error"] = None
        except RuntimeError as error:
            results["layerwise_error"] = str(error)
        layerwise.remove_hooks()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        leave_process_group_and_exit()
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    return spawn(_worker, WORLD, str(tmp_path_factory.mktemp("ddp")), WORLD)


@pytest.fixture(scope="module")
def ddp_results_four_ranks(tmp_path_factory):
    return spawn(_worker, 4, str(tmp_path_factory.mktemp("ddp-4")), 4)


WORLD_CASES = [(WORLD, case) for case in CASES] + [(4, case) for case in FOUR_RANK_CASES]


@pytest.mark.parametrize("world, case", WORLD_CASES)
def test_ranks_bit_identical(ddp_results, ddp_results_four_ranks, world, case):
    first, *others = (r[case]["params"] for r in (ddp_results if world == WORLD else ddp_results_four_ranks))
    for other in others:
        for name in first:
            assert torch.equal(first[name], other[name]), f"{case}: {name} differs across ranks"


@pytest.mark.parametrize("world, case", WORLD_CASES)
def test_matches_single_process_on_the_concatenated_batch(ddp_results, ddp_results_four_ranks, world, case):
    distributed = (ddp_results if world == WORLD else ddp_results_four_ranks)[0][case]["params"]
    single = _single_process(case)
    initial = dict(_model().named_parameters())
    for name, expected in single.items():
        moved = (expected - initial[name]).abs().max()
        assert moved > 1e-3, f"{case}: {name} barely trained; the comparison would test nothing"
        torch.testing.assert_close(distributed[name], expected, rtol=RTOL, atol=RTOL * expected.abs().max().item(),
                                   msg=lambda m: f"{case}: {name}: {m}")


@pytest.mark.parametrize("case", ["adamw_hook", "adamw8bit_hook"])
def test_hook_traffic(ddp_results, case):
    """Steady steps send r/min(m, n) of plain DDP's GaLore bytes; refresh steps and step 0 send all of them."""
    result = ddp_results[0][case]
    bytes_per_step = result["bytes"]
    dense_galore = 4 * (12 * 20 + 20 * 12)
    low_rank = 4 * sum(torch.Size(shape).numel() for shape in result["low_rank_shapes"].values())
    assert low_rank * min(12, 20) == dense_galore * RANK  # each low-rank gradient is r×max(m, n)
    for step, (galore_sent, galore_dense, sent, dense) in enumerate(bytes_per_step):
        assert galore_dense == dense_galore
        refresh = step % 3 == 0
        assert galore_sent == (dense_galore if refresh else low_rank), f"step {step}"
        # The LayerNorm's weight and bias always go in full.
        assert sent - galore_sent == dense - galore_dense == 4 * 2 * 12


def test_layerwise_under_ddp_is_refused(ddp_results):
    message = ddp_results[0]["layerwise_error"]
    assert message is not None and "FSDP2" in message and "layerwise=True" in message


def test_hook_refuses_layerwise_and_foreign_optimizers():
    model = _model()
    with pytest.raises(TypeError, match="GaLore optimizer"):
        gk_distributed.low_rank_allreduce_hook(torch.optim.AdamW(model.parameters()))
    layerwise = gk.GaLoreAdamW(model.parameters(), layerwise=True)
    with pytest.raises(ValueError, match="layerwise=False"):
        gk_distributed.low_rank_allreduce_hook(layerwise)
    layerwise.remove_hooks()


def _worker_crashing_once_after_its_results(rank, port, out_dir, marker):
    torch.save({"rank": rank}, os.path.join(out_dir, f"rank{rank}.pt"))
    if rank == 0 and not os.path.exists(marker):
        open(marker, "w").close()
        os.abort()  # as gloo's teardown at finalization once did: exit -6, nothing in rank0.err


def test_harness_fails_a_rank_that_died_after_its_results(tmp_path):
    """Neither ignored nor hidden by a rerun: the crash happens once, and a rerun would pass."""
    crashed = tmp_path.parent / f"{tmp_path.name}-crashed"  # outside out_dir, which each run empties
    with pytest.raises(AssertionError, match=r"worker exit codes \[-6, 0\]"):
        spawn(_worker_crashing_once_after_its_results, 2, str(tmp_path), str(crashed))


def _worker_leaving_with_an_atexit_handler(rank, port, out_dir, marker):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    atexit.register(lambda: open(f"{marker}{rank}", "w").close())
    torch.save({"rank": rank}, os.path.join(out_dir, f"rank{rank}.pt"))
    leave_process_group_and_exit()


def test_workers_leave_without_interpreter_finalization(tmp_path):
    """Where gloo's process group, kept alive by DDP or FSDP2, could abort the process."""
    marker = str(tmp_path.parent / f"{tmp_path.name}-finalized")
    assert [r["rank"] for r in spawn(_worker_leaving_with_an_atexit_handler, 2, str(tmp_path), marker)] == [0, 1]
    assert not any(os.path.exists(f"{marker}{rank}") for rank in range(2))
