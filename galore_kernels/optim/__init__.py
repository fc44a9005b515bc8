"""Thin ``torch.optim.Optimizer`` classes: groups, state and dispatch to a backend."""

from .galore_adafactor import GaLoreAdafactor
from .galore_adamw import GaLoreAdamW, GaLoreAdamW8bit
from .lomo import LOMO, AdaLomo
from .natural_galore import NaturalGaLoreAdamW, NaturalGaLoreAdamW8bit

__all__ = [
    "AdaLomo", "GaLoreAdafactor", "GaLoreAdamW", "GaLoreAdamW8bit", "LOMO", "NaturalGaLoreAdamW",
    "NaturalGaLoreAdamW8bit",
]
