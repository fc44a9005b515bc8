"""Hugging Face ``Trainer`` helper: our GaLore optimizers with every TrainingArguments field honoured.

transformers' own GaLore integration drops ``weight_decay``, the Adam betas and
eps, refuses gradient accumulation in layerwise mode, and its layerwise mode saves
no optimizer state. Here, either let the Trainer build everything::

    args = TrainingArguments(..., optim="galore_adamw_8bit_layerwise",
                             optim_args="rank=64, update_proj_gap=100, scale=0.10",
                             optim_target_modules=["attn", "mlp"])
    trainer = GaLoreTrainer(model=model, args=args, train_dataset=...)

or build them yourself::

    optimizer, scheduler = create_galore_optimizer_and_scheduler(model, args, num_training_steps)
    trainer = GaLoreTrainer(model=model, args=args, optimizers=(optimizer, scheduler), ...)

Taken from ``args``: ``optim`` (transformers' GaLore names, see ``OPTIMIZERS``; a
``_layerwise`` suffix means ``layerwise=True``; ``galore_adafactor`` as transformers builds it:
``lr=learning_rate``, ``relative_step=False``, ``scale_parameter=False``), ``optim_args`` (parsed as
transformers does: ``rank``, ``update_proj_gap``, ``scale``, ``proj_type``; other keys
are refused), ``learning_rate``, ``weight_decay`` (not applied to 1-D parameters:
biases and norms), ``adam_beta1``/``adam_beta2``, ``adam_epsilon``,
``optim_target_modules`` (a regex, a list of names/substrings/regexes, or
``"all-linear"``; the same matching as transformers), ``lr_scheduler_type`` and the
warm-up fields. In layerwise mode ``gradient_accumulation_steps`` and
``max_grad_norm`` move into the optimizer, because the gradients are gone by the
time Trainer would use them; Trainer's own clipping then sees no gradient and is a
no-op, so ``GaLoreTrainer`` logs the optimizer's own ``grad_norm`` instead of 0, and
the projector refresh time (``galore_refresh_seconds``, since the previous log).
Checkpoints go through ``state_dict``/``load_state_dict`` as for any optimizer.

Multi-process runs: ``layerwise=False`` works under DDP. With FSDP2 both modes work when
transformers shards the model (``from_pretrained(..., distributed_config=DistributedConfig(fsdp_size=N))``):
the Trainer then skips DDP and defers FSDP2's reduce-scatter to the last micro-batch of each
accumulation window, so layerwise mode's hooks fire once per window (its ``accumulation_steps``
stays 1). Layerwise mode on DDP parameters and accelerate's FSDP (``fsdp=...``) are refused.

transformers is an optional dependency (``pip install --no-build-isolation ".[hf]"``).
"""

from __future__ import annotations

import re

import torch

from ..optim import (
    LOMO, AdaLomo, GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, NaturalGaLoreAdamW, NaturalGaLoreAdamW8bit,
)
from ..optim.layerwise import TWO_PASS_ACCUMULATION_ERROR

try:
    import transformers
except ImportError as error:  # the module is the transformers integration: nothing here works without it
    raise ImportError(
        "galore_kernels.integrations.transformers needs transformers: pip install --no-build-isolation '.[hf]'"
    ) from error

OPTIMIZERS = {
    # transformers' optim name -> our class. "<name>_layerwise" is accepted for every row but LOMO's.
    "galore_adamw": GaLoreAdamW,
    "galore_adamw_8bit": GaLoreAdamW8bit,
    "galore_adafactor": GaLoreAdafactor,
    "natural_galore_adamw": NaturalGaLoreAdamW,
    "natural_galore_adamw_8bit": NaturalGaLoreAdamW8bit,
    # LOMO and AdaLomo update in backward by construction (transformers' "lomo"/"adalomo").
    "lomo": LOMO,
    "adalomo": AdaLomo,
}
FUSED_BACKWARD = (LOMO, AdaLomo)
LAYERWISE_SUFFIX = "_layerwise"
# optim_args keys, cast as transformers casts them, with transformers' defaults.
GALORE_OPTIM_ARGS = {"rank": (int, 128), "update_proj_gap": (int, 200), "scale": (float, 0.25), "proj_type": (str, "std")}


