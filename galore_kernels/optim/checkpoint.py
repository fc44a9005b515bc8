"""Checkpoints from elsewhere: validating a loaded optimizer state, and galore-torch's.

``validate_loaded_state`` compares every loaded per-parameter state with the state
the optimizer itself would create for that parameter (its own ``_fresh_state``, on
the meta device), so the check follows whatever layout the optimizer uses and a
checkpoint of another model, another optimizer class or an older layout fails at
``load_state_dict`` with the parameter named, not deep inside the first ``step()``.

``convert_galore_torch_state_dict`` turns a galore-torch 1.0 optimizer state dict
(``GaLoreProjector`` objects, fp32 moments or bitsandbytes 8-bit states) into ours.
"""

from __future__ import annotations

import math

import torch

from .. import distributed, quant
from ..projector import low_rank_shape, projection_side, projector_dtype, warn_once

# Keys a state may hold besides the fresh ones and the projector: layerwise accumulation,
# and the refresh schedule and moment-reset step that a refresh records.
_OPTIONAL_KEYS = ("micro_steps", "grad_accum", "proj_gap", "next_refresh", "refreshes", "moments_reset_at",
                  "nonfinite_flag")
_MOMENTS = (("exp_avg", True), ("exp_avg_sq", False))  # (name, quantized with the signed map)


def param_label(optimizer, group_index: int, index: int) -> str:
    """'parameter <name> (group g, position i, shape ...)', the name when the group carries ``param_names``."""
    group = optimizer.param_groups[group_index]
    p = group["params"][index]
    names = group.get("param_names")
    name = f"{names[index]!r} " if names else ""
    return f"parameter {name}(group {group_index}, position {index}, shape {tuple(p.shape)})"


def _matrix_shape(p: torch.Tensor) -> tuple[int, int]:
    return (p.shape[0], math.prod(p.shape[1:]))


def galore_geometry(optimizer, group: dict, p: torch.Tensor):
    """``(side, low-rank shape, projector shapes)`` of a GaLore parameter, or None for a plain one."""
    if distributed.is_sharded(p):  # FSDP2: this rank's shard
        return distributed.sharded_geometry(optimizer, group, p)
    rank = optimizer._galore_rank(group, p)
    if rank is None:
        return None
    m, n = _matrix_shape(p)
    side = projection_side(group["proj_type"], (m, n))
    projectors = {"left": {"proj_left": (m, rank)}, "right": {"proj_right": (rank, n)}}.get(
        side, {"proj_left": (m, rank), "proj_right": (rank, n)}
    )
    return side, low_rank_shape((m, n), side, rank), projectors


def expected_state(optimizer, group: dict, p: torch.Tensor) -> dict:
    """The fresh state ``optimizer`` creates for ``p``, as meta tensors (no memory)."""
    if distributed.is_sharded(p):
        return distributed.sharded_fresh_state(optimizer, group, p, device="meta")
    return optimizer._fresh_state(group, torch.empty(p.shape, dtype=p.dtype, device="meta"))


def _quantize_fp32_moments(state: dict, moment_shape: tuple, side: str | None, label: str, optimizer) -> None:
    """fp32 ``exp_avg``/``exp_avg_sq`` (shaped like the gradient the moments see) -> 8-bit, through ``quant``."""
    for name, _ in _MOMENTS:
        moment = state.get(name)
        if not torch.is_tensor(moment) or tuple(moment.shape) != moment_shape:
            found = tuple(moment.shape) if torch.is_tensor(moment) else moment
            raise ValueError(f"{label}: the checkpoint's {name} is {found!r}, expected a tensor of shape {moment_shape}")
    for name, signed in _MOMENTS:
        moment = state.pop(name).float()
        values = moment if side is None else quant.to_lowrank_layout(moment, side)
        state[f"{name}_codes"], state[f"{name}_absmax"] = quant.quantize_blockwise(values, signed=signed)
    warn_once(
        f"quantize-fp32-moments-{type(optimizer).__name__}",
        f"fp32 Adam moments in the checkpoint were quantized to {type(optimizer).__name__}'s 8-bit state.",
    )


