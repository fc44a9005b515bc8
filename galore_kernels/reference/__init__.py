"""Pure-PyTorch reference of every kernel: the oracle in tests and the ``backend="torch"`` path.

Each module mirrors one in ``galore_kernels/kernels/`` and exposes the same step
function with the same signature.
"""

from .adamw8bit import adamw8bit_step
from .galore_adafactor import galore_adafactor_step
from .galore_adamw import galore_adamw_step, project
from .galore_adamw8bit import galore_adamw8bit_step
from .grouped_steps import grouped_galore_adamw8bit_step, grouped_galore_adamw_step
from .lomo import adalomo_step, lomo_step
from .multi_tensor import multi_tensor_adamw8bit_step, multi_tensor_adamw_step
from .natural_galore import natural_gradient
from .natural_galore_adamw import natural_galore_adamw8bit_step, natural_galore_adamw_step

__all__ = [
    "adalomo_step", "adamw8bit_step", "galore_adafactor_step", "galore_adamw_step", "galore_adamw8bit_step",
    "grouped_galore_adamw8bit_step", "grouped_galore_adamw_step", "lomo_step", "multi_tensor_adamw8bit_step",
    "multi_tensor_adamw_step", "natural_galore_adamw8bit_step", "natural_galore_adamw_step", "natural_gradient",
    "project",
]