def resolve_optim(name: str, layerwise: bool | None = None):
    """``(optimizer class, layerwise)`` for a transformers optim name such as "galore_adamw_8bit_layerwise"."""
    name = str(getattr(name, "value", name))
    base = name[: -len(LAYERWISE_SUFFIX)] if name.endswith(LAYERWISE_SUFFIX) else name
    # LOMO and AdaLomo update in backward by construction: they have no "_layerwise" name.
    layerwise_names = [n + LAYERWISE_SUFFIX for n, cls in OPTIMIZERS.items() if cls not in FUSED_BACKWARD]
    if base not in OPTIMIZERS or (name != base and name not in layerwise_names):
        known = sorted([*OPTIMIZERS, *layerwise_names])
        raise ValueError(f"optim={name!r} is not available in galore-kernels; choose one of {known}")
    named_layerwise = name.endswith(LAYERWISE_SUFFIX)
    if layerwise is not None and layerwise != named_layerwise:
        raise ValueError(f"layerwise={layerwise} contradicts optim={name!r}; drop one of them")
    return OPTIMIZERS[base], named_layerwise


def parse_optim_args(optim_args: str | None) -> dict:
    """``TrainingArguments.optim_args`` as transformers parses it ("k=v, k=v"), cast like transformers.

    Only the GaLore keys of ``GALORE_OPTIM_ARGS`` are known; any other key is refused by name.
    """
    if not optim_args:
        return {}
    parsed = {}
    for mapping in optim_args.replace(" ", "").split(","):
        if mapping.count("=") != 1:
            raise ValueError(f"optim_args entry {mapping!r} is not key=value (optim_args={optim_args!r})")
        key, value = mapping.split("=")
        parsed[key] = value
    unknown = sorted(set(parsed) - set(GALORE_OPTIM_ARGS))
    if unknown:
        raise ValueError(f"optim_args has key(s) {unknown} that GaLore does not take; known: {sorted(GALORE_OPTIM_ARGS)}")
    try:
        return {key: GALORE_OPTIM_ARGS[key][0](value) for key, value in parsed.items()}
    except ValueError as error:
        raise ValueError(f"optim_args={optim_args!r}: {error}") from error


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


def _rank_of(name: str, rank, default: int) -> int:
    """``rank`` is an int, or a dict from a regex (searched in the parameter name) to a rank; first match wins."""
    if not isinstance(rank, dict):
        return rank
    for pattern, value in rank.items():
        if re.search(pattern, name):
            return value
    return default


