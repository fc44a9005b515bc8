"""Reference: galore-torch's ``GaLoreProjector``, same constructor, same methods.

It exists to pin our side rules and SVD call to galore-torch's in the parity tests
and for users porting code that drives a projector by hand. The optimizers do not
use it: they keep projectors as plain tensors (see ``galore_kernels/projector.py``).
Like galore-torch, the basis is cast back to the gradient's dtype.
"""

from __future__ import annotations

import torch

from ..projector import compute_projectors, projection_side, refresh_due
from .galore_adamw import project, project_back


class GaLoreProjector:
    """Projects gradients onto the top-``rank`` singular subspace, refreshed every ``update_proj_gap`` calls."""

    def __init__(self, rank, verbose=False, update_proj_gap=200, scale=1.0, proj_type="std"):
        self.rank = rank
        self.verbose = verbose
        self.update_proj_gap = update_proj_gap
        self.scale = scale
        self.proj_type = proj_type
        self.proj_left: torch.Tensor | None = None
        self.proj_right: torch.Tensor | None = None

    def project(self, full_rank_grad: torch.Tensor, iter: int) -> torch.Tensor:
        """The low-rank gradient; refreshes the basis when none exists or ``iter % gap == 0``."""
        side = projection_side(self.proj_type, tuple(full_rank_grad.shape))
        if (self.proj_left is None and self.proj_right is None) or refresh_due(iter, self.update_proj_gap):
            # galore-torch slices U[:, :rank], which stops at min(m, n).
            rank = min(self.rank, *full_rank_grad.shape)
            left, right = compute_projectors(full_rank_grad, rank, side, svd="exact")
            cast = lambda basis: None if basis is None else basis.to(full_rank_grad.dtype)  # noqa: E731
            self.proj_left, self.proj_right = cast(left), cast(right)
        return project(full_rank_grad, self.proj_left, self.proj_right).to(full_rank_grad.dtype)

    def project_back(self, low_rank_grad: torch.Tensor) -> torch.Tensor:
        """``scale`` times the low-rank tensor mapped back to the full space."""
        full = project_back(low_rank_grad.float(), self.proj_left, self.proj_right)
        return (full * self.scale).to(low_rank_grad.dtype)
