"""Thin ``torch.optim.Optimizer`` classes: groups, state and dispatch to a backend."""

from .galore_adamw import GaLoreAdamW, GaLoreAdamW8bit
from .natural_galore import NaturalGaLoreAdamW, NaturalGaLoreAdamW8bit

__all__ = ["GaLoreAdamW", "GaLoreAdamW8bit", "NaturalGaLoreAdamW", "NaturalGaLoreAdamW8bit"]