def create_galore_optimizer(
    model: torch.nn.Module,
    args,
    *,
    optim: str | None = None,
    rank: int | dict[str, int] | None = None,
    update_proj_gap: int | None = None,
    scale: float | None = None,
    proj_type: str | None = None,
    layerwise: bool | None = None,
    **optimizer_kwargs,
):
    """Our GaLore optimizer for ``model`` from its ``TrainingArguments``.

    optim: a name of ``OPTIMIZERS``, optionally with "_layerwise"; default ``args.optim``
    when it is one of them, else "galore_adamw_8bit". rank, update_proj_gap, scale,
    proj_type: the GaLore group keys; each defaults to ``args.optim_args``, then to
    transformers' defaults (128, 200, 0.25, "std"). ``rank`` may be a dict from a regex
    (searched in the parameter name, first match wins) to a rank; targets no pattern
    matches take the default rank. layerwise: update in backward (accumulation and
    clipping are then done by the optimizer); default from the name.
    optimizer_kwargs: passed to the optimizer (backend, svd, seed, stagger, ...; for
    Natural GaLore also natural_history, damping, history_dtype, history_on_refresh).
    """
    if optim is None:
        configured = str(getattr(args.optim, "value", args.optim))
        optim = configured if configured.removesuffix(LAYERWISE_SUFFIX) in OPTIMIZERS else "galore_adamw_8bit"
        if layerwise is not None and optim.endswith(LAYERWISE_SUFFIX) != layerwise:
            optim = optim.removesuffix(LAYERWISE_SUFFIX) + (LAYERWISE_SUFFIX if layerwise else "")
    cls, layerwise = resolve_optim(optim, layerwise)
    if cls in FUSED_BACKWARD:
        return _create_lomo_optimizer(cls, model, args, **optimizer_kwargs)
    from_args = parse_optim_args(args.optim_args)
    keys = {key: default for key, (_, default) in GALORE_OPTIM_ARGS.items()}
    keys.update(from_args)
    explicit = dict(rank=rank, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type)
    keys.update({key: value for key, value in explicit.items() if value is not None})
    default_rank = from_args.get("rank", GALORE_OPTIM_ARGS["rank"][1]) if isinstance(keys["rank"], dict) else keys["rank"]
    if layerwise and args.fp16:
        if optimizer_kwargs.get("clip_strategy", "hold") != "two_pass":
            # GradScaler's unscale_ and inf check would see no gradients: the scale would
            # grow without bound and the hooks would step on scaled gradients.
            raise ValueError(
                "layerwise=True supports fp16 only with clip_strategy='two_pass' (the optimizer's own loss "
                "scaling, which GaLoreTrainer runs); or use bf16, or layerwise=False"
            )
        optimizer_kwargs.setdefault("loss_scaling", True)
    if layerwise and optimizer_kwargs.get("clip_strategy") == "two_pass" and args.gradient_accumulation_steps > 1:
        raise ValueError(TWO_PASS_ACCUMULATION_ERROR)
    if args.fsdp:
        raise ValueError(
            f"TrainingArguments fsdp={args.fsdp!r} (accelerate's FSDP) is not supported: FSDP1 flattens the matrices "
            "GaLore projects, and accelerate's FSDP2 swaps the optimizer's parameters for their shards after the "
            "optimizer is built. Shard the model with FSDP2 through transformers instead: from_pretrained(..., "
            "distributed_config=DistributedConfig(fsdp_size=N)), and leave fsdp unset"
        )
    sharded = args.world_size > 1 and _is_fsdp2_sharded(model)
    if layerwise and args.world_size > 1 and not sharded:
        # The hooks fire before DDP's all-reduce: each rank would step on its own gradients.
        raise ValueError(
            "layerwise=True in a multi-process run needs a model sharded with FSDP2 (from_pretrained(..., "
            "distributed_config=DistributedConfig(fsdp_size=N))): under DDP the hooks would update each rank "
            "from its own gradient. Use layerwise=False with DDP."
        )
    targets = set(galore_target_parameters(model, args.optim_target_modules))
    galore_by_rank: dict[int, list] = {}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name in targets:
            galore_by_rank.setdefault(_rank_of(name, keys["rank"], default_rank), []).append((name, param))
        elif param.dim() >= 2:
            decay.append((name, param))
        else:
            no_decay.append((name, param))
    galore_keys = {key: keys[key] for key in ("update_proj_gap", "scale", "proj_type")}
    groups = [
        {"params": params, "weight_decay": args.weight_decay, "rank": group_rank, **galore_keys}
        for group_rank, params in galore_by_rank.items()
    ]
    groups += [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if layerwise:
        # On FSDP2 the Trainer accumulates FSDP2's way (no reduce-scatter until a window's last
        # micro-batch), so the hooks fire once per window.
        optimizer_kwargs.setdefault("accumulation_steps", 1 if sharded else args.gradient_accumulation_steps)
        if args.max_grad_norm:
            optimizer_kwargs.setdefault("max_grad_norm", args.max_grad_norm)
    if cls is GaLoreAdafactor:
        # transformers' galore_adafactor: the Trainer's lr instead of Adafactor's relative step
        # and parameter scale; the Adam fields do not apply.
        hyperparameters = dict(lr=args.learning_rate, relative_step=False, scale_parameter=False)
    else:
        hyperparameters = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    optimizer = cls(
        [g for g in groups if g["params"]],
        weight_decay=args.weight_decay,
        layerwise=layerwise,
        **{**hyperparameters, **optimizer_kwargs},
    )
    # Trainer's own norm sees no gradient in layerwise mode; the optimizer's replaces it in the logs.
    optimizer.track_grad_norm = layerwise
    return optimizer


def _is_fsdp2_sharded(model: torch.nn.Module) -> bool:
    """Whether every trainable parameter is an FSDP2 (DTensor) shard."""
    from ..distributed import is_sharded

    trainable = [p for p in model.parameters() if p.requires_grad]
    return bool(trainable) and all(is_sharded(p) for p in trainable)


def _create_lomo_optimizer(cls, model, args, **optimizer_kwargs):
    """LOMO/AdaLomo from ``args``: learning_rate, weight_decay, max_grad_norm (their clip_grad_norm), fp16."""
    if args.gradient_accumulation_steps > 1:
        raise ValueError(f"{cls.__name__} updates in every backward and frees the gradient at once (as lomo-optim): "
                         "gradient_accumulation_steps must be 1")
    if args.world_size > 1:
        raise ValueError(f"{cls.__name__} is single-process only here: its hooks fire before DDP's all-reduce")
    optimizer_kwargs.setdefault("clip_grad_norm", args.max_grad_norm or None)
    optimizer = cls(model, lr=args.learning_rate, weight_decay=args.weight_decay, **optimizer_kwargs)
    # Under fp16 autocast the loss is fp32, but the gradients through fp16 activations still need scaling.
    optimizer.loss_scaling = bool(args.fp16)
    return optimizer


def _runs_two_passes(optimizer) -> bool:
    return isinstance(optimizer, FUSED_BACKWARD) or getattr(optimizer, "clip_strategy", None) == "two_pass"


def create_galore_optimizer_and_scheduler(model: torch.nn.Module, args, num_training_steps: int | None = None, **kwargs):
    """``(optimizer, lr_scheduler)`` for ``Trainer(optimizers=...)``; ``kwargs`` as ``create_galore_optimizer``.

    num_training_steps: default ``args.max_steps``; when that is not set, pass it, or use
    ``GaLoreTrainer``, which builds both with the Trainer's own count.
    """
    if num_training_steps is None:
        if args.max_steps is None or args.max_steps <= 0:
            raise ValueError(
                "num_training_steps is needed when args.max_steps is not set; or use GaLoreTrainer, "
                "which takes it from the Trainer"
            )
        num_training_steps = args.max_steps
    optimizer = create_galore_optimizer(model, args, **kwargs)
    scheduler = transformers.get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=args.get_warmup_steps(num_training_steps),
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs,
    )
    return optimizer, scheduler


