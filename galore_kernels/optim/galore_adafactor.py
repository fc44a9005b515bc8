"""``GaLoreAdafactor``: drop-in replacement for galore-torch's ``GaLoreAdafactor``.

galore-torch's class is transformers' Adafactor with the gradient projected. The
math lives in ``reference/galore_adafactor.py`` (and its kernel); this class holds
the groups, the state and the relative step size, on the shared GaLore machinery
(refresh schedule, layerwise mode, accumulation, clipping) of ``galore_adamw.py``.

Per-parameter state, fp32, shaped from the low-rank gradient R (the parameter
without a projector): ``exp_avg_sq_row``/``exp_avg_sq_col`` (R.dim() >= 2) or
``exp_avg_sq``, and ``exp_avg`` with ``beta1``; plus the shared keys of
``galore_adamw.py`` (``step``, projectors, ``nonfinite_skips``...).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch

from ..projector import ADAPTIVE_THRESHOLD
from . import guardrails
from . import refresh as moments_refresh
from .galore_adamw import _backend_module, _GaLoreOptimizer


def relative_step_size(group: dict, step: int) -> float:
    """transformers' ``Adafactor._get_lr`` before the parameter scale: the external lr,
    or min(1e-2 (1e-6·t with warmup_init), 1/sqrt(t)) with ``relative_step``."""
    if not group["relative_step"]:
        return group["lr"]
    min_step = 1e-6 * step if group["warmup_init"] else 1e-2
    return min(min_step, 1.0 / math.sqrt(step))


class GaLoreAdafactor(_GaLoreOptimizer):
    """Adafactor with GaLore gradient projection; drop-in for ``galore_torch.GaLoreAdafactor``.

    Arguments as transformers' Adafactor: ``lr`` (None with ``relative_step``),
    ``eps=(eps1, eps2)`` (added to the squared gradient; floor of the parameter
    RMS), ``clip_threshold`` (of the update's RMS), ``decay_rate`` (β2t = 1 − t^decay_rate),
    ``beta1`` (None: no first moment), ``weight_decay``, ``scale_parameter``,
    ``relative_step``, ``warmup_init``. GaLore groups as ``GaLoreAdamW``, whose
    keyword-only options apply too; with ``moments_on_refresh="rotate"`` the factored
    second moment is rotated as Adafactor's own estimate (``refresh.rotate_adafactor_state``).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
        *,
        backend: str = "auto",
        svd: str = "randomized",
        seed: int = 0,
        stagger: bool = False,
        layerwise: bool = False,
        accumulation_steps: int = 1,
        max_grad_norm: float | None = None,
        moments_on_refresh: str = "keep",
        refresh: str = "fixed",
        adaptive_threshold: float = ADAPTIVE_THRESHOLD,
        max_update_proj_gap: int | None = None,
        matmul_precision: str = "tf32x3",
    ):
        defaults = dict(
            lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate, beta1=beta1,
            weight_decay=weight_decay, scale_parameter=scale_parameter, relative_step=relative_step,
            warmup_init=warmup_init,
        )
        super().__init__(
            params, defaults, backend=backend, svd=svd, seed=seed, stagger=stagger,
            layerwise=layerwise, accumulation_steps=accumulation_steps, max_grad_norm=max_grad_norm,
            moments_on_refresh=moments_on_refresh, refresh=refresh, adaptive_threshold=adaptive_threshold,
            max_update_proj_gap=max_update_proj_gap, matmul_precision=matmul_precision,
        )

    HYPERPARAMETERS = ("lr", "eps", "clip_threshold", "decay_rate", "beta1", "weight_decay", "scale_parameter",
                       "relative_step", "warmup_init")

    @staticmethod
    def _check_hyperparameters(defaults: dict) -> None:
        """The constructor's arguments, and each param group with the defaults filled in."""
        lr, eps, beta1 = defaults["lr"], defaults["eps"], defaults["beta1"]
        relative_step = defaults["relative_step"]
        if lr is not None and relative_step:
            raise ValueError("Cannot combine manual `lr` and `relative_step=True` options")
        if defaults["warmup_init"] and not relative_step:
            raise ValueError("`warmup_init=True` requires `relative_step=True`")
        if lr is None and not relative_step:
            raise ValueError("lr=None needs relative_step=True (the relative step size replaces lr)")
        for name in ("lr", "beta1"):
            if defaults[name] is not None:
                guardrails.require_number(name, defaults[name])
        for name in ("clip_threshold", "decay_rate", "weight_decay"):
            guardrails.require_number(name, defaults[name])
        if lr is not None and not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate lr={lr}: must be >= 0 or None")
        # eps1 > 0: with 0, an exactly-zero gradient row gives rsqrt(0)·0 = NaN, spread over the parameter.
        if not (isinstance(eps, (tuple, list)) and len(eps) == 2
                and all(isinstance(e, numbers.Real) and not isinstance(e, bool) for e in eps)
                and eps[0] > 0 and eps[1] >= 0):
            raise ValueError(f"eps must be a pair (eps1, eps2) of numbers, eps1 > 0 and eps2 >= 0, got {eps!r}")
        if not defaults["clip_threshold"] > 0:
            raise ValueError(f"clip_threshold must be > 0, got {defaults['clip_threshold']!r}")
        if not defaults["decay_rate"] < 0:
            raise ValueError(f"decay_rate must be < 0 (β2t = 1 - t^decay_rate), got {defaults['decay_rate']!r}")
        if beta1 is not None and not 0.0 <= beta1 < 1.0:
            raise ValueError(f"beta1 must be in [0, 1) or None, got {beta1!r}")
        if not 0.0 <= defaults["weight_decay"]:
            raise ValueError(f"Invalid weight_decay={defaults['weight_decay']}: must be >= 0")

    def _init_moments(self, state, p, shape, side, group):
        zeros = dict(dtype=torch.float32, device=p.device)
        if group["beta1"] is not None:
            state["exp_avg"] = torch.zeros(shape, **zeros)
        if len(shape) >= 2:
            state["exp_avg_sq_row"] = torch.zeros(shape[:-1], **zeros)
            state["exp_avg_sq_col"] = torch.zeros(shape[:-2] + shape[-1:], **zeros)
        else:
            state["exp_avg_sq"] = torch.zeros(shape, **zeros)

    def _rotate_moments(self, state, side, left, right):
        moments_refresh.rotate_adafactor_state(state, left, right)

    def _run_step(self, group, p, state, grad, grad_is_projected):
        if not (p.is_contiguous() or self._is_projected(state)):
            # The plain kernel takes a contiguous parameter only: step a copy of a strided
            # one (a transposed view) and write it back, as the base class does for N-d ones.
            work = p.contiguous()
            self._run_step(group, work, state, grad, grad_is_projected)
            p.copy_(work)
            return
        target, grad, projection = self._step_operands(p, state, grad, grad_is_projected)
        _backend_module(self.backend, p).galore_adafactor_step(
            target, grad, state.get("exp_avg_sq_row"), state.get("exp_avg_sq_col"), state.get("exp_avg_sq"),
            state.get("exp_avg"), state["nonfinite_skips"], **projection,
            lr=relative_step_size(group, state["step"]), eps=tuple(group["eps"]),
            clip_threshold=group["clip_threshold"], decay_rate=group["decay_rate"], beta1=group["beta1"],
            weight_decay=group["weight_decay"], step=self._bias_step(state),
            scale_parameter=group["scale_parameter"], scale=group.get("scale", 1.0),
            grad_is_projected=grad_is_projected, matmul_precision=group["matmul_precision"],
        )