def _check_tensor(label: str, key: str, value, shape: tuple, dtype: torch.dtype) -> None:
    if not torch.is_tensor(value):
        raise ValueError(f"{label}: state {key!r} should be a tensor, got {type(value).__name__}")
    if tuple(value.shape) != tuple(shape) or value.dtype != dtype:
        raise ValueError(
            f"{label}: state {key!r} is {value.dtype} {tuple(value.shape)} in the checkpoint, but this "
            f"optimizer keeps {dtype} {tuple(shape)} for it (a checkpoint of another model, optimizer class or state layout?)"
        )


def validate_loaded_state(optimizer) -> None:
    """Check (and where it is lossless in meaning, convert) every loaded state against a fresh one.

    Raises ValueError naming the parameter for a missing or unexpected key, or a
    tensor whose shape or dtype differs from what this optimizer creates. fp32 moments
    where the optimizer keeps 8-bit ones are quantized (with one warning); 8-bit
    moments where it keeps fp32 are refused. Projectors are cast to the dtype a refresh
    stores (``projector.projector_dtype``): checkpoints written before 16-bit parameters
    kept 16-bit projectors hold fp32 ones, and a refresh would round them the same way.
    """
    for group_index, group in enumerate(optimizer.param_groups):
        for index, p in enumerate(group["params"]):
            state = optimizer.state.get(p)
            if not state:
                continue
            label = param_label(optimizer, group_index, index)
            fresh = expected_state(optimizer, group, p)
            geometry = galore_geometry(optimizer, group, p)
            local = p.to_local() if distributed.is_sharded(p) else p
            side, moment_shape = (None, tuple(local.shape)) if geometry is None else geometry[:2]
            if "exp_avg_codes" in fresh and "exp_avg" in state and "exp_avg_codes" not in state:
                _quantize_fp32_moments(state, moment_shape, side, label, optimizer)
            if "exp_avg" in fresh and "exp_avg_codes" in state:
                raise ValueError(
                    f"{label}: the checkpoint holds 8-bit moments, but {type(optimizer).__name__} keeps fp32 "
                    "moments for it; load it into GaLoreAdamW8bit (with the same min_8bit_size)"
                )
            if "nonfinite_flag" in fresh and "nonfinite_flag" not in state:  # a checkpoint from before the flag
                state["nonfinite_flag"] = torch.zeros((), dtype=torch.int32, device=local.device)
            projectors = {} if geometry is None else geometry[2]
            required = set(fresh) | (set(projectors) if state.get("step", 0) > 0 else set())
            allowed = set(fresh) | set(projectors) | set(_OPTIONAL_KEYS)
            missing, unexpected = sorted(required - set(state)), sorted(set(state) - allowed)
            if missing or unexpected:
                raise ValueError(
                    f"{label}: the checkpoint's state does not fit {type(optimizer).__name__}: "
                    f"missing {missing}, unexpected {unexpected}"
                )
            if isinstance(state["step"], bool) or not isinstance(state["step"], int):
                raise ValueError(f"{label}: state 'step' should be an int, got {state['step']!r}")
            for key, value in fresh.items():
                if torch.is_tensor(value):
                    _check_tensor(label, key, state[key], value.shape, value.dtype)
            # The FSDP2 path refreshes and keeps its (sharded) projectors in fp32.
            proj_dtype = torch.float32 if distributed.is_sharded(p) else projector_dtype(p.dtype)
            for key, shape in projectors.items():
                if key in state:
                    if torch.is_tensor(state[key]) and state[key].dtype in (torch.float32, torch.bfloat16, torch.float16):
                        state[key] = state[key].to(proj_dtype)
                    _check_tensor(label, key, state[key], shape, proj_dtype)
            if "nonfinite_flag" in state and "nonfinite_flag" not in fresh:  # an FSDP2 state makes it at its first update
                _check_tensor(label, "nonfinite_flag", state["nonfinite_flag"], (), torch.int32)
            if "grad_accum" in state:
                accumulated = state["grad_accum"]
                if not torch.is_tensor(accumulated) or tuple(accumulated.shape) not in (moment_shape, tuple(p.shape)):
                    raise ValueError(
                        f"{label}: state 'grad_accum' should be shaped {moment_shape} or {tuple(p.shape)}, "
                        f"got {getattr(accumulated, 'shape', accumulated)!r}"
                    )


