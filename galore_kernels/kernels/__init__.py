"""Triton kernels, one family per module; each launcher mirrors ``galore_kernels.reference``.

``adamw8bit_step``, ``galore_adamw_step`` and ``galore_adamw8bit_step`` have exactly the
signatures and in-place semantics of the reference functions of the same names.
"""

from .adamw8bit import adamw8bit_step
from .galore_adamw import galore_adamw_step
from .galore_adamw8bit import galore_adamw8bit_step

__all__ = ["adamw8bit_step", "galore_adamw_step", "galore_adamw8bit_step"]
