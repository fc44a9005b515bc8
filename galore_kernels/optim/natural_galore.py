"""``NaturalGaLoreAdamW`` and ``NaturalGaLoreAdamW8bit``: GaLore with Natural GaLore's natural gradient.

Thin subclasses of the GaLore classes (arXiv 2410.16029; the math is in
``reference/natural_galore.py``). Per GaLore parameter and step, the projected gradient g
enters a history of the last ``natural_history`` projected gradients and is replaced by
ñ = (λI + F Fᵀ)⁻¹ g in the AdamW step, which then runs exactly as GaLore's does
(``reference/natural_galore_adamw.py``; the Triton backend forms ñ inside the Adam
kernel): same bias correction, scale, weight decay, 8-bit moments,
non-finite skip rule, layerwise mode, accumulation and clipping. With ``max_grad_norm``
the clipped g is what enters the history. Parameters outside GaLore groups (and 1-D
parameters in them) take plain AdamW, as in the authors' code.

State added per GaLore parameter (tensors only, so ``weights_only`` checkpoints load):
``grad_history`` (s, *low-rank shape) in ``history_dtype``, ``history_gram`` (s, s) fp64
and ``history_count`` (int64 0-d). Memory: s·k·bytes(history_dtype) + 8·s² bytes for a
k-value low-rank gradient, on top of GaLore's.
"""

from __future__ import annotations

import math

import torch

from ..projector import low_rank_shape, projection_side
from ..reference.natural_galore import HISTORY_DTYPES, HISTORY_ON_REFRESH, new_history, on_refresh
from .galore_adamw import GaLoreAdamW, GaLoreAdamW8bit, _backend_module

NATURAL_KEYS = ("natural_history", "damping", "history_dtype", "history_on_refresh")


def _check_natural_settings(settings: dict) -> None:
    size, damping = settings["natural_history"], settings["damping"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"natural_history must be an int >= 1, got {size!r}")
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not (math.isfinite(damping) and damping > 0):
        raise ValueError(f"damping must be a finite number > 0, got {damping!r}")
    if settings["history_dtype"] not in HISTORY_DTYPES:
        raise ValueError(f"history_dtype must be one of {HISTORY_DTYPES}, got {settings['history_dtype']!r}")
    if settings["history_on_refresh"] not in HISTORY_ON_REFRESH:
        raise ValueError(f"history_on_refresh must be one of {HISTORY_ON_REFRESH}, got {settings['history_on_refresh']!r}")


class _NaturalGradient:
    """Mixin over a GaLore class: the history state, the refresh policy, ñ in place of g."""

    supports_capturable = False  # its step functions read no device scalars yet

    def _set_natural_defaults(self, natural_history, damping, history_dtype, history_on_refresh) -> None:
        # Kept out of ``self.defaults``: torch would copy them into plain groups, which take no history.
        self.natural_defaults = dict(
            natural_history=natural_history, damping=damping,
            history_dtype=history_dtype, history_on_refresh=history_on_refresh,
        )
        _check_natural_settings(self.natural_defaults)

    def add_param_group(self, param_group: dict) -> None:
        """As the GaLore class; a GaLore group may override ``NATURAL_KEYS``, a plain group may not."""
        if "rank" in param_group:
            for key, value in self.natural_defaults.items():
                param_group.setdefault(key, value)
            _check_natural_settings(param_group)
        else:
            given = [key for key in NATURAL_KEYS if key in param_group]
            if given:
                raise ValueError(
                    f"{given} set on a param group without 'rank': only GaLore groups keep a gradient "
                    "history (plain groups take AdamW)"
                )
        super().add_param_group(param_group)

    def _fresh_state(self, group, p):
        # The history is made with the state, not with the moments: moments_on_refresh="reset"
        # re-creates the moments and must leave the history to history_on_refresh.
        state = super()._fresh_state(group, p)
        rank = self._galore_rank(group, p)
        if rank is not None:
            matrix_shape = (p.shape[0], math.prod(p.shape[1:]))
            shape = low_rank_shape(matrix_shape, projection_side(group["proj_type"], matrix_shape), rank)
            state.update(new_history(shape, group["natural_history"], group["history_dtype"], p.device))
        return state

    def _maybe_refresh(self, group, p, state, grad, projectors=None):
        old = (state.get("proj_left"), state.get("proj_right"))
        super()._maybe_refresh(group, p, state, grad, projectors=projectors)
        new = (state.get("proj_left"), state.get("proj_right"))
        # The first projector has no predecessor, and a failed refresh keeps the old one.
        if "grad_history" not in state or all(a is None for a in old) or all(a is b for a, b in zip(old, new)):
            return
        on_refresh(
            group["history_on_refresh"], state["grad_history"], state["history_gram"], state["history_count"],
            old_projectors=old, new_projectors=new,
        )

    def _run_step(self, group, p, state, grad, grad_is_projected):
        if "grad_history" not in state:
            super()._run_step(group, p, state, grad, grad_is_projected)
            return
        beta1, beta2 = group["betas"]
        target, grad, projection = self._step_operands(p, state, grad, grad_is_projected)
        # The backend's natural step forms ñ and runs the parent's AdamW on it (fused in the kernels).
        self._natural_step(
            _backend_module(self.backend, p), group, state, target, grad,
            (state["grad_history"], state["history_gram"], state["history_count"]), **projection,
            damping=group["damping"], lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"], step=self._bias_step(state), scale=group.get("scale", 1.0),
            grad_is_projected=grad_is_projected, matmul_precision=group["matmul_precision"],
            **self._flag_args(state, p),
        )