# --------------------------------------------------------------------------- galore-torch

# bitsandbytes' group keys that mean nothing here (its AdEMAMix and paging options).
_BNB_GROUP_KEYS = ("alpha", "t_alpha", "t_beta3", "weight_decay_saved")
_GALORE_TORCH_STATE_KEYS = {"step", "projector", "exp_avg", "exp_avg_sq", "state1", "state2", "absmax1", "absmax2", "qmap1", "qmap2"}
# bitsandbytes >= 0.45 nests a parameter's quantized state under this key in state_dict().
_BNB_NESTED_KEY = "__bnb_optimizer_quant_state__"
# bitsandbytes' update-norm buffer: only read with max_unorm > 0, which galore-torch never sets.
_BNB_UNUSED_KEYS = ("unorm_vec",)


def _projector_fields(projector) -> dict:
    """The attributes of a galore_torch ``GaLoreProjector`` (or a dict of them)."""
    fields = projector if isinstance(projector, dict) else vars(projector)
    if "ortho_matrix" not in fields or "proj_type" not in fields:
        raise ValueError(f"not a galore-torch GaLoreProjector: {type(projector).__name__} without ortho_matrix/proj_type")
    return fields


def _galore_torch_side(proj_type: str, ortho, low_rank: tuple[int, int]) -> tuple[str, tuple[int, int]]:
    """Which side galore-torch projected on, and the full matrix shape, from the shapes it saved."""
    if isinstance(ortho, (list, tuple)):
        return "full", (ortho[0].shape[0], ortho[1].shape[1])
    candidates = []
    if ortho.shape[1] == low_rank[0]:  # left: R = Pᵀ G, P m×r, R r×n
        candidates.append(("left", (ortho.shape[0], low_rank[1])))
    if low_rank[1] == ortho.shape[0]:  # right: R = G Qᵀ, R m×r, Q r×n
        candidates.append(("right", (low_rank[0], ortho.shape[1])))
    matching = [(side, shape) for side, shape in candidates if projection_side(proj_type, shape) == side]
    if len(matching) != 1:
        raise ValueError(
            f"cannot tell the projection side of a galore-torch state: proj_type={proj_type!r}, "
            f"projector {tuple(ortho.shape)}, low-rank moments {low_rank}"
        )
    return matching[0]


