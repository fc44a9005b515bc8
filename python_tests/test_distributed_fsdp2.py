"""FSDP2 (``fully_shard``) with GaLore, non-layerwise: the sharded refresh and step against one process.

Two processes on 127.0.0.1 with gloo, on the CPU, one spawn for every case. In fp32 the
row counts are odd (21 rows on 2 ranks: 11 + 10), so shard offsets are exercised. The
8-bit moments are quantized in 256-value blocks within a shard, so the 8-bit model has
512 rows (256 per shard) for the blocks to be the single process's ones.
"""

import os
import traceback

import pytest
import torch
import torch.distributed as dist
from multiprocess_workers import leave_process_group_and_exit, spawn

import galore_kernels as gk
from galore_kernels import distributed as gk_distributed
from galore_kernels import quant
from galore_kernels.projector import compute_projectors

WORLD = 2
STEPS = 7  # update_proj_gap=3: refreshes at steps 0, 3 and 6
RANK = 3
HIDDENS = {"GaLoreAdamW": 21, "GaLoreAdamW8bit": 512}
CLIP = 0.05  # below the gradients' norm (about 0.1 to 0.3 here), so every step clips
RTOL = 1e-5  # fp32 parameters after 7 steps; the sums over shards differ from one process's by rounding
RESHARDED_8BIT_UPDATE_RTOL = 1e-2  # ‖Δp − Δp one process‖ / ‖Δp‖, measured 5.0e-3 (up.weight), 1.2e-4 (down.weight)
SVD_CASES = [  # (m, n, rank, oversample, warm start)
    (21, 12, 3, 2, None), (12, 21, 3, 2, None), (21, 12, 3, 32, None),
    (21, 12, 3, 2, "left"), (12, 21, 3, 2, "right"), (64, 48, 2, 2, None),
]


class TinyMLP(torch.nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.up = torch.nn.Linear(12, hidden, bias=False)   # hidden×12: proj_type="std" projects on the right
        self.down = torch.nn.Linear(hidden, 12, bias=False)  # 12×hidden: on the left
        self.norm = torch.nn.LayerNorm(12)

    def forward(self, x):
        return self.norm(self.down(torch.tanh(self.up(x))))


def _model(name):
    torch.manual_seed(0)
    return TinyMLP(HIDDENS[name])


def _batches():
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 12, generator=generator), torch.randn(8, 12, generator=generator)) for _ in range(STEPS)]


def _optimizer(name, model, layerwise=False, max_grad_norm=None):
    groups = [
        {"params": [model.up.weight, model.down.weight], "rank": RANK, "update_proj_gap": 3, "scale": 0.5, "proj_type": "std"},
        {"params": list(model.norm.parameters())},
    ]
    if name == "GaLoreAdamW":
        return gk.GaLoreAdamW(groups, lr=1e-2, backend="torch", layerwise=layerwise, max_grad_norm=max_grad_norm)
    # The low-rank moments (2×512 values) are 8-bit, the LayerNorm's (12) fp32, as bitsandbytes would.
    return gk.GaLoreAdamW8bit(groups, lr=1e-2, backend="torch", min_8bit_size=256, layerwise=layerwise,
                               max_grad_norm=max_grad_norm)


def _train(model, optimizer, rank=None, batches=None):
    for inputs, targets in _batches() if batches is None else batches:
        if rank is not None:
            part = inputs.shape[0] // dist.get_world_size()
            inputs, targets = inputs[rank * part:(rank + 1) * part], targets[rank * part:(rank + 1) * part]
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()


