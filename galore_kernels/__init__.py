"""galore-kernels: fast GaLore optimizers (fused Triton steps, randomized-SVD projector refresh).

Public API:
    GaLoreAdamW, GaLoreAdamW8bit, GaLoreAdafactor
                                     drop-in replacements for galore-torch's optimizers
    NaturalGaLoreAdamW, NaturalGaLoreAdamW8bit
                                     Natural GaLore: AdamW on the damped natural gradient of the low-rank gradient
    LOMO, AdaLomo                    drop-in replacements for lomo-optim's (updates fused into backward)
    convert_galore_torch_state_dict  a galore-torch 1.0 optimizer checkpoint -> ours
    randomized_svd                   truncated SVD by a warm-startable randomized range finder
"""

from .optim import (
    LOMO, AdaLomo, GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit, NaturalGaLoreAdamW, NaturalGaLoreAdamW8bit,
)
from .optim.checkpoint import convert_galore_torch_state_dict
from .svd import randomized_svd
from .version import __version__

__all__ = [
    "AdaLomo", "GaLoreAdafactor", "GaLoreAdamW", "GaLoreAdamW8bit", "LOMO", "NaturalGaLoreAdamW",
    "NaturalGaLoreAdamW8bit", "convert_galore_torch_state_dict", "randomized_svd", "__version__",
]
