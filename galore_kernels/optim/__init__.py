"""Thin ``torch.optim.Optimizer`` classes: groups, state and dispatch to a backend."""

from .galore_adafactor import GaLoreAdafactor
from .galore_adamw import GaLoreAdamW, GaLoreAdamW8bit

__all__ = ["GaLoreAdafactor", "GaLoreAdamW", "GaLoreAdamW8bit"]