class NaturalGaLoreAdamW(_NaturalGradient, GaLoreAdamW):
    """Natural GaLore with fp32 moments: ``GaLoreAdamW`` fed the damped natural gradient.

    Same constructor, group keys and options as ``GaLoreAdamW``, plus (keyword-only; a
    GaLore group may override each, a plain group may set none):
        natural_history: s >= 1, projected gradients kept (current one included).
        damping: λ > 0 in ñ = (λI + F Fᵀ)⁻¹ g; 1e-3 as the authors, not scaled by s.
        history_dtype: torch.float32 (default) or torch.bfloat16 (half the memory).
        history_on_refresh: "keep" (default, the authors': old vectors stay in the old
            basis), "reset" (empty the history) or "rotate" (map it into the new basis).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        no_deprecation_warning: bool = False,
        *,
        natural_history: int = 20,
        damping: float = 1e-3,
        history_dtype: torch.dtype = torch.float32,
        history_on_refresh: str = "keep",
        **options,
    ):
        self._set_natural_defaults(natural_history, damping, history_dtype, history_on_refresh)
        super().__init__(params, lr, betas, eps, weight_decay, correct_bias, no_deprecation_warning, **options)

    def _natural_step(self, backend, group, state, param, grad, history, **hyper):
        backend.natural_galore_adamw_step(
            param, grad, state["exp_avg"], state["exp_avg_sq"], state["nonfinite_skips"], *history,
            correct_bias=group["correct_bias"], **hyper,
        )


class NaturalGaLoreAdamW8bit(_NaturalGradient, GaLoreAdamW8bit):
    """Natural GaLore with blockwise 8-bit moments: ``GaLoreAdamW8bit`` fed the natural gradient.

    Same constructor and options as ``GaLoreAdamW8bit``, plus those of ``NaturalGaLoreAdamW``.
    The history is not quantized (``history_dtype`` fp32 or bf16).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *args,
        natural_history: int = 20,
        damping: float = 1e-3,
        history_dtype: torch.dtype = torch.float32,
        history_on_refresh: str = "keep",
        **options,
    ):
        self._set_natural_defaults(natural_history, damping, history_dtype, history_on_refresh)
        super().__init__(params, lr, betas, eps, weight_decay, *args, **options)

    def _natural_step(self, backend, group, state, param, grad, history, **hyper):
        if "exp_avg" in state:  # under min_8bit_size: bitsandbytes' 32-bit Adam, as GaLoreAdamW8bit
            backend.natural_galore_adamw_step(
                param, grad, state["exp_avg"], state["exp_avg_sq"], state["nonfinite_skips"], *history,
                bnb_eps=True, **hyper,
            )
            return
        quantized = (state["exp_avg_codes"], state["exp_avg_absmax"], state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"])
        backend.natural_galore_adamw8bit_step(param, grad, *quantized, state["nonfinite_skips"], *history, **hyper)
