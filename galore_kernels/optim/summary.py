"""``optimizer.summary()``: what each parameter costs in optimizer state, against torch AdamW."""

from __future__ import annotations

import dataclasses
import math

import torch

from ..projector import projector_dtype
from .checkpoint import expected_state, galore_geometry


@dataclasses.dataclass(frozen=True)
class ParamSummary:
    name: str | None
    shape: tuple[int, ...]
    side: str | None  # "left", "right", "full", or None for plain AdamW
    rank: int | None  # after clamping to min(m, n)
    state_bytes: int
    adamw_state_bytes: int


@dataclasses.dataclass(frozen=True)
class Summary:
    """Rows per parameter; ``str()`` gives the table."""

    rows: tuple[ParamSummary, ...]

    @property
    def state_bytes(self) -> int:
        return sum(row.state_bytes for row in self.rows)

    @property
    def adamw_state_bytes(self) -> int:
        return sum(row.adamw_state_bytes for row in self.rows)

    def __str__(self) -> str:
        header = ("parameter", "shape", "side", "rank", "state", "AdamW state")
        lines = [
            (row.name or f"#{i}", "x".join(map(str, row.shape)), row.side or "-", "-" if row.rank is None else str(row.rank),
             _mib(row.state_bytes), _mib(row.adamw_state_bytes))
            for i, row in enumerate(self.rows)
        ]
        ratio = self.state_bytes / self.adamw_state_bytes if self.adamw_state_bytes else float("nan")
        lines.append(("total", "", "", "", _mib(self.state_bytes), f"{_mib(self.adamw_state_bytes)} ({ratio:.2f}x)"))
        widths = [max(len(line[c]) for line in [header, *lines]) for c in range(len(header))]
        fmt = lambda line: "  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(line, widths)))
        return "\n".join([fmt(header), fmt(tuple("-" * w for w in widths)), *map(fmt, lines)])


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.3f} MiB"


def _tensor_bytes(state: dict) -> int:
    return sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))


def adamw_state_bytes(p: torch.Tensor) -> int:
    """torch.optim.AdamW's state for ``p``: exp_avg and exp_avg_sq like ``p``, and a 0-d fp32 step."""
    return 2 * p.numel() * p.element_size() + torch.empty((), dtype=torch.float32).element_size()


def summarize(optimizer, model: torch.nn.Module | None = None) -> Summary:
    """Parameters in group order. Names come from ``model`` when given, else from groups' ``param_names``.

    State bytes are those of the live state, or, before a parameter's first update, of the
    state the optimizer will create (moments and projector; layerwise accumulation buffers excluded).
    """
    names = {p: name for name, p in model.named_parameters()} if model is not None else {}
    rows = []
    for group in optimizer.param_groups:
        group_names = group.get("param_names")
        for index, p in enumerate(group["params"]):
            geometry = galore_geometry(optimizer, group, p)
            side = None if geometry is None else geometry[0]
            rank = None if geometry is None else optimizer._galore_rank(group, p)
            state = optimizer.state.get(p)
            if state and "step" in state:
                nbytes = _tensor_bytes({k: v for k, v in state.items() if k != "grad_accum"})
            else:
                element = torch.empty((), dtype=projector_dtype(p.dtype)).element_size()
                projector_bytes = 0 if geometry is None else sum(math.prod(s) * element for s in geometry[2].values())
                nbytes = _tensor_bytes(expected_state(optimizer, group, p)) + projector_bytes
            name = names.get(p) or (group_names[index] if group_names else None)
            rows.append(ParamSummary(name, tuple(p.shape), side, rank, nbytes, adamw_state_bytes(p)))
    return Summary(tuple(rows))
