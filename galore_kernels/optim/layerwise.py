"""Shared by every layerwise optimizer: fp16 dynamic loss scaling and the two-pass global clip.

Layerwise optimizers consume each gradient inside backward. Two things an ordinary
optimizer does after backward then need a first backward pass of their own, as LOMO
(arXiv 2306.09782) does it:

* the global gradient norm, for exact clipping by it (``clip_strategy="two_pass"``):
  the first pass only accumulates each gradient's squared norm and frees it, the
  second pass updates with the coefficient known;
* overflow detection under fp16 loss scaling: the first pass sees every gradient
  before any parameter changes, so an overflowing step is skipped exactly (no
  parameter or state changes) while the scale backs off.

The second pass recomputes the very same gradients (same graph, the parameters it
reads were saved by forward), so the first pass's verdict holds for it.
"""

from __future__ import annotations

import warnings

import torch

CLIP_STRATEGIES = ("hold", "two_pass")

TWO_PASS_ACCUMULATION_ERROR = (
    "clip_strategy='two_pass' needs accumulation_steps=1 (Trainer: gradient_accumulation_steps=1): its first "
    "backward takes the global norm of the gradient the second one updates with, and with accumulation that is "
    "the gradient summed over the window, whose norm exists only once every micro-batch's gradient has been held "
    "(a norm of a sum is not the sum of norms). clip_strategy='hold' holds them (in low rank for GaLore "
    "parameters); use it with accumulation, or a larger batch per step with two_pass."
)


class DynamicLossScaler:
    """lomo-optim's ``DynamicLossScaler`` (DeepSpeed's): halve on overflow, double after
    ``scale_window`` clean steps; ``delayed_shift`` overflows are tolerated first."""

    def __init__(self, init_scale: float = 2**32, scale_factor: float = 2.0, scale_window: int = 1000,
                 min_scale: float = 1, delayed_shift: int = 1, consecutive_hysteresis: bool = False,
                 raise_error_at_min_scale: bool = True, dtype: torch.dtype = torch.half):
        if not init_scale > 0 or not scale_factor > 1 or not min_scale > 0:
            raise ValueError(f"need init_scale > 0, scale_factor > 1, min_scale > 0; got {init_scale}, {scale_factor}, {min_scale}")
        if not (isinstance(scale_window, int) and scale_window >= 1 and isinstance(delayed_shift, int) and delayed_shift >= 1):
            raise ValueError(f"scale_window and delayed_shift must be ints >= 1, got {scale_window!r}, {delayed_shift!r}")
        self.cur_scale = float(init_scale)
        self.cur_iter = 0
        self.last_overflow_iter = -1
        self.scale_factor = float(scale_factor)
        self.scale_window = scale_window
        self.min_scale = float(min_scale)
        self.delayed_shift = delayed_shift
        self.cur_hysteresis = delayed_shift
        self.consecutive_hysteresis = bool(consecutive_hysteresis)
        self.raise_error_at_min_scale = bool(raise_error_at_min_scale)
        self.skipped_steps = 0

    @property
    def loss_scale(self) -> float:
        return self.cur_scale

    def update_scale(self, overflow: bool) -> None:
        """After a step: back off (the step was skipped) or count a clean step."""
        if overflow:
            self.skipped_steps += 1
            if self.delayed_shift == 1 or self.cur_hysteresis == 1:
                if self.cur_scale == self.min_scale and self.raise_error_at_min_scale:
                    raise RuntimeError("fp16 loss scale already at its minimum and the gradients still overflow")
                self.cur_scale = max(self.cur_scale / self.scale_factor, self.min_scale)
            else:
                self.cur_hysteresis -= 1
            self.last_overflow_iter = self.cur_iter
        else:
            if self.consecutive_hysteresis:
                self.cur_hysteresis = self.delayed_shift
            if (self.cur_iter - self.last_overflow_iter) % self.scale_window == 0:
                if not self.consecutive_hysteresis:
                    self.cur_hysteresis = self.delayed_shift
                self.cur_scale *= self.scale_factor
        self.cur_iter += 1

    _STATE = ("cur_scale", "cur_iter", "last_overflow_iter", "scale_factor", "scale_window", "min_scale",
              "delayed_shift", "cur_hysteresis", "consecutive_hysteresis", "raise_error_at_min_scale", "skipped_steps")

    def state_dict(self) -> dict:
        return {key: getattr(self, key) for key in self._STATE}

    def load_state_dict(self, state: dict) -> None:
        missing = sorted(set(self._STATE) - set(state))
        if missing:
            raise ValueError(f"loss scaler state is missing {missing}")
        for key in self._STATE:
            setattr(self, key, state[key])

    @classmethod
    def from_state_dict(cls, state: dict) -> DynamicLossScaler:
        scaler = cls()
        scaler.load_state_dict(state)
        return scaler


