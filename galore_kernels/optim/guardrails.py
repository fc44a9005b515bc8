"""Refusals and warnings for the ways layerwise mode is easy to misuse.

Layerwise mode updates parameters from hooks inside backward, so mistakes that
an ordinary optimizer would make loud (a second optimizer, a GradScaler, a
``step()`` per micro-batch) would otherwise pass silently.
"""

from __future__ import annotations

import numbers
import weakref

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..projector import warn_once

# parameter -> the layerwise optimizer whose hook is registered on it. Weak on both
# sides: neither the parameter nor an optimizer is kept alive by this table.
_hook_owner: WeakIdKeyDictionary = WeakIdKeyDictionary()


def claim_layerwise_hooks(optimizer, params: list[torch.Tensor]) -> None:
    """Record ``optimizer`` as the owner of ``params``' layerwise hooks; refuse any already owned.

    Checked for every parameter before any is claimed, so a refused group leaves nothing behind.
    """
    for p in params:
        owner_ref = _hook_owner.get(p)
        owner = owner_ref() if owner_ref is not None else None
        if owner is not None and owner is not optimizer:
            raise ValueError(
                f"a parameter of shape {tuple(p.shape)} already has the layerwise hooks of another "
                f"{type(owner).__name__}, which would keep updating it while this one never does. "
                "Call remove_hooks() on the old optimizer before building a new one on the same model."
            )
    for p in params:
        _hook_owner[p] = weakref.ref(optimizer)


def release_layerwise_hooks(optimizer) -> None:
    """Forget ``optimizer``'s claims (its hooks were removed)."""
    for p in [p for p, owner_ref in _hook_owner.items() if owner_ref() is optimizer]:
        del _hook_owner[p]


def grad_scaler_error() -> ValueError:
    return ValueError(
        "layerwise=True cannot be used with torch.amp.GradScaler: the hooks consume each gradient "
        "during backward, before the scaler can unscale it or check it for inf/NaN. Train in bf16 "
        "(no loss scaling needed), or for fp16 use the optimizer's own loss scaling: clip_strategy='two_pass', "
        "loss_scaling=True, and optimizer.grad_norm(loss); optimizer.fused_backward(loss) instead of loss.backward()."
    )


def warn_windows_all_incomplete(accumulation_steps: int) -> None:
    warn_once(
        "layerwise-step-too-often",
        f"step() ended accumulation windows of which none had reached accumulation_steps={accumulation_steps} "
        "backward passes: called after every micro-batch, it turns accumulation off. In layerwise mode call "
        f"step() once per {accumulation_steps} backward passes (the end of an epoch may cut one window short).",
    )


def require_number(name: str, value) -> None:
    """Refuse a hyperparameter that is not a real number (None, a string, a bool), naming it,
    before a comparison with it fails with an error that does not."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")


def check_saved_groups(optimizer, state_dict: dict, keys) -> None:
    """Refuse a checkpoint whose param groups lack ``keys``, ``optimizer``'s hyperparameters: it was
    saved by another optimizer class, and the first step (or the state check) would fail on a KeyError."""
    for index, group in enumerate(state_dict["param_groups"]):
        missing = sorted(key for key in keys if key not in group)
        if missing:
            raise ValueError(
                f"param group {index} of the checkpoint lacks {missing}, hyperparameters of "
                f"{type(optimizer).__name__}: it was saved by another optimizer class"
            )
