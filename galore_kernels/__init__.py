"""galore-kernels: fast GaLore optimizers (fused Triton steps, randomized-SVD projector refresh).

Public API:
    GaLoreAdamW, GaLoreAdamW8bit  drop-in replacements for galore-torch's optimizers
    randomized_svd                truncated SVD by a warm-startable randomized range finder
"""

from .optim import GaLoreAdamW, GaLoreAdamW8bit
from .version import __version__


def randomized_svd(*args, **kwargs):
    """See ``galore_kernels.svd.randomized_svd`` (imported lazily: it loads the compiled extension)."""
    from .svd import randomized_svd as _randomized_svd

    return _randomized_svd(*args, **kwargs)


__all__ = ["GaLoreAdamW", "GaLoreAdamW8bit", "randomized_svd", "__version__"]
