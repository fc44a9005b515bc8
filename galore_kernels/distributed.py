"""GaLore across processes: DDP (and a low-rank communication hook) and FSDP2's sharded parameters.

What runs where (see the README's "Multi-GPU" section):

* DDP, ``layerwise=False``: works unchanged. Every rank sees the same averaged
  gradient, draws the same sketch (the seed derives from the optimizer seed, the
  parameter index and the step) and so computes the same projector and update.
* ``low_rank_allreduce_hook(optimizer)``: a DDP communication hook (the precedent
  is torch's PowerSGD hook) that, for a GaLore parameter whose projector is not
  refreshed at this step, all-reduces the projected gradient PᵀG (r×n) or GQᵀ
  (m×r) instead of G (m×n). Projection is linear, so the mean of the projections
  is the projection of the mean: the trajectory is plain DDP's up to rounding,
  for r/min(m, n) of the bytes when ``proj_type`` projects the smaller side away
  ("std"). Refresh steps, non-GaLore parameters and the first step all-reduce the
  full gradient.
* ``layerwise=True`` on non-sharded parameters of a multi-process run (DDP) is refused
  (``check_layerwise_world``): the hooks would update each rank from its own, not yet
  averaged, gradient.
* FSDP2 (``fully_shard``; DTensor parameters with ``Shard(0)`` on a 1-D mesh): ``step()``
  and layerwise mode update each parameter from its averaged row shard without gathering
  it (``sharded_update``, ``sharded_step``, ``sharded_grad_ready``); projector refreshes run
  ``sharded_randomized_svd``, the randomized range finder on the row shards, whose
  messages are O((m + n)·k).
* Checkpoints: ``optimizer.state_dict()`` gives FSDP2 parameters' state as DTensors
  (``state_layouts``: replicated, row shards, or per-rank 8-bit block scales, saved per code),
  so ``torch.distributed.checkpoint`` and ``get/set_optimizer_state_dict`` save and load it and
  reshard it onto another world size (8-bit blocks that move are requantized).
"""

import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from . import quant
from .projector import projection_side, refresh_seed
from .reference.galore_adamw import project, project_back


def _world_size() -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def check_layerwise_world(optimizer) -> None:
    """Raise if a layerwise optimizer runs in a multi-process job.

    Layerwise mode updates a parameter from its gradient the moment autograd has
    accumulated it, which under DDP is before (or racing with) the bucket's
    all-reduce: every rank would step from its own gradient and the replicas would
    drift apart silently.
    """
    world = _world_size()
    if world > 1:
        raise RuntimeError(
            f"{type(optimizer).__name__}(layerwise=True) in a multi-process run (world size {world}) is not "
            "supported: under DDP the per-parameter hooks would update each rank from its own gradient, before "
            "the all-reduce. Use layerwise=False with DDP (optionally with "
            "galore_kernels.distributed.low_rank_allreduce_hook), or shard the model with FSDP2 "
            "(torch.distributed.fsdp.fully_shard): layerwise mode runs on its sharded (DTensor) parameters, "
            "updating each from its averaged gradient shard (the README's \"Multi-GPU\" section says which options)."
        )


@dataclass
class LowRankAllreduceState:
    """The hook's state: the optimizer, the process group and the bytes it sent.

    Bytes are message payloads (what ``all_reduce`` is handed, summed over
    buckets); a ring all-reduce moves 2(N-1)/N times that per rank.
    ``dense_*`` count what plain DDP would have sent for the same buckets.
    ``galore_*`` cover the GaLore parameters alone, ``*_bytes`` everything.
    """

    optimizer: object
    process_group: object = None
    bytes_sent: int = 0
    dense_bytes: int = 0
    galore_bytes_sent: int = 0
    galore_dense_bytes: int = 0
    low_rank_params: int = 0

    def reset_counters(self) -> None:
        self.bytes_sent = self.dense_bytes = self.galore_bytes_sent = self.galore_dense_bytes = 0
        self.low_rank_params = 0


def _steady_projectors(optimizer, p: torch.Tensor):
    """``p``'s projectors when its next ``step()`` projects with them (no refresh due), else None."""
    index = optimizer._group_index.get(p)
    if index is None:
        return None
    group = optimizer.param_groups[index]
    state = optimizer.state.get(p)
    if not state or not optimizer._is_projected(state) or optimizer._refresh_due(group, p, state):
        return None
    return state.get("proj_left"), state.get("proj_right")