def _svd_cases(rank):
    """Each rank's rows of the sharded results against the single-process op on the full matrix."""
    results = []
    for m, n, r, oversample, warm in SVD_CASES:
        generator = torch.Generator().manual_seed(m * 100 + n)
        # Low rank plus noise, as gradients are.
        full = torch.randn(m, 4, generator=generator) @ torch.randn(4, n, generator=generator) + 0.1 * torch.randn(m, n, generator=generator)
        rows = -(-m // dist.get_world_size())  # torch.chunk's split, as FSDP2's Shard(0)
        offset = min(rank * rows, m)
        local_rows = min(rows, m - offset)
        comm = gk_distributed.RowShardComm(dist.group.WORLD, m, offset)
        init = None
        if warm == "left":
            init = torch.linalg.qr(torch.randn(m, r, generator=generator))[0]
        elif warm == "right":
            init = torch.linalg.qr(torch.randn(n, r, generator=generator))[0].t().contiguous()
        expected_u, expected_s, expected_vh = gk.randomized_svd(full, r, oversample=oversample, seed=7, init=init)
        u, s, vh = gk_distributed.sharded_randomized_svd(
            full[offset:offset + local_rows], r, comm, oversample=oversample, seed=7,
            init_left=init[offset:offset + local_rows] if warm == "left" else None,
            init_right=init if warm == "right" else None,
        )
        k = min(r + oversample, m, n)
        results.append(dict(
            case=(m, n, r, oversample, warm),
            u_err=(u - expected_u[offset:offset + local_rows]).abs().max().item(),
            s_err=((s - expected_s).abs().max() / expected_s[0]).item(),
            vh_err=(vh - expected_vh).abs().max().item(),
            largest_message=comm.largest_message, message_bound=4 * max(m, n) * k, dense_bytes=4 * m * n,
        ))
        # The projector rule on top (signs aligned, warm-started from the previous projector).
        for side in ("left", "right"):
            previous = compute_projectors(full, r, side, seed=3)
            expected = compute_projectors(full + 0.05, r, side, seed=5, previous=previous)
            sharded_previous = (previous[0][offset:offset + local_rows] if side == "left" else None, previous[1])
            got = gk_distributed.sharded_projectors(full[offset:offset + local_rows] + 0.05, r, side, comm, seed=5, previous=sharded_previous)
            cold = gk_distributed.sharded_projectors(full[offset:offset + local_rows], r, side, comm, seed=3, previous=(None, None))
            if side == "left":
                errors = [(got[0] - expected[0][offset:offset + local_rows]).abs().max().item(),
                          (cold[0] - previous[0][offset:offset + local_rows]).abs().max().item()]
            else:
                errors = [(got[1] - expected[1]).abs().max().item(), (cold[1] - previous[1]).abs().max().item()]
            results.append(dict(case=(m, n, r, side, "projectors"), projector_err=max(errors)))
    return results


def _train_accumulating(model, optimizer, rank=None, sharded=False):
    """Two micro-batches per step; on FSDP2 the first skips the reduce-scatter
    (``set_requires_gradient_sync(False)``, as its docs describe for accumulation)."""
    batches = _batches()
    for first, second in zip(batches[0::2], batches[1::2]):
        optimizer.zero_grad()
        for micro, (inputs, targets) in enumerate((first, second)):
            if rank is not None:
                part = inputs.shape[0] // dist.get_world_size()
                inputs, targets = inputs[rank * part:(rank + 1) * part], targets[rank * part:(rank + 1) * part]
            if sharded:
                model.set_requires_gradient_sync(micro == 1)
            torch.nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()


def _sharded_model(name, mesh):
    from torch.distributed.fsdp import fully_shard

    model = _model(name)
    fully_shard(model.up, mesh=mesh)
    fully_shard(model.down, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _resumed(name, mesh, rank, out_dir):
    """4 steps, a per-rank checkpoint (parameter shards and optimizer.state_dict()), a fresh
    model and optimizer loading it, the last 3 steps."""
    model = _sharded_model(name, mesh)
    optimizer = _optimizer(name, model)
    _train(model, optimizer, rank=rank, batches=_batches()[:4])
    path = os.path.join(out_dir, f"{name}-checkpoint-rank{rank}.pt")
    torch.save({"model": {n: p.to_local() for n, p in model.named_parameters()}, "optimizer": optimizer.state_dict()}, path)
    resumed_model = _sharded_model(name, mesh)
    checkpoint = torch.load(path, weights_only=True)
    with torch.no_grad():
        for n, p in resumed_model.named_parameters():
            p.to_local().copy_(checkpoint["model"][n])
    resumed = _optimizer(name, resumed_model)
    resumed.load_state_dict(checkpoint["optimizer"])
    _train(resumed_model, resumed, rank=rank, batches=_batches()[4:])
    return {n: p.full_tensor().detach().clone() for n, p in resumed_model.named_parameters()}


def _dcp_state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}


def _dcp_load(model, optimizer, checkpoint_dir) -> None:
    """torch.distributed.checkpoint's load, as its docs show: the fresh state dicts as targets, then set_*."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = _dcp_state(model, optimizer)
    dcp.load(state, checkpoint_id=checkpoint_dir)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def _local_state(model, optimizer) -> dict:
    names = {p: n for n, p in model.named_parameters()}
    return {names[p]: {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()} for p, state in optimizer.state.items()}


def _full_state(model, optimizer) -> dict:
    """The state as one process holds it (DTensors of state_dict() gathered, copied), by parameter name."""
    names = [n for n, _ in model.named_parameters()]
    return {names[i]: {k: v.full_tensor().clone() if torch.is_tensor(v) else v for k, v in state.items()}
            for i, state in optimizer.state_dict()["state"].items()}


def _dcp_resumed(name, mesh, rank, checkpoint_dir, layerwise):
    """4 steps (refreshes at steps 0 and 3), torch.distributed.checkpoint's save of the model and the
    optimizer, a fresh model and optimizer loading it (dcp.load, set_*_state_dict), the last 3 steps."""
    import torch.distributed.checkpoint as dcp

    model = _sharded_model(name, mesh)
    optimizer = _optimizer(name, model, layerwise=layerwise)
    _train(model, optimizer, rank=rank, batches=_batches()[:4])
    saved = _local_state(model, optimizer)
    full = _full_state(model, optimizer)
    dcp.save(_dcp_state(model, optimizer), checkpoint_id=checkpoint_dir)
    resumed_model = _sharded_model(name, mesh)
    resumed = _optimizer(name, resumed_model, layerwise=layerwise)
    _dcp_load(resumed_model, resumed, checkpoint_dir)
    loaded = _local_state(resumed_model, resumed)
    _train(resumed_model, resumed, rank=rank, batches=_batches()[4:])
    if layerwise:
        optimizer.remove_hooks()
        resumed.remove_hooks()
    return dict(params={n: p.full_tensor().detach().clone() for n, p in resumed_model.named_parameters()},
                saved_state=saved, loaded_state=loaded, full_state=full)


def _worker(rank, port, out_dir, dcp_dir):
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=WORLD)
        torch.set_num_threads(1)
        mesh = init_device_mesh("cpu", (WORLD,))
        results = {"svd": _svd_cases(rank)}
        for name in ("GaLoreAdamW", "GaLoreAdamW8bit"):
            model = _model(name)
            fully_shard(model.up, mesh=mesh)
            fully_shard(model.down, mesh=mesh)
            fully_shard(model, mesh=mesh)
            optimizer = _optimizer(name, model)
            _train(model, optimizer, rank=rank)
            results[name] = dict(
                params={n: p.full_tensor().detach().clone() for n, p in model.named_parameters()},
                moment_shapes={n: tuple(optimizer.state[p]["exp_avg_codes" if "exp_avg_codes" in optimizer.state[p] else "exp_avg"].shape)
                               for n, p in model.named_parameters()},
                local_rows={n: p.to_local().shape[0] for n, p in model.named_parameters()},
                sharded_bytes_sent=optimizer.sharded_bytes_sent,
            )
            # A NaN in rank 0's shard alone: every rank skips the parameter, as one process would.
            before = {n: p.to_local().clone() for n, p in model.named_parameters()}
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(torch.randn(4, 12)), torch.randn(4, 12)).backward()
            for p in (model.up.weight, model.down.weight, model.norm.weight):
                if rank == 0:
                    p.grad.to_local()[0, ...] = float("nan")
            optimizer.step()
            results[name]["nan_step"] = dict(
                unchanged={n: torch.equal(before[n], p.to_local()) for n, p in model.named_parameters()},
                skips={n: int(optimizer.state[p]["nonfinite_skips"]) for n, p in model.named_parameters()},
            )
        for name in ("GaLoreAdamW", "GaLoreAdamW8bit"):
            model = _model(name)
            fully_shard(model.up, mesh=mesh)
            fully_shard(model.down, mesh=mesh)
            fully_shard(model, mesh=mesh)
            optimizer = _optimizer(name, model, layerwise=True)
            _train(model, optimizer, rank=rank)
            results[f"{name}-layerwise"] = dict(params={n: p.full_tensor().detach().clone() for n, p in model.named_parameters()})
            optimizer.remove_hooks()
        for name in ("GaLoreAdamW", "GaLoreAdamW8bit"):
            model = _sharded_model(name, mesh)
            optimizer = _optimizer(name, model, layerwise=True)
            _train_accumulating(model, optimizer, rank=rank, sharded=True)
            results[f"{name}-layerwise-accumulated"] = dict(
                params={n: p.full_tensor().detach().clone() for n, p in model.named_parameters()})
            optimizer.remove_hooks()
        for name in ("GaLoreAdamW", "GaLoreAdamW8bit"):
            for layerwise in (False, True):
                model = _sharded_model(name, mesh)
                optimizer = _optimizer(name, model, layerwise=layerwise, max_grad_norm=CLIP)
                _train(model, optimizer, rank=rank)
                results[f"{name}-clipped{'-layerwise' if layerwise else ''}"] = dict(
                    params={n: p.full_tensor().detach().clone() for n, p in model.named_parameters()},
                    last_grad_norm=optimizer.last_grad_norm.item())
                if layerwise:
                    optimizer.remove_hooks()
        for name in ("GaLoreAdamW", "GaLoreAdamW8bit"):
            results[f"{name}-resumed"] = dict(params=_resumed(name, mesh, rank, out_dir))
            for layerwise in (False, True):
                suffix = "-layerwise" if layerwise else ""
                results[f"{name}{suffix}-dcp"] = _dcp_resumed(name, mesh, rank, os.path.join(dcp_dir, name + suffix), layerwise)
        refused = {}
        for option, kwargs in (
            ("clip_strategy", dict(layerwise=True, clip_strategy="two_pass")), ("svd='exact'", dict(svd="exact")),
            ("accumulation_steps=1", dict(layerwise=True, accumulation_steps=2)),
        ):
            model = _model("GaLoreAdamW")
            fully_shard(model, mesh=mesh)
            optimizer = gk.GaLoreAdamW([{"params": [model.up.weight], "rank": RANK, "update_proj_gap": 3,
                                         "scale": 0.5, "proj_type": "std"}], backend="torch", **kwargs)
            try:  # layerwise refuses in backward, step() otherwise
                model(torch.randn(4, 12)).sum().backward()
                optimizer.step()
                refused[option] = None
            except ValueError as error:
                refused[option] = str(error)
            if optimizer.layerwise:
                optimizer.remove_hooks()
        model = _model("GaLoreAdamW")
        fully_shard(model, mesh=mesh)
        adafactor = gk.GaLoreAdafactor([{"params": [model.up.weight], "rank": RANK, "update_proj_gap": 3,
                                         "scale": 0.5, "proj_type": "std"}], backend="torch")
        model(torch.randn(4, 12)).sum().backward()
        try:
            adafactor.step()
            refused["GaLoreAdafactor"] = None
        except TypeError as error:
            refused["GaLoreAdafactor"] = str(error)
        results["refused"] = refused
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        leave_process_group_and_exit()
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def _worker_four_ranks(rank, port, out_dir, dcp_dir):
    """4 ranks (21 rows: 6 + 6 + 6 + 3): the refresh and fp32 training, step() and layerwise;
    resuming the 2-rank DCP checkpoints."""
    try:
        from torch.distributed.device_mesh import init_device_mesh

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=4)
        torch.set_num_threads(1)
        mesh = init_device_mesh("cpu", (4,))
        results = {"svd": _svd_cases(rank)}
        for layerwise in (False, True):
            model = _sharded_model("GaLoreAdamW", mesh)
            optimizer = _optimizer("GaLoreAdamW", model, layerwise=layerwise)
            _train(model, optimizer, rank=rank)
            key = "GaLoreAdamW-layerwise" if layerwise else "GaLoreAdamW"
            results[key] = dict(params={n: p.full_tensor().detach().clone() for n, p in model.named_parameters()})
        # The 2-rank checkpoints after 4 steps, resharded: GaLoreAdamW's state as it is, the 8-bit
        # blocks requantized where 4 shards move their boundaries.
        for name in ("GaLoreAdamW", "GaLoreAdamW8bit"):
            model = _sharded_model(name, mesh)
            optimizer = _optimizer(name, model)
            _dcp_load(model, optimizer, os.path.join(dcp_dir, name))
            loaded = _full_state(model, optimizer)
            _train(model, optimizer, rank=rank, batches=_batches()[4:])
            results[f"{name}-dcp-from-2-ranks"] = dict(
                params={n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}, full_state=loaded)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        leave_process_group_and_exit()
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


@pytest.fixture(scope="module")
def dcp_dir(tmp_path_factory):
    """The 2-rank run's torch.distributed.checkpoint directories, which the 4-rank run loads."""
    return str(tmp_path_factory.mktemp("fsdp2-dcp"))


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory, dcp_dir):
    return spawn(_worker, WORLD, str(tmp_path_factory.mktemp("fsdp2")), dcp_dir)


