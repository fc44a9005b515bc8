"""galore-kernels: fast GaLore optimizers (fused Triton steps, randomized-SVD projector refresh).

Public API:
    GaLoreAdamW, GaLoreAdamW8bit  drop-in replacements for galore-torch's optimizers
    NaturalGaLoreAdamW, NaturalGaLoreAdamW8bit
                                  Natural GaLore: AdamW on the damped natural gradient of the low-rank gradient
    randomized_svd                truncated SVD by a warm-startable randomized range finder
"""

from .optim import GaLoreAdamW, GaLoreAdamW8bit, NaturalGaLoreAdamW, NaturalGaLoreAdamW8bit
from .svd import randomized_svd
from .version import __version__

__all__ = ["GaLoreAdamW", "GaLoreAdamW8bit", "NaturalGaLoreAdamW", "NaturalGaLoreAdamW8bit", "randomized_svd", "__version__"]
