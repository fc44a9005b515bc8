"""galore-kernels: fast GaLore optimizers (fused Triton steps, randomized-SVD projector refresh).

Public API:
    GaLoreAdamW, GaLoreAdamW8bit, GaLoreAdafactor
                                  drop-in replacements for galore-torch's optimizers
    randomized_svd                truncated SVD by a warm-startable randomized range finder
"""

from .optim import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit
from .svd import randomized_svd
from .version import __version__

__all__ = ["GaLoreAdafactor", "GaLoreAdamW", "GaLoreAdamW8bit", "randomized_svd", "__version__"]