@pytest.fixture(scope="module")
def fsdp_results_four_ranks(tmp_path_factory, dcp_dir, fsdp_results):
    return spawn(_worker_four_ranks, 4, str(tmp_path_factory.mktemp("fsdp2-4")), dcp_dir)


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_randomized_svd_equals_the_single_process_op(fsdp_results, fsdp_results_four_ranks, world):
    for rank_results in fsdp_results if world == 2 else fsdp_results_four_ranks:
        for result in rank_results["svd"]:
            if "projector_err" in result:
                assert result["projector_err"] < 1e-4, result
                continue
            # Orthonormal factors of O(1) entries: 1e-4 absolute is rounding (CholeskyQR squares the condition).
            assert result["u_err"] < 1e-4 and result["vh_err"] < 1e-4 and result["s_err"] < 1e-5, result


def test_sharded_refresh_traffic_is_linear_in_m_plus_n(fsdp_results):
    for result in fsdp_results[0]["svd"]:
        if "largest_message" in result:
            assert 0 < result["largest_message"] <= result["message_bound"], result
    largest = [r for r in fsdp_results[0]["svd"] if r.get("case", ())[:2] == (64, 48) and "largest_message" in r][0]
    assert largest["largest_message"] * 10 < largest["dense_bytes"]


@pytest.mark.parametrize("layerwise", [False, True], ids=["step", "layerwise"])
@pytest.mark.parametrize("name, world", [("GaLoreAdamW", 2), ("GaLoreAdamW8bit", 2), ("GaLoreAdamW", 4)])
def test_fsdp2_matches_single_process_on_the_concatenated_batch(fsdp_results, fsdp_results_four_ranks, name, world, layerwise):
    """Layerwise on 2 ranks against the single process's step(): the same updates, made in backward."""
    model = _model(name)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, _optimizer(name, model))
    for rank_results in fsdp_results if world == 2 else fsdp_results_four_ranks:
        got = rank_results[f"{name}-layerwise" if layerwise else name]["params"]
        for n, expected in model.named_parameters():
            assert (expected - initial[n]).abs().max() > 1e-3, f"{n} barely trained"
            torch.testing.assert_close(got[n], expected.detach(), rtol=RTOL, atol=RTOL * expected.abs().max().item(),
                                       msg=lambda m: f"{name}: {n}: {m}")