def _bnb_blocksize(numel: int, blocks: int) -> int:
    """bitsandbytes' block size from how many absmax values a state has (256 since 0.44, 2048 before)."""
    sizes = [1 << k for k in range(6, 13) if -(-numel // (1 << k)) == blocks]
    if len(sizes) != 1:
        raise ValueError(f"cannot infer the bitsandbytes block size of a {numel}-value state with {blocks} absmax values")
    return sizes[0]


def _bnb_dequantize(codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """A bitsandbytes blockwise 8-bit state -> fp32 values shaped like ``codes``."""
    flat = codes.reshape(-1).long()
    blocksize = _bnb_blocksize(flat.numel(), absmax.numel())
    block = torch.arange(flat.numel(), device=codes.device) // blocksize
    return (qmap.float()[flat] * absmax.float()[block]).view(codes.shape)


def _convert_galore_torch_state(saved: dict, where: str) -> dict:
    saved = {**{k: v for k, v in saved.items() if k != _BNB_NESTED_KEY}, **saved.get(_BNB_NESTED_KEY, {})}
    saved = {k: v for k, v in saved.items() if k not in _BNB_UNUSED_KEYS}
    unknown = sorted(set(saved) - _GALORE_TORCH_STATE_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown galore-torch/bitsandbytes state key(s) {unknown}")
    state = {"step": int(saved["step"])}
    if "state1" in saved:
        if saved["state1"].dtype == torch.uint8:
            moments = {
                "exp_avg": _bnb_dequantize(saved["state1"], saved["absmax1"], saved["qmap1"]),
                "exp_avg_sq": _bnb_dequantize(saved["state2"], saved["absmax2"], saved["qmap2"]),
            }
        else:  # bitsandbytes' 32-bit state, for tensors under min_8bit_size
            moments = {"exp_avg": saved["state1"].float(), "exp_avg_sq": saved["state2"].float()}
    else:
        moments = {"exp_avg": saved["exp_avg"].float(), "exp_avg_sq": saved["exp_avg_sq"].float()}
    quantized = "state1" in saved and saved["state1"].dtype == torch.uint8
    side = None
    if "projector" in saved:
        fields = _projector_fields(saved["projector"])
        ortho = fields["ortho_matrix"]
        side, _ = _galore_torch_side(fields["proj_type"], ortho, tuple(moments["exp_avg"].shape))
        if side == "full":
            state["proj_left"], state["proj_right"] = ortho[0].float().clone(), ortho[1].float().clone()
        else:
            state["proj_left" if side == "left" else "proj_right"] = ortho.float().clone()
    for name, signed in _MOMENTS:
        if quantized:
            values = moments[name] if side is None else quant.to_lowrank_layout(moments[name], side)
            state[f"{name}_codes"], state[f"{name}_absmax"] = quant.quantize_blockwise(values, signed=signed)
        else:
            state[name] = moments[name].clone()
    state["nonfinite_skips"] = torch.zeros((), dtype=torch.int64, device=moments["exp_avg"].device)
    return state


def convert_galore_torch_state_dict(state_dict: dict, *, svd: str = "exact") -> dict:
    """A galore-torch 1.0 optimizer ``state_dict()`` -> one for our class of the same kind.

    ``GaLoreAdamW`` states (fp32 or 16-bit moments, a ``GaLoreProjector``) become
    ``GaLoreAdamW`` states; ``GaLoreAdamW8bit`` states (bitsandbytes' ``state1``/``state2``
    with their absmax and maps) become ``GaLoreAdamW8bit`` states: dequantized to fp32
    moments shaped like the low-rank gradient, then quantized in our layout (not
    bit-identical: our blocks follow our layout, so each value is re-rounded once).
    Projectors become ``proj_left``/``proj_right`` (fp32 here; ``load_state_dict`` stores a
    16-bit parameter's in its dtype); the step count is kept, so the
    refresh schedule continues where it was. ``svd`` is set on every group: "exact"
    (galore-torch's ``torch.linalg.svd``) keeps refreshing as galore-torch did.

    A galore-torch checkpoint pickles ``GaLoreProjector`` objects; load it without
    running arbitrary code with::

        from galore_torch.galore_projector import GaLoreProjector
        with torch.serialization.safe_globals([GaLoreProjector]):
            saved = torch.load(path, weights_only=True)
        optimizer.load_state_dict(gk.convert_galore_torch_state_dict(saved))
    """
    if not isinstance(state_dict, dict) or set(state_dict) != {"state", "param_groups"}:
        raise ValueError("expected an optimizer state_dict with exactly the keys 'state' and 'param_groups'")
    groups = [
        dict({key: value for key, value in group.items() if key not in _BNB_GROUP_KEYS}, svd=group.get("svd", svd))
        for group in state_dict["param_groups"]
    ]
    state = {
        param_id: _convert_galore_torch_state(saved, f"galore-torch state {param_id}")
        for param_id, saved in state_dict["state"].items()
    }
    return {"state": state, "param_groups": groups}
