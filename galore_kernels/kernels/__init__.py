"""Triton kernels, one family per module; each launcher mirrors ``galore_kernels.reference``.

``adamw8bit_step``, ``galore_adamw_step``, ``galore_adamw8bit_step``, ``galore_adafactor_step``,
``lomo_step`` and ``adalomo_step`` have exactly the signatures and in-place semantics of
the reference functions of the same names; so do ``multi_tensor_adamw_step`` and
``multi_tensor_adamw8bit_step`` (many small plain steps in one launch),
``grouped_galore_adamw_step`` and ``grouped_galore_adamw8bit_step`` (the steps of many
same-shape GaLore matrices in three launches), and
``natural_galore_adamw_step`` and ``natural_galore_adamw8bit_step`` (ñ formed inside
the Adam kernels; ``reference.natural_gradient`` is the transform's contract);
``project`` is ``reference.project``, the low-rank gradient alone. The Adam launchers also
take ``device_scalars`` (``_launch.DeviceScalars``), which the reference has no use for: the
per-step scalars read from device memory, for ``capturable=True`` (``optim/capturable.py``).
"""

from .adamw8bit import adamw8bit_step
from .galore_adafactor import galore_adafactor_step
from .galore_adamw import galore_adamw_step
from .galore_adamw8bit import galore_adamw8bit_step
# The optimizer looks GroupedTable up here, as MultiTensorTable, to cache the grouped launches' address table.
from .grouped_steps import GroupedTable, grouped_galore_adamw8bit_step, grouped_galore_adamw_step  # noqa: F401
from .lomo import adalomo_step, lomo_step
# The optimizer looks MultiTensorTable up here (the reference backend has none) to cache address tables.
from .multi_tensor import MultiTensorTable, multi_tensor_adamw8bit_step, multi_tensor_adamw_step  # noqa: F401
from .lowrank_matmul import project_gradient as project
from .natural_galore_adamw import natural_galore_adamw8bit_step, natural_galore_adamw_step

__all__ = [
    "adalomo_step", "adamw8bit_step", "galore_adafactor_step", "galore_adamw_step", "galore_adamw8bit_step",
    "grouped_galore_adamw8bit_step", "grouped_galore_adamw_step", "lomo_step", "multi_tensor_adamw8bit_step",
    "multi_tensor_adamw_step", "natural_galore_adamw8bit_step", "natural_galore_adamw_step", "project",
]
