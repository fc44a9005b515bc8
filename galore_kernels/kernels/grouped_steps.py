"""Steady GaLore steps of many same-shape parameters, three launches for the whole group.

A LLaMA-7B has 224 GaLore matrices in three shapes (q/k/v/o, gate/up, down). One
``galore_adamw_step`` per matrix costs three launches and tens of µs of host work
each, about as long as the GPU work of the whole step at rank ≤ 256. Here the three
launches of ``galore_adamw.py`` / ``galore_adamw8bit.py`` (projection, moments,
back-projection) run once for a group of members that share every shape, stride and
dtype, with a second grid axis over the members:

* each kernel is given the first member's tensors, and reads where every other member's
  tensors (gradient, projector, parameter, moments, scratch, flag, skip count) lie from
  a row of an int64 table of offsets (``_launch._member``); the sizes, strides and tiles
  are the first member's, compiled once;
* the members' addresses agree modulo 16 bytes (checked), so the kernels' loads are as
  wide as in a launch of one parameter (``_launch._member``);
* a member's programs run exactly the code and tiles of its own launch, so the result
  is bitwise that of one ``galore_adamw_step`` per member, and so is the skip rule: a
  non-finite low-rank gradient skips only its own member's update (its own flag);
* the table is rebuilt on the host only when some offset changed (``GroupedTable``),
  and copied to the device without synchronizing.

The low-rank gradient and N of every member of one launch coexist, so a launch takes
at most ``SCRATCH_BYTES`` of them; a larger group runs in several launches of three,
which reuse one scratch (the stream orders them).
"""

from __future__ import annotations

import torch

from ._launch import MEMBER_ALIGNMENT, as_2d, check_matmul_precision, int64_device_table, on_device_of
from .adamw8bit import launch_adamw8bit
from .galore_adamw import adamw_launch_scalars, check_galore_operands, launch_adamw_moments
from .galore_adamw8bit import check_galore8bit_operands, galore8bit_launch_scalars
from .lowrank_matmul import MATMUL_TABLE_COLUMNS, folds_step_size, lowrank_matmul, normalized_dtype
from .nonfinite import checked_flag

ALIGNMENT = MEMBER_ALIGNMENT.value  # bytes

SCRATCH_BYTES = 256 << 20
"""The most low-rank scratch (the fp32 low-rank gradient and N) one grouped launch holds. LLaMA-7B at
rank 512: 12.6 MB per q/k/v/o matrix and 33.8 MB per MLP matrix (R spans the 11008 side), so 21 and 7
of them per launch, 22 launch sets per step (with 64 MiB: 5 and 1, 122 sets). Small next to the
gradients a non-layerwise step holds anyway: 2% of LLaMA-7B's 13.5 GB in bf16."""


