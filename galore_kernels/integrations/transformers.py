"""Hugging Face ``Trainer`` helper: our GaLore optimizers with every TrainingArguments field honoured.

transformers' own GaLore integration drops ``weight_decay``, the Adam betas and
eps, refuses gradient accumulation in layerwise mode, and its layerwise mode saves
no optimizer state. Here::

    optimizer, scheduler = create_galore_optimizer_and_scheduler(model, args, num_training_steps)
    trainer = Trainer(model=model, args=args, optimizers=(optimizer, scheduler), ...)

Taken from ``args``: ``learning_rate``, ``weight_decay`` (not applied to 1-D
parameters: biases and norms), ``adam_beta1``/``adam_beta2``, ``adam_epsilon``,
``optim_target_modules`` (a regex, a list of names/substrings/regexes, or
``"all-linear"``; the same matching as transformers), ``lr_scheduler_type`` and the
warm-up fields. In layerwise mode ``gradient_accumulation_steps`` and
``max_grad_norm`` move into the optimizer, because the gradients are gone by the
time Trainer would use them; Trainer's own clipping then sees no gradient and is a
no-op. Checkpoints go through ``state_dict``/``load_state_dict`` as for any optimizer.

transformers is an optional dependency (``pip install galore-kernels[hf]``).
"""

from __future__ import annotations

import re

import torch

from ..optim import GaLoreAdamW, GaLoreAdamW8bit, NaturalGaLoreAdamW, NaturalGaLoreAdamW8bit

OPTIMIZERS = {
    "galore_adamw": GaLoreAdamW,
    "galore_adamw_8bit": GaLoreAdamW8bit,
    "natural_galore_adamw": NaturalGaLoreAdamW,
    "natural_galore_adamw_8bit": NaturalGaLoreAdamW8bit,
}


def _is_target(optim_target_modules, module_name: str) -> bool:
    """transformers' ``check_target_module_exists`` rule for one module name."""
    if isinstance(optim_target_modules, str):
        return bool(re.fullmatch(optim_target_modules, module_name))
    return (
        module_name in optim_target_modules
        or any(target in module_name for target in optim_target_modules)
        or any(re.fullmatch(target, module_name) for target in optim_target_modules)
    )


def galore_target_parameters(model: torch.nn.Module, optim_target_modules) -> list[str]:
    """Names of the ``nn.Linear`` weights that ``optim_target_modules`` selects for GaLore."""
    if optim_target_modules is None:
        raise ValueError("optim_target_modules is required: a regex, a list of module names, or 'all-linear'")
    if not isinstance(optim_target_modules, (str, list, tuple)):
        raise TypeError(f"optim_target_modules must be a str or a list of str, got {type(optim_target_modules).__name__}")
    all_linear = isinstance(optim_target_modules, str) and optim_target_modules.replace("_", "-") == "all-linear"
    names = [
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and (all_linear or _is_target(optim_target_modules, name))
    ]
    if not names:
        raise ValueError(f"no nn.Linear module matches optim_target_modules={optim_target_modules!r}")
    return names


def create_galore_optimizer_and_scheduler(
    model: torch.nn.Module,
    args,
    num_training_steps: int,
    *,
    optim: str = "galore_adamw_8bit",
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    layerwise: bool = False,
    **optimizer_kwargs,
):
    """Build ``(optimizer, lr_scheduler)`` for ``Trainer(optimizers=...)``.

    model: the model Trainer will train. args: its ``TrainingArguments``.
    optim: a key of ``OPTIMIZERS`` ("galore_adamw", "galore_adamw_8bit",
    "natural_galore_adamw", "natural_galore_adamw_8bit"). rank, update_proj_gap, scale,
    proj_type: the GaLore group keys (transformers' defaults). layerwise: update
    in backward (accumulation and clipping are then done by the optimizer).
    optimizer_kwargs: passed to the optimizer (backend, svd, seed, stagger, ...; for
    Natural GaLore also natural_history, damping, history_dtype, history_on_refresh).
    """
    from transformers import get_scheduler

    if optim not in OPTIMIZERS:
        raise ValueError(f"optim must be one of {tuple(OPTIMIZERS)}, got {optim!r}")
    if layerwise and args.fp16:
        # GradScaler's unscale_ and inf check would see no gradients: the scale would
        # grow without bound and the hooks would step on scaled gradients.
        raise ValueError("layerwise=True does not support fp16 loss scaling; use bf16 or layerwise=False")
    if layerwise and args.world_size > 1:
        # The hooks fire before DDP's all-reduce: each rank would step on its own gradients.
        raise ValueError("layerwise=True is single-process only; use layerwise=False with DDP")
    targets = set(galore_target_parameters(model, args.optim_target_modules))
    galore, decay, no_decay = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name in targets:
            galore.append(param)
        elif param.dim() >= 2:
            decay.append(param)
        else:
            no_decay.append(param)
    galore_keys = dict(rank=rank, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type)
    groups = [
        {"params": galore, "weight_decay": args.weight_decay, **galore_keys},
        {"params": decay, "weight_decay": args.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if layerwise:
        optimizer_kwargs.setdefault("accumulation_steps", args.gradient_accumulation_steps)
        if args.max_grad_norm:
            optimizer_kwargs.setdefault("max_grad_norm", args.max_grad_norm)
    optimizer = OPTIMIZERS[optim](
        [g for g in groups if g["params"]],
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        weight_decay=args.weight_decay,
        layerwise=layerwise,
        **optimizer_kwargs,
    )
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=args.get_warmup_steps(num_training_steps),
        num_training_steps=num_training_steps,
    )
    return optimizer, scheduler