def _low_rank_allreduce(state: LowRankAllreduceState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world = group.size()
    optimizer = state.optimizer
    buffer = bucket.buffer()
    dense, low_rank = [], []
    for p, grad in zip(bucket.parameters(), bucket.gradients()):
        projectors = _steady_projectors(optimizer, p)
        nbytes = grad.numel() * grad.element_size()
        state.dense_bytes += nbytes
        if p in optimizer._galore_position:
            state.galore_dense_bytes += nbytes
        if projectors is None:
            dense.append((p, grad))
            if p in optimizer._galore_position:
                state.galore_bytes_sent += nbytes
        else:
            matrix = grad.reshape(grad.shape[0], -1)
            low_rank.append((p, grad, projectors, project(matrix, *projectors)))
    futures = []
    if dense:
        dense_flat = torch.cat([g.reshape(-1) for _, g in dense]).div_(world)
        state.bytes_sent += dense_flat.numel() * dense_flat.element_size()
        futures.append(dist.all_reduce(dense_flat, group=group, async_op=True).get_future())
    if low_rank:
        # fp32, as the moments consume it; a separate message so bf16 dense gradients stay bf16.
        low_flat = torch.cat([r.reshape(-1) for *_, r in low_rank]).div_(world)
        low_bytes = low_flat.numel() * low_flat.element_size()
        state.bytes_sent += low_bytes
        state.galore_bytes_sent += low_bytes
        state.low_rank_params += len(low_rank)
        futures.append(dist.all_reduce(low_flat, group=group, async_op=True).get_future())

    def unpack(_) -> torch.Tensor:
        # Results are read from the flat tensors, which the collectives reduced in place.
        if dense:
            offset = 0
            for _, grad in dense:
                grad.copy_(dense_flat[offset:offset + grad.numel()].view_as(grad))
                offset += grad.numel()
        if low_rank:
            offset = 0
            for p, grad, projectors, projected in low_rank:
                mean = low_flat[offset:offset + projected.numel()].view_as(projected).clone()
                offset += projected.numel()
                optimizer._reduced_low_rank[p] = mean
                # .grad holds the gradient the update acts on, so code that reads it
                # (a norm, a logger) sees the same value on every rank.
                grad.copy_(project_back(mean, *projectors).view_as(grad))
        return buffer

    return torch.futures.collect_all(futures).then(unpack)


def low_rank_allreduce_hook(optimizer, process_group=None):
    """``(state, hook)`` for ``ddp_model.register_comm_hook(state, hook)``.

    ``optimizer`` is the GaLoreAdamW / GaLoreAdamW8bit stepping the DDP model's
    parameters (``layerwise=False``). Its ``step()`` consumes the all-reduced
    low-rank gradients the hook leaves for it; ``.grad`` of those parameters holds
    the lifted mean (P R̄, the gradient the update acts on). ``state`` counts the
    bytes sent (``LowRankAllreduceState``).
    """
    if not hasattr(optimizer, "_reduced_low_rank"):
        raise TypeError(
            f"low_rank_allreduce_hook needs a GaLore optimizer (GaLoreAdamW, GaLoreAdamW8bit), got {type(optimizer).__name__}"
        )
    if optimizer.layerwise:
        check_layerwise_world(optimizer)
        raise ValueError("low_rank_allreduce_hook needs layerwise=False: the optimizer must step after the all-reduce")
    return LowRankAllreduceState(optimizer, process_group), _low_rank_allreduce


# ------------------------------------------------------------------- FSDP2

class RowShardComm:
    """The collectives of a row-sharded (m×n) matrix's refresh and step, with the bytes they carry.

    A rank holds rows ``[row_offset, row_offset + local_rows)``. Left-space vectors
    (m×k) are sharded the same way; right-space vectors (n×k) are replicated.
    """

    def __init__(self, group, rows: int, row_offset: int):
        self.group = group
        self.rows = rows
        self.row_offset = row_offset
        self.bytes_sent = 0
        self.largest_message = 0

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        nbytes = tensor.numel() * tensor.element_size()
        self.bytes_sent += nbytes
        self.largest_message = max(self.largest_message, nbytes)
        dist.all_reduce(tensor, group=self.group)
        return tensor

    def gather_rows(self, local: torch.Tensor) -> torch.Tensor:
        """The full (m×k) matrix from each rank's rows: O(m·k), only for the Householder fallback."""
        full = local.new_zeros((self.rows, local.shape[1]))
        full[self.row_offset:self.row_offset + local.shape[0]] = local
        return self.all_reduce(full)

    def local_rows(self, full: torch.Tensor, local_rows: int) -> torch.Tensor:
        return full[self.row_offset:self.row_offset + local_rows]


_LEFT, _RIGHT = "left", "right"
# csrc/randomized_svd.cpp's kMinCholeskyPivotRatio: below it CholeskyQR has lost too many digits.
MIN_CHOLESKY_PIVOT_RATIO = 1e-3


def _other(side: str) -> str:
    return _RIGHT if side == _LEFT else _LEFT


def _orthonormalize(y: torch.Tensor, passes: int, comm: RowShardComm, sharded: bool):
    """csrc/randomized_svd.cpp's ``orthonormalize``: CholeskyQR (``passes`` times), Householder QR when unsafe.

    For a sharded y the k×k Gram matrix is the all-reduced sum of the shards' Grams.
    """
    q, r, healthy = y, None, None
    for _ in range(passes):
        gram = q.t() @ q
        if sharded:
            comm.all_reduce(gram)
        lower, info = torch.linalg.cholesky_ex(gram)
        upper = lower.t()
        q = torch.linalg.solve_triangular(upper, q, upper=True, left=False)
        r = upper if r is None else upper @ r
        pivot_ratio = lower.diagonal() / gram.diagonal().sqrt()
        passed = (info == 0) & (pivot_ratio.min() >= MIN_CHOLESKY_PIVOT_RATIO)
        healthy = passed if healthy is None else healthy & passed
    if bool(healthy):
        return q, r
    if not sharded:
        return torch.linalg.qr(y, mode="reduced")
    full_q, full_r = torch.linalg.qr(comm.gather_rows(y), mode="reduced")
    return comm.local_rows(full_q, y.shape[0]), full_r


def sharded_randomized_svd(
    a_local: torch.Tensor,
    rank: int,
    comm: RowShardComm,
    *,
    oversample: int | None = None,
    power_iters: int | None = None,
    seed: int = 0,
    init_left: torch.Tensor | None = None,
    init_right: torch.Tensor | None = None,
):
    """``galore_kernels.randomized_svd`` of the row-sharded matrix A, never gathering A.

    a_local: this rank's rows (m_s×n) of A (m×n, ``comm.rows`` = m). init_left: this rank's
    rows (m_s×k0) of a left warm start; init_right: a replicated right one (k0×n).
    Returns (U_s: this rank's rows (m_s×rank), S (rank,), Vh (rank×n), replicated), equal to
    the single-process op on the full A up to rounding: the same sketch (the full Gaussian
    is drawn from ``seed`` on every rank, each using its rows), the same iterations. Every
    message is an n×k image, a k×k Gram matrix or a k-vector, k = rank + oversample;
    only the Householder fallback of an ill-conditioned basis gathers an m×k one.
    """
    from .svd import DEFAULT_OVERSAMPLE, DEFAULT_POWER_ITERS

    oversample = DEFAULT_OVERSAMPLE if oversample is None else oversample
    power_iters = DEFAULT_POWER_ITERS if power_iters is None else power_iters
    a = a_local.float()
    m, n, local_rows = comm.rows, a.shape[1], a.shape[0]
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"sharded_randomized_svd: rank must be in [1, {min(m, n)}], got {rank}")
    k = min(rank + oversample, min(m, n))

    def image(side, basis):
        # A left-space basis (sharded rows) maps to Aᵀ·basis, a sum over shards; a right one locally.
        return comm.all_reduce(a.t() @ basis) if side == _LEFT else a @ basis

    def gaussian(rows, cols):
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(rows, cols, generator=generator).to(a.device)

    def sketch(side, cols):
        if side == _LEFT:
            return a @ gaussian(n, cols)
        return image(_LEFT, comm.local_rows(gaussian(m, cols), local_rows))

    final_side = _LEFT if m <= n else _RIGHT
    side = _other(final_side)
    half_steps = 2 * power_iters
    if init_left is not None or init_right is not None:
        side = _LEFT if init_left is not None else _RIGHT
        prior = init_left.float() if init_left is not None else init_right.float().t()
        final_side = side
        half_steps += 1
        prior = prior[:, :min(prior.shape[1], k)]
        extra = k - prior.shape[1]
        start = torch.cat([prior, sketch(side, extra)], dim=1) if extra > 0 else prior
    else:
        start = sketch(side, k)
    basis, _ = _orthonormalize(start, 2 if half_steps == 0 else 1, comm, sharded=side == _LEFT)
    for step in range(half_steps):
        mapped = image(side, basis)
        side = _other(side)
        basis, _ = _orthonormalize(mapped, 2 if step + 1 == half_steps else 1, comm, sharded=side == _LEFT)
    last_q, last_r = _orthonormalize(image(side, basis), 2, comm, sharded=_other(side) == _LEFT)
    if not bool(torch.isfinite(last_r).all()):
        nan = float("nan")
        return a.new_full((local_rows, rank), nan), a.new_full((rank,), nan), a.new_full((rank, n), nan)
    small_u, singular_values, small_vh = torch.linalg.svd(last_r, full_matrices=False)
    lead_u, lead_v, s = small_u[:, :rank], small_vh[:rank].t(), singular_values[:rank].contiguous()
    if side == _LEFT:
        return basis @ lead_v, s, lead_u.t() @ last_q.t()
    return last_q @ lead_u, s, lead_v.t() @ basis.t()


