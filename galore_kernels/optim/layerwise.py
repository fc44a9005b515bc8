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

import torch

CLIP_STRATEGIES = ("hold", "two_pass")


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