class NormPass:
    """The first backward pass: each gradient's squared norm, summed on the device (no sync per gradient)."""

    def __init__(self):
        self.grad_sq_sum: torch.Tensor | None = None

    def add(self, grad_fp32: torch.Tensor) -> None:
        grad_sq = torch.linalg.vector_norm(grad_fp32).square()
        self.grad_sq_sum = grad_sq if self.grad_sq_sum is None else self.grad_sq_sum + grad_sq.to(self.grad_sq_sum.device)

    def total_norm(self) -> torch.Tensor | None:
        return None if self.grad_sq_sum is None else self.grad_sq_sum.sqrt()


def clip_coefficient(total_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``min(max_norm / (norm + 1e-6), 1)``, torch's and lomo-optim's coefficient, on the device."""
    return torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)


def validate_clip_strategy(clip_strategy: str) -> None:
    if clip_strategy not in CLIP_STRATEGIES:
        raise ValueError(f"clip_strategy must be one of {CLIP_STRATEGIES}, got {clip_strategy!r}")


class TwoPassBackward:
    """``grad_norm(loss)`` then ``fused_backward(loss, lr)``: lomo-optim's protocol, for every layerwise optimizer.

    The optimizer's gradient hook asks ``pass_kind()`` what to do with a gradient:
    "norm" (the first pass: ``add_to_norm`` it and free it), "skip" (an overflow step:
    free it) or "update" (unscale by ``grad_multiplier``'s loss-scale part and clip by
    ``clip_coef``). The class provides ``_max_norm``/``_set_max_norm`` (its clip threshold).
    """

    def _init_two_pass(self, loss_scale_args: dict | None, loss_scaling: bool) -> None:
        self.loss_scale_args = dict(loss_scale_args or {})
        try:  # the scaler is made at the first fp16 backward: check its arguments now
            DynamicLossScaler(**self.loss_scale_args)
        except (TypeError, ValueError) as error:
            raise type(error)(f"loss_scale_args={self.loss_scale_args!r}: {error}") from error
        self.loss_scaling = bool(loss_scaling)
        self.loss_scaler: DynamicLossScaler | None = None
        # The clip coefficient of the step under way (a device tensor), from grad_norm.
        self.clip_coef: torch.Tensor | None = None
        self._norm_pass: NormPass | None = None
        self._skip_step = False

    def _max_norm(self) -> float | None:
        raise NotImplementedError

    def _set_max_norm(self, value: float) -> None:
        raise NotImplementedError

    def _check_two_pass_allowed(self) -> None:
        """Raise if this configuration cannot run the two passes (the GaLore classes check their mode)."""

    def _start_backward(self, loss: torch.Tensor) -> None:
        self._check_two_pass_allowed()
        if self.loss_scaler is None and (self.loss_scaling or loss.dtype == torch.float16):
            self.loss_scaler = DynamicLossScaler(**self.loss_scale_args)
            if self._max_norm() is None:
                self._set_max_norm(1.0)
                warnings.warn("fp16 loss scaling is used with a global norm clip: the clip threshold is set to 1.0 (as lomo-optim)")

    def _loss_scale(self) -> float:
        """What the loss is multiplied by before backward (and the gradients divided by)."""
        return 1.0 if self.loss_scaler is None else self.loss_scaler.loss_scale

    def pass_kind(self) -> str:
        if self._norm_pass is not None:
            return "norm"
        return "skip" if self._skip_step else "update"

    def add_to_norm(self, grad: torch.Tensor) -> None:
        self._norm_pass.add(grad.to(torch.float32) / self._loss_scale())

    def grad_norm(self, loss: torch.Tensor) -> None:
        """First backward pass: the global gradient norm (sets ``clip_coef``) and overflow; no update.

        The graph is retained for ``fused_backward``. Each gradient is freed as soon as
        its norm is taken. One host synchronization at the end, for the overflow verdict.
        """
        self._start_backward(loss)
        self._norm_pass = NormPass()
        try:
            (loss * self._loss_scale()).backward(retain_graph=True)
            total = self._norm_pass.total_norm()
        finally:
            self._norm_pass = None
        if total is None:
            raise ValueError("grad_norm: no parameter received a gradient")
        self._skip_step = not bool(torch.isfinite(total))
        max_norm = self._max_norm()
        self.clip_coef = None if self._skip_step or max_norm is None else clip_coefficient(total, max_norm)
        self._record_grad_norm(total)

    def _record_grad_norm(self, total: torch.Tensor) -> None:
        self.last_grad_norm = total

    def fused_backward(self, loss: torch.Tensor, lr: float | None = None) -> None:
        """Second backward pass: every parameter updated in its hook (none on an overflow step).

        lr: sets every group's lr first (lomo-optim's protocol); None keeps the groups'
        lr, as a scheduler set it.
        """
        self._start_backward(loss)
        if lr is not None:
            for group in self.param_groups:
                group["lr"] = lr
        if self._max_norm() is not None and self.clip_coef is None and not self._skip_step:
            raise ValueError(
                "a global norm clip is set (fp16 loss scaling sets it to 1.0), but clip_coef is None: "
                "call optimizer.grad_norm(loss) before optimizer.fused_backward(loss, lr) at every step."
            )
        try:
            (loss * self._loss_scale()).backward()
        finally:
            if self.loss_scaler is not None:
                self.loss_scaler.update_scale(overflow=self._skip_step)
            self._skip_step = False
            self.clip_coef = None

    def state_dict(self) -> dict:
        """The optimizer's state dict, plus ``loss_scaler`` (plain numbers) once fp16 scaling has started."""
        state = super().state_dict()
        if self.loss_scaler is not None:
            state["loss_scaler"] = self.loss_scaler.state_dict()
        return state

    def _take_loss_scaler_state(self, state_dict: dict) -> dict:
        """Restore the loss scaler from ``state_dict`` (none if it has none); return the rest."""
        state_dict = dict(state_dict)
        scaler_state = state_dict.pop("loss_scaler", None)
        self.loss_scaler = None if scaler_state is None else DynamicLossScaler.from_state_dict(scaler_state)
        if self.loss_scaler is not None and self._max_norm() is None:
            # The saved run clipped at 1.0 from its first fp16 backward (``_start_backward``), which
            # will not run that branch again now that the scaler exists.
            self._set_max_norm(1.0)
        return state_dict

    def grad_multiplier(self, device: torch.device) -> torch.Tensor | None:
        """What a gradient of the update pass is multiplied by: ``clip_coef / loss_scale`` (None: 1)."""
        if self.clip_coef is None and self.loss_scaler is None:
            return None
        coef = torch.ones((), dtype=torch.float32, device=device) if self.clip_coef is None else self.clip_coef.to(device)
        return coef / self._loss_scale()