def _align_signs(u_local, vh, prev_left, prev_right, comm: RowShardComm):
    """``projector._align_signs`` for a row-sharded U: the same rule, its sums taken over shards."""
    if prev_left is not None and prev_left.shape == u_local.shape:
        agreement = comm.all_reduce((u_local * prev_left).sum(dim=0))
    elif prev_right is not None and prev_right.shape == vh.shape:
        agreement = (vh * prev_right).sum(dim=1)
    else:
        # Each column's largest-magnitude entry, over all shards (the first rank's on a tie, as argmax).
        rank = u_local.shape[1]
        candidates = u_local.new_zeros((comm.group.size(), rank))
        if u_local.shape[0] > 0:
            candidates[dist.get_rank(comm.group)] = u_local.gather(0, u_local.abs().argmax(dim=0, keepdim=True)).squeeze(0)
        comm.all_reduce(candidates)
        agreement = candidates.gather(0, candidates.abs().argmax(dim=0, keepdim=True)).squeeze(0)
    signs = torch.where(agreement < 0, -1.0, 1.0)
    return u_local * signs, vh * signs[:, None]


def sharded_projectors(grad_local: torch.Tensor, rank: int, side: str, comm: RowShardComm, *, seed: int, previous):
    """``projector.compute_projectors`` (svd="randomized") of a row-sharded gradient.

    Returns ``(proj_left rows (m_s×r) | None, proj_right (r×n) | None)``. ``previous``:
    ``(this rank's rows of the previous left projector | None, the previous right one | None)``.
    """
    from .projector import warn_once
    from .svd import DEFAULT_POWER_ITERS

    matrix = grad_local.detach().float()
    prev_left, prev_right = previous
    finite = comm.all_reduce(torch.isfinite(matrix).all().to(torch.float32).reshape(1))
    if bool(finite < comm.group.size()):
        warn_once(
            "projector-non-finite gradient",
            "GaLore projector refresh skipped (non-finite gradient); keeping the previous projector "
            "(the coordinate axes at the first refresh). This warning is shown once.",
        )
        n = matrix.shape[1]
        left = prev_left if prev_left is not None else comm.local_rows(torch.eye(comm.rows, rank, device=matrix.device), matrix.shape[0])
        right = prev_right if prev_right is not None else torch.eye(n, rank, device=matrix.device).t().contiguous()
        return (left if side in ("left", "full") else None), (right if side in ("right", "full") else None)
    warm = prev_left is not None or prev_right is not None
    u_local, _, vh = sharded_randomized_svd(
        matrix, rank, comm, seed=seed, power_iters=DEFAULT_POWER_ITERS - 1 if warm else DEFAULT_POWER_ITERS,
        init_left=prev_left, init_right=prev_right if prev_left is None else None,
    )
    u_local, vh = _align_signs(u_local, vh, prev_left, prev_right, comm)
    return (u_local.contiguous() if side in ("left", "full") else None), (vh.contiguous() if side in ("right", "full") else None)


