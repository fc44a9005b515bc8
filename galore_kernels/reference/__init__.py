"""Pure-PyTorch reference of every kernel: the oracle in tests and the ``backend="torch"`` path.

Each module mirrors one in ``galore_kernels/kernels/`` and exposes the same step
function with the same signature.
"""

from .adamw8bit import adamw8bit_step
from .galore_adamw import galore_adamw_step, project
from .galore_adamw8bit import galore_adamw8bit_step
from .natural_galore import natural_gradient

__all__ = ["adamw8bit_step", "galore_adamw_step", "galore_adamw8bit_step", "natural_gradient", "project"]