class GroupedTable:
    """The cached device offset table of one group's launches (``grouped_*_step(table=...)``).

    Rebuilt when any offset or the device changed (a gradient that moved, a refresh that
    replaced a projector, ``load_state_dict``), else reused as is.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._table: torch.Tensor | None = None

    def table(self, offsets: list[int], device: torch.device) -> torch.Tensor:
        key = (device, *offsets)
        if key != self._key:
            self._table, self._key = int64_device_table(offsets, device), key
        return self._table


def _check_members(lists: dict[str, list]) -> None:
    """Non-empty lists of one length, no parameter memory twice (its updates would race)."""
    lengths = {name: len(values) for name, values in lists.items() if values is not None}
    params = lists["params"]
    if not params:
        raise ValueError("params must not be empty")
    if len(set(lengths.values())) != 1:
        raise ValueError(f"the member lists must have equal lengths, got {lengths}")
    # Meta tensors (launch counting) have no storage: every one reads address 0.
    addresses = [id(p) for p in params] if params[0].device.type == "meta" else [p.data_ptr() for p in params]
    if len(set(addresses)) != len(params):
        raise ValueError("two members' parameters start at one address: their updates would race in one launch")


def _check_like_first(columns: dict[str, list | None]) -> None:
    """Every member's tensors laid out as the first member's (which the per-parameter checks passed)."""
    for name, values in columns.items():
        if values is None:
            continue
        first = values[0]
        shape, stride, dtype, device = first.shape, first.stride(), first.dtype, first.device
        # This runs for every tensor of every step: dtypes and devices are compared in one C++ pass.
        one_kind = len(torch._C._group_tensors_by_device_and_dtype([values], False)) == 1
        for i, tensor in enumerate(values):
            if tensor.shape != shape or tensor.stride() != stride or (
                    not one_kind and (tensor.dtype != dtype or tensor.device != device)):
                raise ValueError(
                    f"{name}[{i}] is {tuple(tensor.shape)}, strides {tensor.stride()}, {tensor.dtype} on "
                    f"{tensor.device}; {name}[0] is {tuple(shape)}, strides {stride}, {dtype} on "
                    f"{device}: one group takes one shape, layout, dtype and device"
                )


MAX_MEMBERS = 65535
"""CUDA's limit on a grid's second dimension, the members of one launch."""


def _members_per_launch(count: int, per_member_bytes: int) -> int:
    return max(1, min(count, MAX_MEMBERS, SCRATCH_BYTES // max(per_member_bytes, 1)))


def _offsets(name: str, tensors: list[torch.Tensor]) -> list[int]:
    """Each tensor's offset from the first, in elements (``_launch._member``), a whole number of
    ``ALIGNMENT`` bytes: else the kernels, specialized on the first member's alignment, could
    load another member's tensor with instructions too wide for its address."""
    first, size = tensors[0].data_ptr(), tensors[0].element_size()
    offsets = []
    for i, tensor in enumerate(tensors):
        offset = tensor.data_ptr() - first
        if offset % ALIGNMENT:
            raise ValueError(
                f"{name}[{i}] lies {offset % ALIGNMENT} bytes off {name}[0]'s alignment to {ALIGNMENT} bytes "
                f"(a view into a shared buffer?): one group takes members whose addresses agree modulo {ALIGNMENT}"
            )
        offsets.append(offset // size)
    return offsets


def _launch_group(params, grads, projs, side, flags, skips, moments, moments_row, launch_moments, *,
                  layout_shape, matmul_precision, stamp, back_alpha, decay, table_cache):
    """The three launches per ``SCRATCH_BYTES`` chunk of members (left or right side).

    ``moments``: the moment tensors, one list per name; ``moments_row(r, n, moments, flag,
    skips)`` orders a member's offsets as the moments kernel's pointer arguments;
    ``launch_moments(low_rank, normalized, table)`` launches the moments kernel on the first
    member's operands with ``table``.
    """
    count, device = len(params), params[0].device
    n_dtype = normalized_dtype(params[0], side)
    # One slot per member of a launch; slots start a multiple of 32 bytes (fp32) and 16 (16-bit) apart.
    numel = layout_shape[0] * layout_shape[1]
    slot_numel = -(-numel // 8) * 8
    chunk = _members_per_launch(count, slot_numel * (4 + torch.finfo(n_dtype).bits // 8))
    low_rank_slots = torch.empty((chunk, slot_numel), dtype=torch.float32, device=device)
    normalized_slots = torch.empty((chunk, slot_numel), dtype=n_dtype, device=device)
    low_rank = low_rank_slots[0, :numel].view(layout_shape)
    normalized = normalized_slots[0, :numel].view(layout_shape)

    # One table, three sections: projection, moments and back-projection rows, each in its kernel's
    # pointer order. Offsets, not addresses: a new scratch (every step) leaves them as they were.
    p_at, g_at, proj_at, f_at, s_at = (_offsets(name, tensors) for name, tensors in (
        ("params", params), ("grads", grads), ("projectors", projs), ("flags", flags), ("nonfinite_skips", skips)))
    moments_at = list(zip(*(_offsets(name, tensors) for name, tensors in moments.items())))
    project_rows, moments_rows, back_rows = [], [], []
    for i in range(count):
        scratch_at = (i % chunk) * slot_numel  # the same for R and N, in their elements
        if side == "left":  # R = Pᵀ G; W += α P N
            project_rows += (proj_at[i], g_at[i], scratch_at, f_at[i])
            back_rows += (proj_at[i], scratch_at, p_at[i], f_at[i])
        else:  # Rᵀ = (G Qᵀ)ᵀ; W += α Nᵀ Q
            project_rows += (g_at[i], proj_at[i], scratch_at, f_at[i])
            back_rows += (scratch_at, proj_at[i], p_at[i], f_at[i])
        moments_rows += moments_row(scratch_at, scratch_at, moments_at[i], f_at[i], s_at[i])
    table = table_cache.table(project_rows + moments_rows + back_rows, device)
    matmul_size = MATMUL_TABLE_COLUMNS * count
    sections = (table[:matmul_size].view(count, -1), table[matmul_size:-matmul_size].view(count, -1),
                table[-matmul_size:].view(count, -1))

    # The operands of the first member stand for all: shapes, strides, dtypes. (x, y, out) of the
    # projection and of the back-projection, as in the rows above.
    grad, proj, param, flag = grads[0], projs[0], params[0], flags[0]
    if side == "left":
        project_operands, back_operands = (proj.t(), grad, low_rank), (proj, normalized, param)
    else:
        project_operands, back_operands = (grad, proj.t(), low_rank.t()), (normalized.t(), proj, param)
    for start in range(0, count, chunk):
        project_table, moments_table, back_table = (section[start:start + chunk] for section in sections)
        lowrank_matmul(*project_operands, flag, epilogue="project", dot_dtype=grad.dtype,
                       matmul_precision=matmul_precision, stamp=stamp, table=project_table)
        launch_moments(low_rank, normalized, moments_table)
        lowrank_matmul(*back_operands, flag, epilogue="apply", alpha=back_alpha, decay=decay, dot_dtype=n_dtype,
                       matmul_precision=matmul_precision, stamp=stamp, table=back_table)


def _side_and_projectors(proj_lefts, proj_rights) -> tuple[str, list]:
    if (proj_lefts is None) == (proj_rights is None):
        raise ValueError("a grouped step takes proj_lefts or proj_rights, one of them (the full side is per parameter)")
    return ("left", proj_lefts) if proj_lefts is not None else ("right", proj_rights)


def grouped_galore_adamw_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    nonfinite_skips: list[torch.Tensor],
    flags: list[torch.Tensor],
    *,
    proj_lefts: list[torch.Tensor] | None = None,
    proj_rights: list[torch.Tensor] | None = None,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    stamp: int,
    scale: float = 1.0,
    correct_bias: bool = True,
    bnb_eps: bool = False,
    matmul_precision: str = "tf32x3",
    table: GroupedTable | None = None,
) -> None:
    """``galore_adamw_step`` on every member, bitwise, in three launches per ``SCRATCH_BYTES`` of scratch.

    Every list holds one entry per member; members share shapes, strides, dtypes and device
    (checked), one side (``proj_lefts`` or ``proj_rights``), ``step`` and ``stamp``, and have
    distinct parameters. Each member's tensors are as ``galore_adamw_step`` takes them, with
    its own persistent ``flags[i]`` (0-d int32) and ``nonfinite_skips[i]``. ``table``: the
    cache of the address table, kept by the caller across steps; None builds one.
    """
    check_matmul_precision(matmul_precision)
    side, projs = _side_and_projectors(proj_lefts, proj_rights)
    _check_members(dict(params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                        nonfinite_skips=nonfinite_skips, flags=flags, projectors=projs))
    left, right = (projs[0], None) if side == "left" else (None, projs[0])
    check_galore_operands(params[0], grads[0], exp_avgs[0], exp_avg_sqs[0], nonfinite_skips[0], left, right, False)
    checked_flag(params[0], flags[0], stamp)
    _check_like_first(dict(params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                           nonfinite_skips=nonfinite_skips, flags=flags, projectors=projs))
    scalars, (_, scaled_alpha, one), decay = adamw_launch_scalars(
        lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step, scale=scale,
        correct_bias=correct_bias, bnb_eps=bnb_eps, device_scalars=None)
    folded = folds_step_size(params[0], side)
    # The moments in the layout D (R, or Rᵀ for right) as galore_adamw_step views them.
    exp_avg_d, exp_avg_sq_d = (exp_avgs[0], exp_avg_sqs[0]) if side == "left" else (exp_avgs[0].t(), exp_avg_sqs[0].t())

    def launch_moments(low_rank, normalized, moments_table):
        launch_adamw_moments(low_rank, exp_avg_d, exp_avg_sq_d, normalized, flags[0], apply=False,
                             alpha=scaled_alpha if folded else one, scalars=scalars, stamp=stamp,
                             nonfinite_skips=nonfinite_skips[0], table=moments_table)

    with on_device_of(params[0]):
        _launch_group(
            params, grads, projs, side, flags, nonfinite_skips,
            dict(exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs),
            # _adamw_moments_kernel's pointers: grad (R), exp_avg, exp_avg_sq, out (N), flag, skips
            lambda r_at, n_at, moments, f_at, s_at: (r_at, *moments, n_at, f_at, s_at),
            launch_moments, layout_shape=tuple(exp_avg_d.shape), matmul_precision=matmul_precision, stamp=stamp,
            back_alpha=one if folded else scaled_alpha, decay=decay, table_cache=table or GroupedTable())


def grouped_galore_adamw8bit_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avg_codes: list[torch.Tensor],
    exp_avg_absmaxes: list[torch.Tensor],
    exp_avg_sq_codes: list[torch.Tensor],
    exp_avg_sq_absmaxes: list[torch.Tensor],
    nonfinite_skips: list[torch.Tensor],
    flags: list[torch.Tensor],
    *,
    proj_lefts: list[torch.Tensor] | None = None,
    proj_rights: list[torch.Tensor] | None = None,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    stamp: int,
    scale: float = 1.0,
    matmul_precision: str = "tf32x3",
    table: GroupedTable | None = None,
) -> None:
    """``galore_adamw8bit_step`` on every member, bitwise, in three launches per ``SCRATCH_BYTES`` of scratch.

    As ``grouped_galore_adamw_step``, with each member's 8-bit moments as
    ``galore_adamw8bit_step`` takes them.
    """
    check_matmul_precision(matmul_precision)
    side, projs = _side_and_projectors(proj_lefts, proj_rights)
    columns = dict(params=params, grads=grads, exp_avg_codes=exp_avg_codes, exp_avg_absmaxes=exp_avg_absmaxes,
                   exp_avg_sq_codes=exp_avg_sq_codes, exp_avg_sq_absmaxes=exp_avg_sq_absmaxes,
                   nonfinite_skips=nonfinite_skips, flags=flags, projectors=projs)
    _check_members(columns)
    left, right = (projs[0], None) if side == "left" else (None, projs[0])
    quantized = (exp_avg_codes[0], exp_avg_absmaxes[0], exp_avg_sq_codes[0], exp_avg_sq_absmaxes[0])
    _, layout_shape = check_galore8bit_operands(params[0], grads[0], quantized, nonfinite_skips[0], left, right, False)
    checked_flag(params[0], flags[0], stamp)
    _check_like_first(columns)
    moments_scalars, back_alpha, decay = galore8bit_launch_scalars(
        params[0], side, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step,
        scale=scale, device_scalars=None)

    def launch_moments(low_rank, normalized, moments_table):
        launch_adamw8bit(normalized, as_2d(normalized), low_rank, as_2d(low_rank), quantized, flags[0],
                         apply=False, scalars=moments_scalars, stamp=stamp, nonfinite_skips=nonfinite_skips[0],
                         table=moments_table)

    with on_device_of(params[0]):
        _launch_group(
            params, grads, projs, side, flags, nonfinite_skips,
            dict(exp_avg_codes=exp_avg_codes, exp_avg_absmaxes=exp_avg_absmaxes, exp_avg_sq_codes=exp_avg_sq_codes,
                 exp_avg_sq_absmaxes=exp_avg_sq_absmaxes),
            # _adamw8bit_kernel's pointers: out (N), grad (R), the four moments, flag, skips
            lambda r_at, n_at, moments, f_at, s_at: (n_at, r_at, *moments, f_at, s_at),
            launch_moments, layout_shape=tuple(layout_shape), matmul_precision=matmul_precision, stamp=stamp,
            back_alpha=back_alpha, decay=decay, table_cache=table or GroupedTable())