def is_sharded(p: torch.Tensor) -> bool:
    """Whether ``p`` is a DTensor (an FSDP2 ``fully_shard`` parameter)."""
    return isinstance(p, DTensor)


def sharded_grad_ready(optimizer, p) -> None:
    """Layerwise mode's hook on an FSDP2 parameter: FSDP2 runs it once the reduce-scatter has left
    the averaged gradient shard in ``p.grad``; update from it and free it.

    Every rank runs the hooks in the same order (FSDP2's parameter order), so the collectives
    of the refresh and of the left projection match up across ranks.
    """
    if optimizer.accumulation_steps != 1 or optimizer.clip_strategy == "two_pass":
        raise ValueError(
            "layerwise mode on FSDP2 (DTensor) parameters supports accumulation_steps=1 (accumulate with FSDP2's "
            "set_requires_gradient_sync) and clip_strategy='hold' for now"
        )
    if p.grad is None:
        return
    group = optimizer.param_groups[optimizer._group_index[p]]
    if optimizer.max_grad_norm is None and not optimizer.track_grad_norm:
        sharded_update(optimizer, group, p)
        p.grad = None
        return
    # clip_strategy="hold": keep what the moments will see (low-rank for GaLore parameters),
    # free the gradient, and clip everything together when backward ends.
    held = (group, *_consume(optimizer, group, p))
    p.grad = None
    if not optimizer._sharded_held:
        comm = _row_shard(p)
        torch.autograd.Variable._execution_engine.queue_callback(lambda: _finish_held(optimizer, comm))
    optimizer._sharded_held.append(held)


def _finish_held(optimizer, comm: RowShardComm) -> None:
    held, optimizer._sharded_held = optimizer._sharded_held, []
    with torch.no_grad():
        _clip_and_apply(optimizer, held, comm)


