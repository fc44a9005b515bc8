"""GaLore across processes: a low-rank DDP communication hook and the multi-process guard.

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
* ``layerwise=True`` in a multi-process run is refused (``check_layerwise_world``):
  the hooks would update each rank from its own, not yet averaged, gradient.
"""

from dataclasses import dataclass, field

import torch
import torch.distributed as dist


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
            "(torch.distributed.fsdp.fully_shard), the engine layerwise multi-GPU support is being built on; "
            "layerwise mode under FSDP2 is not available yet either."
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
    low_rank_params: int = field(default=0)

    def reset_counters(self) -> None:
        self.bytes_sent = self.dense_bytes = self.galore_bytes_sent = self.galore_dense_bytes = 0
        self.low_rank_params = 0


def _project(grad: torch.Tensor, proj_left, proj_right) -> torch.Tensor:
    """PᵀG (r×n), G Qᵀ (m×r) or PᵀG Qᵀ (r×r), in fp32: the gradient as the moments see it."""
    low_rank = grad.float()
    if proj_left is not None:
        low_rank = proj_left.t() @ low_rank
    if proj_right is not None:
        low_rank = low_rank @ proj_right.t()
    return low_rank


def _lift(low_rank: torch.Tensor, proj_left, proj_right) -> torch.Tensor:
    """P R, R Q or P R Q: the full-size gradient an update from R acts on."""
    full = low_rank
    if proj_left is not None:
        full = proj_left @ full
    if proj_right is not None:
        full = full @ proj_right
    return full


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
            low_rank.append((p, grad, projectors, _project(matrix, *projectors)))
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
                grad.copy_(_lift(mean, *projectors).view_as(grad))
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
