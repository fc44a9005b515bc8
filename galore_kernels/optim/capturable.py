"""``capturable=True``: every per-step scalar of the step's launches lives in device memory.

A CUDA graph replays its launches with the arguments they had at capture, so a step
that passes its step count, bias corrections or lr by value cannot be replayed. As
``torch.optim.AdamW(capturable=True)`` does, the capturable optimizers keep the step on
the device and the kernels read from there (``kernels._launch.DeviceScalars``):

* ``counters`` (num_params × 2 int32): each parameter's step and the step its moments
  were last zeroed at (``moments_on_refresh="reset"``); the bias step is their difference.
* ``table`` (num_params × COLUMNS fp32): what the kernels read, per parameter: the
  plain and the scaled step size, denom_eps, the decay, and 1.0.

``DeviceSteps.prepare`` runs once per ``step()``, before the first update launch: one
in-place add increments the counters of the parameters this step updates (a mask,
cached per set of parameters), then a few torch ops compute the whole table from the
counters in fp64, the host's formulas term for term (``kernels.adamw8bit.adam8bit_scalars``,
``kernels.galore_adamw.adamw_scalars``), rounded to fp32 once, as the host's values are
when passed to a kernel. So no reader can race the increment: every launch that reads
a counter or the table is queued after them on the same stream, and nothing else writes
them. The price is about 20 small torch launches per ``step()``, whatever the number
of parameters, instead of bias corrections in every kernel; fp64 keeps the result
bitwise equal to the host path (``python_tests/test_optim_capturable.py``).

The host keeps its own step counts (they decide the refreshes); ``mirror`` is what it
knows the counters hold, and an eager step rewrites the counters of any parameter where
they differ (its first step, ``load_state_dict``, a moments reset). A step being captured
runs nothing, so it must find them equal, and it leaves the host counts as they were;
``GaLore*.replay(graph)`` advances them as each replayed step does.
"""

from __future__ import annotations

import torch

from ..kernels._launch import DeviceScalars