def _row_shard(p) -> RowShardComm:
    """The communicator of an FSDP2 parameter: a 1-D mesh, ``Shard(0)``; anything else is refused."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        raise ValueError(
            f"GaLore on sharded parameters supports FSDP2's 1-D mesh with Shard(0) placements, got mesh of "
            f"{p.device_mesh.ndim} dimension(s) and placements {tuple(p.placements)}"
        )
    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return RowShardComm(p.device_mesh.get_group(), p.shape[0], offset[0])


def _check_sharded_options(optimizer, group: dict) -> None:
    from .optim import GaLoreAdamW, GaLoreAdamW8bit

    # Other optimizers' state is not elementwise in the shard (Adafactor's factored second
    # moment averages over rows, for one); their sharded math is not written yet.
    if type(optimizer) not in (GaLoreAdamW, GaLoreAdamW8bit):
        raise TypeError(f"{type(optimizer).__name__} is not supported yet on FSDP2 (DTensor) parameters; "
                        "GaLoreAdamW and GaLoreAdamW8bit are")
    unsupported = [
        (group.get("svd") == "exact", "svd='exact' (it would gather the gradient; the sharded refresh is randomized)"),
        (optimizer.moments_on_refresh != "keep", f"moments_on_refresh={optimizer.moments_on_refresh!r}"),
        (optimizer.refresh != "fixed", f"refresh={optimizer.refresh!r}"),
    ]
    for refused, name in unsupported:
        if refused:
            raise ValueError(f"{name} is not supported yet on FSDP2 (DTensor) parameters; the defaults are")


def _poison_unless_all_finite(tensor: torch.Tensor, comm: RowShardComm) -> torch.Tensor:
    """``tensor`` if every rank's shard is finite, else NaN everywhere: the step functions skip a
    non-finite update, and a single process skips the whole parameter, so every shard must skip.
    One 4-byte all-reduce and no host synchronization."""
    poison = torch.where(torch.isfinite(tensor).all(), 0.0, float("nan")).to(torch.float32).reshape(1)
    comm.all_reduce(poison)
    return tensor + poison.to(tensor.dtype)


def sharded_geometry(optimizer, group: dict, p, local_rows: int | None = None):
    """``checkpoint.galore_geometry`` of an FSDP2 parameter, in this rank's shapes (or those of a
    shard of ``local_rows`` rows): ``(side, low-rank shape, projector shapes)``, or None for a plain parameter."""
    rank = optimizer._galore_rank(group, p)
    if rank is None:
        return None
    rows = p.to_local().shape[0] if local_rows is None else local_rows
    n = math.prod(p.shape[1:])
    side = projection_side(group["proj_type"], (p.shape[0], n))
    if side == "full":
        raise ValueError("proj_type='full' is not supported yet on FSDP2 (DTensor) parameters")
    if side == "left":
        return side, (rank, n), {"proj_left": (rows, rank)}
    return side, (rows, rank), {"proj_right": (rank, n)}


def sharded_fresh_state(optimizer, group: dict, p, device=None, local_rows: int | None = None) -> dict:
    """The state an FSDP2 parameter starts with, shaped by this rank's shard (or by a shard of
    ``local_rows`` rows), on ``device`` (meta for checks)."""
    local = p.to_local()
    device = local.device if device is None else device
    shape = tuple(local.shape) if local_rows is None else (local_rows, *p.shape[1:])
    state = {"step": 0, "nonfinite_skips": torch.zeros((), dtype=torch.int64, device=device)}
    target = torch.empty(shape, dtype=local.dtype, device=device)
    geometry = sharded_geometry(optimizer, group, p, local_rows)
    if geometry is None:
        optimizer._init_moments(state, target, shape, side=None, group=group)
    else:
        optimizer._init_moments(state, target, geometry[1], side=geometry[0], group=group)
    return state


def _consume(optimizer, group: dict, p):
    """Refresh ``p``'s projector when due and return ``(state, target, consumed gradient, projected,
    replicated)``: the gradient as the moments see it, and whether every rank holds all of it
    (the left projection's r×n) or its shard only."""
    _check_sharded_options(optimizer, group)
    local = p.to_local()
    local_grad = p.grad.to_local()
    state = optimizer.state[p]
    geometry = sharded_geometry(optimizer, group, p)
    side, rank = (None, None) if geometry is None else (geometry[0], optimizer._galore_rank(group, p))
    comm = _row_shard(p)
    if "step" not in state:
        state.update(sharded_fresh_state(optimizer, group, p))
    if side is None:
        consumed = _poison_unless_all_finite(local_grad, comm)
        optimizer.sharded_bytes_sent += comm.bytes_sent
        return state, local, consumed, False, False
    grad_matrix = local_grad.reshape(local_grad.shape[0], -1)
    if optimizer._refresh_due(group, p, state):
        started = time.perf_counter()
        left, right = sharded_projectors(
            grad_matrix, rank, side, comm,
            seed=refresh_seed(optimizer.seed, optimizer._param_index[p], state["step"]),
            previous=(state.get("proj_left"), state.get("proj_right")),
        )
        optimizer.refresh_seconds += time.perf_counter() - started
        optimizer.refresh_count += 1
        for key, value in (("proj_left", left), ("proj_right", right)):
            if value is not None:
                state[key] = value
    if side == "right":
        low_rank = _poison_unless_all_finite(grad_matrix.float() @ state["proj_right"].t(), comm)
    else:  # the all-reduce spreads a NaN to every rank
        low_rank = comm.all_reduce(state["proj_left"].t() @ grad_matrix.float())
    optimizer.sharded_bytes_sent += comm.bytes_sent
    return state, local.reshape(local.shape[0], -1), low_rank, True, side == "left"


def _apply(optimizer, group: dict, state: dict, target, consumed, projected: bool) -> None:
    state["step"] += 1
    optimizer._run_step(group, target, state, consumed, projected)


def sharded_update(optimizer, group: dict, p) -> None:
    """One update of an FSDP2 parameter from its averaged gradient shard, never gathering it.

    The side follows ``proj_type``'s rule on the full (m×n) shape, so the result is
    single-process training's. Right (R = G Qᵀ): projection, moments and update are
    local to the rows. Left (R = PᵀG = Σ_s P_sᵀG_s): one all-reduce of r×n, then each
    rank updates its rows with its rows P_s of P; the r×n moments are replicated.
    Non-GaLore parameters are elementwise: their moments are sharded like them.
    """
    state, target, consumed, projected, _ = _consume(optimizer, group, p)
    _apply(optimizer, group, state, target, consumed, projected)


def sharded_step(optimizer, items: list) -> None:
    """``step()`` of the FSDP2 parameters ``items`` (``(group, p)``), clipped with ``max_grad_norm``.

    The global norm is single-process ``step()``'s: that of the low-rank gradients of GaLore
    parameters and the full gradients of the others. Shards' squared norms are summed by one
    all-reduce; the replicated r×n left projections are counted once, on top.
    """
    if optimizer.max_grad_norm is None and not optimizer.track_grad_norm:
        for group, p in items:
            sharded_update(optimizer, group, p)
        return
    consumed = [(group, *_consume(optimizer, group, p)) for group, p in items]
    _clip_and_apply(optimizer, consumed, _row_shard(items[0][1]))


def _clip_and_apply(optimizer, consumed: list, comm: RowShardComm) -> None:
    """Clip ``consumed`` (``(group, state, target, grad, projected, replicated)``) by their global norm, then update."""
    sharded_sq = torch.zeros(1, dtype=torch.float32)
    replicated_sq = torch.zeros(1, dtype=torch.float32)
    for _, _, _, grad, _, replicated in consumed:
        square = torch.linalg.vector_norm(grad.float()).square().cpu()
        if replicated:
            replicated_sq += square
        else:
            sharded_sq += square
    device = consumed[0][3].device
    total = (comm.all_reduce(sharded_sq.to(device)) + replicated_sq.to(device)).sqrt().reshape(())
    optimizer.sharded_bytes_sent += comm.bytes_sent
    optimizer._add_grad_sq(total.square())
    coef = None if optimizer.max_grad_norm is None else torch.clamp(optimizer.max_grad_norm / (total + 1e-6), max=1.0)
    for group, state, target, grad, projected, _ in consumed:
        if coef is not None:
            grad = grad.float() * coef if projected else grad * coef.to(grad.dtype)
        _apply(optimizer, group, state, target, grad, projected)


# ------------------------------------------------------------- checkpoints (DCP)

# Probe a shard this many rows taller than the whole parameter: a count of 256-value blocks (an 8-bit absmax)
# grows with them, so a shape equal at every probe does not depend on the rows at all.
_FAR_PROBE_ROWS = 257
PER_RANK = "per-rank"


def _shard_rows(p) -> list[int]:
    """Every rank's row count under FSDP2's Shard(0) (torch.chunk's split; trailing ranks may hold none)."""
    world, rows = p.device_mesh.size(), p.shape[0]
    chunk = -(-rows // world)
    return [max(0, min(chunk, rows - rank * chunk)) for rank in range(world)]


def _probe_shapes(optimizer, group: dict, p, rows: int) -> dict[str, torch.Size]:
    """Shapes of the state tensors (fresh ones and projectors) the optimizer keeps for a shard of ``rows`` rows."""
    fresh = sharded_fresh_state(optimizer, group, p, device="meta", local_rows=rows)
    shapes = {key: value.shape for key, value in fresh.items() if torch.is_tensor(value)}
    geometry = sharded_geometry(optimizer, group, p, rows)
    if geometry is not None:
        shapes.update({key: torch.Size(shape) for key, shape in geometry[2].items()})
    return shapes


def state_layouts(optimizer, group: dict, p) -> dict:
    """How each state tensor of an FSDP2 parameter relates to the one a single process keeps:
    ``Replicate()``, ``Shard(d)`` or ``PER_RANK``, by key.

    Derived from the optimizer's own fresh state for shards of every rank's row count, the full
    row count and a far taller one, so it covers whatever keys the optimizer keeps, identically on
    every rank: a shape the rows leave unchanged is replicated (the optimizer computes those values
    alike on every rank: left-projected moments, the right projector, counters); a shape whose
    dimension d is the row count, all else fixed, is a row shard (elementwise and right-projected
    moments, the left projector's rows); anything else is laid out by the shard itself (the absmax
    of 8-bit blocks, which run across rows), and ``state_to_dtensors`` saves it in another form.
    """
    from torch.distributed.tensor import Replicate, Shard

    shard_rows = sorted(set(_shard_rows(p)))
    far_rows = p.shape[0] + _FAR_PROBE_ROWS
    probes = {rows: _probe_shapes(optimizer, group, p, rows) for rows in {*shard_rows, p.shape[0], far_rows}}
    layouts = {}
    for key in set().union(*(probes[rows].keys() for rows in shard_rows)):
        shapes = {rows: shapes.get(key) for rows, shapes in probes.items()}
        if shapes[far_rows] is None:  # fp32 moments the taller shard would keep in 8 bits: no block counts
            del shapes[far_rows]
        if all(shape is not None for shape in shapes.values()):
            first = next(iter(shapes.values()))
            if all(shape == first for shape in shapes.values()):
                layouts[key] = Replicate()
                continue
            tracking = [
                d for d in range(len(first))
                if all(len(s) == len(first) and s[d] == rows and s[:d] + s[d + 1:] == first[:d] + first[d + 1:]
                       for rows, s in shapes.items())
            ]
            if len(tracking) == 1:
                layouts[key] = Shard(tracking[0])
                continue
        layouts[key] = PER_RANK
    # Made at the first update, so in no fresh state: a 0-d step stamp that only the step which
    # wrote it reads (a resumed run stamps later steps), whatever value is saved.
    layouts.setdefault("nonfinite_flag", Replicate())
    return layouts


def _contiguous_stride(shape) -> tuple[int, ...]:
    return tuple(math.prod(shape[d + 1:]) for d in range(len(shape)))


def _codes_key(absmax_key: str) -> str | None:
    """``exp_avg_codes`` for ``exp_avg_absmax``: the 8-bit codes whose blocks an absmax key scales."""
    return absmax_key.removesuffix("_absmax") + "_codes" if absmax_key.endswith("_absmax") else None


def _absmax_per_code(absmax: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Each code's block absmax, shaped like ``codes``: the 8-bit state in a form whose layout is the
    codes' (replicated or row-sharded), so that DCP can reshard it, where the blocks are the shard's."""
    return absmax.repeat_interleave(quant.BLOCK_SIZE)[:codes.numel()].view(codes.shape)


def _blocks_from_absmax_per_code(codes: torch.Tensor, per_code: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, absmax)`` of this shard's 256-value blocks from codes and each code's saved absmax.

    A block whose codes all carry one absmax was a block when saved (the same world size, or a
    boundary that falls alike): kept bit for bit. A block that joins values of differently scaled
    saved blocks (another world size) is requantized from the dequantized values, as the next
    step would requantize an updated one: a rounding of at most half a code step of the new block.
    """
    flat = per_code.reshape(-1)
    numel = flat.numel()
    num_blocks = -(-numel // quant.BLOCK_SIZE)
    if numel == 0:
        return codes, flat.new_zeros(0)
    padded = flat.new_empty(num_blocks * quant.BLOCK_SIZE)
    padded[:numel] = flat
    padded[numel:] = flat[(num_blocks - 1) * quant.BLOCK_SIZE]  # the last block's padding agrees with it
    blocks = padded.view(num_blocks, quant.BLOCK_SIZE)
    first = blocks[:, 0].contiguous()
    whole = (blocks == first[:, None]).all(dim=1)
    if bool(whole.all()):
        return codes, first
    values = quant.dynamic_map(signed, codes.device)[codes.long()] * per_code
    requantized_codes, requantized_absmax = quant.quantize_blockwise(values, signed=signed)
    kept = whole.repeat_interleave(quant.BLOCK_SIZE)[:numel].view(codes.shape)
    return torch.where(kept, codes, requantized_codes), torch.where(whole, first, requantized_absmax)


def state_to_dtensors(optimizer, group: dict, p, state: dict, label: str) -> dict:
    """``p``'s state with every tensor as a DTensor on ``p``'s mesh, for ``torch.distributed.checkpoint``.

    Replicated and row-sharded tensors become the single process's tensor, so DCP can load them on
    another world size. The absmax of 8-bit blocks, which the shard lays out, is saved per code, in
    its codes' layout (``_absmax_per_code``); any other per-rank tensor is refused.
    """
    from torch.distributed.tensor import Replicate, Shard

    mesh = p.device_mesh
    layouts = state_layouts(optimizer, group, p)
    converted = {}
    for key, value in state.items():
        if not torch.is_tensor(value):
            converted[key] = value
            continue
        layout = layouts.get(key)
        if layout is None:
            raise ValueError(f"{label}: state {key!r} has no known sharding (not a state this optimizer creates on FSDP2)")
        codes_key = _codes_key(key)
        if layout == PER_RANK and codes_key in state and layouts.get(codes_key) != PER_RANK:
            value, layout = _absmax_per_code(value, state[codes_key]), layouts[codes_key]
        if isinstance(layout, Replicate):
            converted[key] = DTensor.from_local(value, mesh, [layout], run_check=False)
        elif isinstance(layout, Shard):
            shape = list(value.shape)
            shape[layout.dim] = p.shape[0]
            converted[key] = DTensor.from_local(value, mesh, [layout], run_check=False, shape=torch.Size(shape),
                                                stride=_contiguous_stride(shape))
        else:
            raise ValueError(f"{label}: state {key!r} is laid out by each rank's shard and has no form DCP can reshard")
    return converted


def state_from_dtensors(optimizer, group: dict, p, state: dict, label: str) -> None:
    """Undo ``state_to_dtensors`` in place: each DTensor becomes this rank's local tensor.

    Replicated and row-sharded tensors are redistributed to this mesh when they come in another
    layout. An absmax saved per code is redistributed like its codes, then made this shard's
    blocks again (``_blocks_from_absmax_per_code``: bit for bit on the saving world size,
    requantized where another world size moves the block boundaries). Tensors that are not
    DTensors (a per-rank ``torch.save`` of local state) are left to the load checks.
    """
    layouts = state_layouts(optimizer, group, p)
    per_code = {}
    for key, value in state.items():
        if not isinstance(value, DTensor):
            continue
        layout = layouts.get(key)
        if layout is None:
            raise ValueError(f"{label}: the checkpoint's state {key!r} has no place in {type(optimizer).__name__}'s state on FSDP2")
        codes_key = _codes_key(key)
        if layout == PER_RANK:
            if codes_key not in state or layouts.get(codes_key) == PER_RANK:
                raise ValueError(f"{label}: the checkpoint's state {key!r} is laid out by each rank's shard, which no "
                                 "world size can load")
            per_code[key] = codes_key
            layout = layouts[codes_key]
        if tuple(value.placements) != (layout,) or value.device_mesh != p.device_mesh:
            value = value.redistribute(p.device_mesh, [layout])
        state[key] = value.to_local().clone()
    for key, codes_key in per_code.items():
        if state[key].shape != state[codes_key].shape:
            raise ValueError(f"{label}: the checkpoint's {key!r} has shape {tuple(state[key].shape)}, not one absmax per "
                             f"code of {codes_key!r} {tuple(state[codes_key].shape)}")
        # Adam's first moment takes the signed dynamic map, the second the unsigned one.
        signed = not key.startswith("exp_avg_sq")
        state[codes_key], state[key] = _blocks_from_absmax_per_code(state[codes_key], state[key], signed)


def sharded_state_dict(optimizer, state_dict: dict) -> dict:
    """``optimizer.state_dict()`` with the state of FSDP2 parameters as DTensors (``state_to_dtensors``)."""
    from .optim.checkpoint import param_label

    located = {}
    index = 0
    for group_index, group in enumerate(optimizer.param_groups):
        for position, p in enumerate(group["params"]):
            located[index] = (group_index, position, p)
            index += 1
    states = {}
    for index, state in state_dict["state"].items():
        group_index, position, p = located[index]
        if is_sharded(p):
            label = param_label(optimizer, group_index, position)
            state = state_to_dtensors(optimizer, optimizer.param_groups[group_index], p, state, label)
        states[index] = state
    return {**state_dict, "state": states}


def localize_loaded_state(optimizer) -> None:
    """After ``load_state_dict``: every FSDP2 parameter's DTensor state back to local tensors."""
    from .optim.checkpoint import param_label

    for group_index, group in enumerate(optimizer.param_groups):
        for position, p in enumerate(group["params"]):
            state = optimizer.state.get(p)
            if state and is_sharded(p):
                state_from_dtensors(optimizer, group, p, state, param_label(optimizer, group_index, position))