class GaLoreTrainer(transformers.Trainer):
    """``Trainer`` that builds our GaLore optimizer from ``args`` (``optim``, ``optim_args``, ...).

    The scheduler is the Trainer's own, so ``num_training_steps`` comes from the Trainer.
    ``galore_options`` go to ``create_galore_optimizer`` (e.g. ``rank={"mlp": 64}``,
    ``backend="torch"``). ``optimizers=(optimizer, scheduler)`` is honoured as by Trainer.
    Logs the optimizer's global gradient norm in layerwise mode (Trainer's own is 0 there),
    and ``galore_refresh_seconds``: projector refresh time since the previous log.
    """

    def __init__(self, *args, galore_options: dict | None = None, **kwargs):
        self.galore_options = dict(galore_options or {})
        self._refresh_seconds_logged = 0.0
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = create_galore_optimizer(self.model if model is None else model, self.args, **self.galore_options)
        return self.optimizer

    def _galore_optimizer(self):
        optimizer = self.optimizer
        while optimizer is not None and not isinstance(optimizer, tuple(OPTIMIZERS.values())):
            optimizer = getattr(optimizer, "optimizer", None)  # accelerate wraps it
        return optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Trainer's step, except that two-pass optimizers (LOMO, AdaLomo, ``clip_strategy="two_pass"``)
        run ``grad_norm(loss)`` and ``fused_backward(loss)`` instead of one backward (and their own
        fp16 loss scaling instead of the GradScaler's, which then sees no gradient and never steps in)."""
        optimizer = self._galore_optimizer()
        if optimizer is None or not _runs_two_passes(optimizer):
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        if self.args.n_gpu > 1:
            loss = loss.mean()
        optimizer.grad_norm(loss)
        optimizer.fused_backward(loss)
        return loss.detach()

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        optimizer = self._galore_optimizer()
        if optimizer is not None and "loss" in logs:
            last_norm = getattr(optimizer, "last_grad_norm", None)
            if (isinstance(optimizer, FUSED_BACKWARD) or optimizer.layerwise) and last_norm is not None:
                logs["grad_norm"] = last_norm.item()
            refresh_seconds = getattr(optimizer, "refresh_seconds", 0.0)
            logs["galore_refresh_seconds"] = refresh_seconds - self._refresh_seconds_logged
            self._refresh_seconds_logged = refresh_seconds
        super().log(logs, *args, **kwargs)