@pytest.mark.parametrize("name", ["GaLoreAdamW", "GaLoreAdamW8bit"])
def test_fsdp2_state_is_sharded_like_the_parameter(fsdp_results, name):
    for rank_results in fsdp_results:
        result, hidden = rank_results[name], HIDDENS[name]
        rows, shapes = result["local_rows"], result["moment_shapes"]
        assert rows["up.weight"] in (hidden // WORLD, -(-hidden // WORLD))
        # Right-projected (hidden×12: R is rows×r, 8-bit codes Rᵀ) and elementwise (LayerNorm)
        # moments have the shard's rows; the left-projected 12×hidden's are r×n, replicated.
        assert shapes["up.weight"] == ((RANK, rows["up.weight"]) if name == "GaLoreAdamW8bit" else (rows["up.weight"], RANK))
        assert shapes["norm.weight"] == (rows["norm.weight"],)
        assert shapes["down.weight"] == (RANK, hidden)
        assert result["sharded_bytes_sent"] > 0


@pytest.mark.parametrize("name", ["GaLoreAdamW", "GaLoreAdamW8bit"])
def test_fsdp2_nonfinite_shard_skips_on_every_rank(fsdp_results, name):
    for rank_results in fsdp_results:
        nan_step = rank_results[name]["nan_step"]
        for n in ("up.weight", "down.weight", "norm.weight"):
            assert nan_step["unchanged"][n] and nan_step["skips"][n] == 1, (n, nan_step)
        assert not nan_step["unchanged"]["norm.bias"] and nan_step["skips"]["norm.bias"] == 0


def test_fsdp2_refuses_what_it_does_not_support(fsdp_results):
    for option, message in fsdp_results[0]["refused"].items():
        assert message is not None and option in message and "FSDP2" in message, (option, message)


@pytest.mark.parametrize("name", ["GaLoreAdamW", "GaLoreAdamW8bit"])
def test_fsdp2_checkpoint_resume_on_the_same_world_size_is_bit_exact(fsdp_results, name):
    for rank_results in fsdp_results:
        uninterrupted, resumed = rank_results[name]["params"], rank_results[f"{name}-resumed"]["params"]
        for n in uninterrupted:
            assert torch.equal(uninterrupted[n], resumed[n]), n


@pytest.mark.parametrize("layerwise", [False, True], ids=["step", "layerwise"])
@pytest.mark.parametrize("name", ["GaLoreAdamW", "GaLoreAdamW8bit"])
def test_fsdp2_clipping_matches_single_process(fsdp_results, name, layerwise):
    """max_grad_norm: one global norm across the shards, as one process's step() computes it;
    in layerwise mode the low-rank gradients are held until backward ends (clip_strategy="hold")."""
    model = _model(name)
    optimizer = _optimizer(name, model, max_grad_norm=CLIP)
    _train(model, optimizer)
    assert optimizer.last_grad_norm.item() > 1.5 * CLIP, "the last step did not clip; the test would test nothing"
    for rank_results in fsdp_results:
        result = rank_results[f"{name}-clipped{'-layerwise' if layerwise else ''}"]
        assert result["last_grad_norm"] == pytest.approx(optimizer.last_grad_norm.item(), rel=1e-5)
        for n, expected in model.named_parameters():
            torch.testing.assert_close(result["params"][n], expected.detach(), rtol=RTOL,
                                       atol=RTOL * expected.abs().max().item(), msg=lambda m: f"{name}: {n}: {m}")


@pytest.mark.parametrize("name", ["GaLoreAdamW", "GaLoreAdamW8bit"])
def test_fsdp2_layerwise_accumulates_with_set_requires_gradient_sync(fsdp_results, name):
    """Layerwise on FSDP2, 2 micro-batches a step, the first without gradient sync: FSDP2
    reduce-scatters the accumulated gradient once and the hooks fire then. Equal to one
    process accumulating in .grad and calling step()."""
    model = _model(name)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train_accumulating(model, _optimizer(name, model))
    for rank_results in fsdp_results:
        got = rank_results[f"{name}-layerwise-accumulated"]["params"]
        for n, expected in model.named_parameters():
            assert (expected - initial[n]).abs().max() > 1e-3, f"{n} barely trained"
            torch.testing.assert_close(got[n], expected.detach(), rtol=RTOL, atol=RTOL * expected.abs().max().item(),
                                       msg=lambda m: f"{name}: {n}: {m}")


def _assert_states_equal(expected: dict, got: dict, where: str) -> None:
    assert expected.keys() == got.keys(), where
    for n in expected:
        assert expected[n].keys() == got[n].keys(), (where, n)
        for key, value in expected[n].items():
            same = torch.equal(value, got[n][key]) if torch.is_tensor(value) else value == got[n][key]
            assert same, f"{where}: {n}: state {key!r} differs"


@pytest.mark.parametrize("layerwise", [False, True], ids=["step", "layerwise"])
@pytest.mark.parametrize("name", ["GaLoreAdamW", "GaLoreAdamW8bit"])
def test_fsdp2_dcp_resume_is_bit_exact(fsdp_results, name, layerwise):
    """torch.distributed.checkpoint (dcp.save/dcp.load with get/set_optimizer_state_dict) after a refresh:
    the loaded state equals the saved one, and training goes on exactly as without the interruption."""
    suffix = "-layerwise" if layerwise else ""
    for rank_results in fsdp_results:
        result = rank_results[f"{name}{suffix}-dcp"]
        _assert_states_equal(result["saved_state"], result["loaded_state"], f"{name}{suffix}")
        assert any("proj_left" in s for s in result["saved_state"].values()), "no projector in the saved state"
        uninterrupted = rank_results[f"{name}{suffix}"]["params"]
        for n in uninterrupted:
            assert torch.equal(uninterrupted[n], result["params"][n]), n


def test_fsdp2_dcp_state_is_the_single_process_layout(fsdp_results):
    """The state DCP sees is one process's: gathered, every rank's DTensors give the same tensors, with
    the full shapes (so DCP can reshard them); the 8-bit absmax is saved per code, constant over each
    shard's 256-code blocks."""
    for name in ("GaLoreAdamW", "GaLoreAdamW8bit"):
        first, second = (rank_results[f"{name}-dcp"]["full_state"] for rank_results in fsdp_results)
        _assert_states_equal(first, second, name)
    fp32 = fsdp_results[0]["GaLoreAdamW-dcp"]["full_state"]
    hidden = HIDDENS["GaLoreAdamW"]
    assert fp32["up.weight"]["exp_avg"].shape == (hidden, RANK) and fp32["up.weight"]["proj_right"].shape == (RANK, 12)
    assert fp32["down.weight"]["exp_avg"].shape == (RANK, hidden) and fp32["down.weight"]["proj_left"].shape == (12, RANK)
    assert fp32["norm.weight"]["exp_avg"].shape == (12,)
    eight_bit = fsdp_results[0]["GaLoreAdamW8bit-dcp"]["full_state"]
    hidden = HIDDENS["GaLoreAdamW8bit"]
    for key in ("exp_avg", "exp_avg_sq"):
        assert eight_bit["up.weight"][f"{key}_codes"].shape == (RANK, hidden)
        absmax = eight_bit["up.weight"][f"{key}_absmax"]
        assert absmax.shape == (RANK, hidden)  # the codes' Rᵀ, row-sharded along its columns
        # Each rank's 256 columns of a direction are one block of its shard: one absmax each.
        blocks = absmax.view(RANK, WORLD, hidden // WORLD)
        assert torch.equal(blocks, blocks[:, :, :1].expand_as(blocks)) and (blocks > 0).all()


def _dequantized(state: dict, key: str) -> torch.Tensor:
    """An 8-bit moment of a gathered DCP state as fp32 values: an absmax per code (row-sharded moments)
    or per block (replicated ones)."""
    codes, absmax = state[f"{key}_codes"], state[f"{key}_absmax"]
    if absmax.shape != codes.shape:
        return quant.dequantize_blockwise(codes, absmax, signed=key == "exp_avg")
    return quant.dynamic_map(key == "exp_avg", "cpu")[codes.long()] * absmax


def test_fsdp2_dcp_resume_on_four_ranks(fsdp_results, fsdp_results_four_ranks):
    """The 2-rank checkpoints loaded by 4 ranks: GaLoreAdamW's state is resharded bit for bit and training
    continues as one process's; GaLoreAdamW8bit's blocks are requantized where the 4 shards move their
    boundaries, within half a code step, and training continues close to one process's."""
    saved = fsdp_results[0]["GaLoreAdamW-dcp"]["full_state"]
    model = _model("GaLoreAdamW")
    _train(model, _optimizer("GaLoreAdamW", model))
    for rank_results in fsdp_results_four_ranks:
        result = rank_results["GaLoreAdamW-dcp-from-2-ranks"]
        _assert_states_equal(saved, result["full_state"], "GaLoreAdamW on 4 ranks")
        for n, expected in model.named_parameters():
            torch.testing.assert_close(result["params"][n], expected.detach(), rtol=RTOL,
                                       atol=RTOL * expected.abs().max().item(), msg=lambda m: f"{n}: {m}")
    saved = fsdp_results[0]["GaLoreAdamW8bit-dcp"]["full_state"]
    model = _model("GaLoreAdamW8bit")
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, _optimizer("GaLoreAdamW8bit", model))
    for rank_results in fsdp_results_four_ranks:
        result = rank_results["GaLoreAdamW8bit-dcp-from-2-ranks"]
        loaded = result["full_state"]
        # up.weight's Rᵀ is 3×128 per rank: its 256-code blocks now join two directions, so requantized.
        assert not torch.equal(loaded["up.weight"]["exp_avg_absmax"], saved["up.weight"]["exp_avg_absmax"])
        for key, max_gap in (("exp_avg", 0.0141), ("exp_avg_sq", 0.0071)):  # the dynamic maps' largest code gap
            error = (_dequantized(loaded["up.weight"], key) - _dequantized(saved["up.weight"], key)).abs()
            assert (error <= max_gap / 2 * loaded["up.weight"][f"{key}_absmax"] * (1 + 1e-6)).all(), key
            # down.weight's moments are replicated (r×n, left): the same blocks, bit for bit.
            for part in ("codes", "absmax"):
                assert torch.equal(loaded["down.weight"][f"{key}_{part}"], saved["down.weight"][f"{key}_{part}"])
        for n, expected in model.named_parameters():
            change, got = expected.detach() - initial[n], result["params"][n] - initial[n]
            assert (got - change).norm() <= RESHARDED_8BIT_UPDATE_RTOL * change.norm(), n


@pytest.mark.parametrize("signed", [True, False])
def test_absmax_per_code_round_trip(signed):
    """The per-code absmax DCP saves gives back a shard's blocks bit for bit when the boundaries are the
    same (a partial last block included), and requantizes within half a code step where they move."""
    generator = torch.Generator().manual_seed(3)
    shards = []
    for numel in (700, 300):  # two ranks' moments: 2 blocks and a partial one, then 1 and a partial one
        values = torch.randn(numel, generator=generator) * torch.logspace(-3, 0, numel)
        values = values if signed else values.square()
        codes, absmax = quant.quantize_blockwise(values, signed=signed)
        per_code = gk_distributed._absmax_per_code(absmax, codes)
        assert per_code.shape == codes.shape
        assert [torch.equal(a, b) for a, b in zip(gk_distributed._blocks_from_absmax_per_code(codes, per_code, signed),
                                                   (codes, absmax))] == [True, True]
        shards.append((codes, per_code))
    # One rank now holds both: its blocks straddle the first shard's end.
    codes = torch.cat([c for c, _ in shards])
    per_code = torch.cat([a for _, a in shards])
    new_codes, new_absmax = gk_distributed._blocks_from_absmax_per_code(codes, per_code, signed)
    before = quant.dynamic_map(signed, "cpu")[codes.long()] * per_code
    after = quant.dequantize_blockwise(new_codes, new_absmax, signed=signed)
    max_gap = 0.0141 if signed else 0.0071
    block_absmax = new_absmax.repeat_interleave(quant.BLOCK_SIZE)[:codes.numel()]
    assert ((after - before).abs() <= max_gap / 2 * block_absmax * (1 + 1e-6)).all()
    assert torch.equal(new_codes[:512], codes[:512])  # the first two blocks did not move