STEP_SIZE, SCALED_STEP_SIZE, DENOM_EPS, DECAY, ONE = range(5)
COLUMNS = 8  # 32-byte rows


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` copied to ``device`` without making the host wait (a pinned source on CUDA)."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def capturing(device: torch.device) -> bool:
    """True while a CUDA graph captures the current stream of ``device``."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class DeviceSteps:
    """The device step counters and scalar table of one optimizer (see the module docstring)."""

    def __init__(self, optimizer) -> None:
        self.optimizer = optimizer
        self.counters: torch.Tensor | None = None
        self.table: torch.Tensor | None = None
        self.mirror: dict[int, tuple[int, int]] = {}
        self._masks: dict[tuple[int, ...], torch.Tensor] = {}
        self._constants_key = None
        self._constants: dict[str, torch.Tensor] = {}
        self._views: dict[int, DeviceScalars] = {}
        self.by_state: dict[int, DeviceScalars] = {}  # id(state) -> its parameter's views, for this step

    def _allocate(self, device: torch.device, num_slots: int) -> None:
        self.counters = torch.zeros(num_slots, 2, dtype=torch.int32, device=device)
        self.table = torch.zeros(num_slots, COLUMNS, dtype=torch.float32, device=device)
        self.table[:, ONE] = 1.0
        self.mirror, self._masks, self._views, self._constants_key = {}, {}, {}, None

    def scalars(self, slot: int) -> DeviceScalars:
        """Views of ``slot``'s counter and row: fixed addresses, so the launches' arguments never change."""
        if slot not in self._views:
            row = self.table[slot]
            self._views[slot] = DeviceScalars(self.counters[slot, 0], row[STEP_SIZE], row[SCALED_STEP_SIZE],
                                              row[DENOM_EPS], row[DECAY], row[ONE])
        return self._views[slot]

    def prepare(self, stepped: list[tuple[dict, torch.Tensor]]) -> None:
        """Before the launches of a ``step()`` that updates ``stepped`` (``(group, param)`` pairs, their
        state created and their host steps not yet incremented): counters incremented, table computed."""
        if not stepped:
            return
        optimizer = self.optimizer
        device = stepped[0][1].device
        captured = capturing(device)
        if any(p.device != device for _, p in stepped):
            raise ValueError("capturable=True needs every parameter on one device")
        num_slots = len(optimizer._param_index)
        if self.counters is None or self.counters.shape[0] != num_slots or self.counters.device != device:
            if captured:
                raise ValueError("capturable: run one eager step() before capturing (the device counters are made there)")
            self._allocate(device, num_slots)
        slots = tuple(optimizer._param_index[p] for _, p in stepped)
        self._sync(stepped, slots, captured)
        mask = self._masks.get(slots)
        if mask is None:
            if captured:
                raise ValueError("capturable: the captured step() must update the same parameters as the eager "
                                 "step() before it (give them gradients, or run one eager step first)")
            host_mask = torch.zeros(num_slots, dtype=torch.int32)
            host_mask[list(slots)] = 1
            mask = self._masks[slots] = host_mask.to(device)
        self.counters[:, 0].add_(mask)
        self.advance(slots)
        self._compute_table(device, captured)
        self.by_state = {id(optimizer.state[p]): self.scalars(slot) for (_, p), slot in zip(stepped, slots)}

    def _sync(self, stepped: list, slots: tuple[int, ...], captured: bool) -> None:
        """Write the host's (step, moments_reset_at) into the counters where the mirror differs."""
        stale = {}
        for (_, p), slot in zip(stepped, slots):
            state = self.optimizer.state[p]
            host = (state["step"], state.get("moments_reset_at", 0))
            if self.mirror.get(slot) != host:
                stale[slot] = host
        if not stale:
            return
        if captured:
            raise ValueError("capturable: a step count changed on the host since the last eager step() "
                             "(load_state_dict, a moments reset): run one eager step() before capturing")
        index = _to_device(torch.tensor(list(stale), dtype=torch.long), self.counters.device)
        self.counters[index] = _to_device(torch.tensor(list(stale.values()), dtype=torch.int32), self.counters.device)
        self.mirror.update(stale)

    def advance(self, slots, by: int = 1) -> None:
        """The host's view of ``by`` steps of ``slots`` run on the device (``prepare``, a replay; -1: a
        captured step, which ran nothing)."""
        for slot in slots:
            step, reset_at = self.mirror[slot]
            self.mirror[slot] = (step + by, reset_at)

    def _constants_for(self, device: torch.device, captured: bool) -> dict[str, torch.Tensor]:
        """Per-slot fp64 hyperparameters (the group's), rebuilt eagerly when one changes; tensor lrs are read per step."""
        optimizer = self.optimizer
        per_slot = [None] * len(optimizer._param_index)
        for p, slot in optimizer._param_index.items():
            per_slot[slot] = optimizer._group_index[p]
        groups = optimizer.param_groups
        described = tuple(
            (g["betas"][0], g["betas"][1], g["eps"], g["weight_decay"], g.get("scale", 1.0),
             g.get("correct_bias", True), None if torch.is_tensor(g["lr"]) else g["lr"])
            for g in groups
        )
        key = (described, tuple(per_slot), optimizer.bnb_eps)
        if key == self._constants_key:
            return self._constants
        if captured:
            raise ValueError("capturable: a hyperparameter (a float lr, betas, eps, weight_decay, scale) changed "
                             "since the last eager step(); use a tensor lr to schedule it under a CUDA graph")
        columns = list(zip(*(described[g] for g in per_slot)))
        names = ("beta1", "beta2", "eps", "weight_decay", "scale", "correct_bias", "lr")
        constants = {}
        for name, column in zip(names, columns):
            if name == "correct_bias":
                constants[name] = torch.tensor(column, dtype=torch.bool).to(device)
            else:
                constants[name] = torch.tensor([0.0 if v is None else v for v in column], dtype=torch.float64).to(device)
        tensor_groups = [i for i, g in enumerate(groups) if torch.is_tensor(g["lr"])]
        if tensor_groups:
            position = {g: k for k, g in enumerate(tensor_groups)}
            constants["lr_from_tensor"] = torch.tensor([g in position for g in per_slot], dtype=torch.bool).to(device)
            constants["lr_tensor_index"] = torch.tensor([position.get(g, 0) for g in per_slot]).to(device)
        constants["tensor_groups"] = tensor_groups
        self._constants, self._constants_key = constants, key
        return constants

    def _compute_table(self, device: torch.device, captured: bool) -> None:
        c = self._constants_for(device, captured)
        lr = c["lr"]
        if c["tensor_groups"]:
            groups = self.optimizer.param_groups
            for g in c["tensor_groups"]:
                if groups[g]["lr"].device != device or groups[g]["lr"].numel() != 1:
                    raise ValueError(f"a tensor lr must hold one value on the parameters' device ({device}), got "
                                     f"shape {tuple(groups[g]['lr'].shape)} on {groups[g]['lr'].device}")
            scheduled = torch.stack([groups[g]["lr"].reshape(()).to(device, torch.float64) for g in c["tensor_groups"]])
            lr = torch.where(c["lr_from_tensor"], scheduled[c["lr_tensor_index"]], lr)
        bias_step = (self.counters[:, 0] - self.counters[:, 1]).to(torch.float64)
        correction1 = 1.0 - torch.pow(c["beta1"], bias_step)
        correction2 = torch.sqrt(1.0 - torch.pow(c["beta2"], bias_step))
        step_size = -torch.where(c["correct_bias"], lr * correction2 / correction1, lr)
        denom_eps = c["eps"] * correction2 if self.optimizer.bnb_eps else c["eps"]
        decay = torch.where(c["weight_decay"] > 0, 1.0 - lr * c["weight_decay"], 1.0)
        self.table[:, :ONE] = torch.stack((step_size, step_size * c["scale"], denom_eps, decay), dim=1)
