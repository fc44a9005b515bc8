"""``GaLoreAdamW`` and ``GaLoreAdamW8bit``: drop-in replacements for galore-torch's classes.

The classes are thin: they validate groups, create state, decide when a projector
is refreshed and dispatch each parameter to one step function of a backend
(``reference`` for ``backend="torch"``, ``kernels`` for Triton). The math lives in
those step functions and nowhere else.

Optimizer state holds only tensors and Python numbers, per parameter:

* ``step`` (int): updates attempted so far (a skipped non-finite update counts);
* ``proj_left`` (m×r) and/or ``proj_right`` (r×n): the projector, in the parameter's
  dtype for bf16/fp16 parameters (as galore-torch), else fp32 (``projector.projector_dtype``);
* the moments: ``exp_avg``/``exp_avg_sq`` (fp32), or for 8-bit states
  ``exp_avg_codes``/``exp_avg_absmax``/``exp_avg_sq_codes``/``exp_avg_sq_absmax``;
* ``nonfinite_skips`` (int64 0-d tensor): updates skipped for NaN/Inf gradients;
* ``nonfinite_flag`` (int32 0-d tensor; checkpoints from before it load without it): the
  step that last saw a NaN/Inf gradient, which the kernels set and read against the
  current ``step`` instead of zeroing a flag every step (``kernels/nonfinite.py``);
* layerwise mode only: ``micro_steps`` (int) and ``grad_accum`` (the gradient
  accumulated so far: low-rank fp32, or full-size in the gradient's dtype).

Layerwise mode (``layerwise=True``) updates every parameter from a
``post_accumulate_grad`` hook during backward and frees its gradient at once, so
full-size gradients never coexist. See the class docstrings for accumulation and
clipping.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

import torch

from .. import distributed, quant
from . import capturable as capturable_steps
from . import checkpoint, guardrails
from . import layerwise as layerwise_engine
from . import summary as summary_module
from ..projector import (
    ADAPTIVE_THRESHOLD,
    MATMUL_PRECISIONS,
    MAX_GAP_FACTOR,
    PROJ_TYPES,
    REFRESH_SCHEDULES,
    SVD_METHODS,
    adaptive_gap,
    compute_projectors,
    first_adaptive_refresh,
    fixed_refresh_count,
    low_rank_shape,
    projection_side,
    projector_dtype,
    refresh_due,
    refresh_seed,
    stagger_offset,
    warn_once,
)
from . import refresh as moments_refresh
from ..reference.multi_tensor import MAX_NUMEL as MULTI_TENSOR_MAX_NUMEL

BACKENDS = ("auto", "torch", "triton")
GALORE_KEYS = ("rank", "update_proj_gap", "scale", "proj_type")


def _backend_module(backend: str, param: torch.Tensor):
    """The module whose step functions run ``param``'s update."""
    if backend == "torch" or (backend == "auto" and not param.is_cuda):
        from .. import reference

        return reference
    from .. import kernels  # backend="triton", or "auto" on a CUDA tensor: no silent fallback

    return kernels


def _matrix(tensor: torch.Tensor) -> torch.Tensor:
    """GaLore treats an N-d parameter as a matrix: first dimension × the rest."""
    return tensor if tensor.dim() == 2 else tensor.reshape(tensor.shape[0], -1)


def _multi_tensor_lists(items: list, state: dict, keys: tuple[str, ...]) -> list:
    """``[params, grads, *per-key state lists, nonfinite_skips, flags]`` of a multi-tensor launch."""
    params, grads = [p for p, _ in items], [g for _, g in items]
    states = [state[p] for p in params]
    flags = [_GaLoreOptimizer._flag_args(s, p)["flag"] for s, p in zip(states, params)]
    return [params, grads, *([s[key] for s in states] for key in keys), [s["nonfinite_skips"] for s in states], flags]


def _grouped_projectors(items: list, state: dict, side: str) -> dict:
    """``proj_lefts`` or ``proj_rights`` of a grouped step over ``(param, grad)`` items."""
    key = f"proj_{side}"
    return {f"{key}s": [state[p][key] for p, _ in items]}


def _init_fp32_moments(state: dict, shape: tuple[int, ...], device: torch.device) -> None:
    state["exp_avg"] = torch.zeros(shape, dtype=torch.float32, device=device)
    state["exp_avg_sq"] = torch.zeros(shape, dtype=torch.float32, device=device)


class _GaLoreOptimizer(layerwise_engine.TwoPassBackward, torch.optim.Optimizer):
    """Shared machinery; subclasses define the moments and the step functions."""

    def __init__(
        self,
        params,
        defaults: dict,
        *,
        backend: str,
        svd: str,
        seed: int,
        stagger: bool,
        layerwise: bool,
        accumulation_steps: int,
        max_grad_norm: float | None,
        moments_on_refresh: str = "keep",
        refresh: str = "fixed",
        adaptive_threshold: float = ADAPTIVE_THRESHOLD,
        max_update_proj_gap: int | None = None,
        clip_strategy: str = "hold",
        loss_scaling: bool = False,
        loss_scale_args: dict | None = None,
        matmul_precision: str = "tf32x3",
        capturable: bool = False,
    ):
        self._check_hyperparameters(defaults)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if svd not in SVD_METHODS:
            raise ValueError(f"svd must be one of {SVD_METHODS}, got {svd!r}")
        if not (isinstance(accumulation_steps, int) and accumulation_steps >= 1):
            raise ValueError(f"accumulation_steps must be an int >= 1, got {accumulation_steps!r}")
        if accumulation_steps > 1 and not layerwise:
            raise ValueError(
                "accumulation_steps > 1 needs layerwise=True; without it, accumulate in .grad "
                "and call step() every k micro-batches as usual"
            )
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
        if moments_on_refresh not in moments_refresh.MOMENT_POLICIES:
            raise ValueError(
                f"moments_on_refresh must be one of {moments_refresh.MOMENT_POLICIES}, got {moments_on_refresh!r}"
            )
        if refresh not in REFRESH_SCHEDULES:
            raise ValueError(f"refresh must be one of {REFRESH_SCHEDULES}, got {refresh!r}")
        threshold_is_number = isinstance(adaptive_threshold, (int, float)) and not isinstance(adaptive_threshold, bool)
        if not (threshold_is_number and 0.0 <= adaptive_threshold <= 1.0):
            raise ValueError(f"adaptive_threshold must be a number in [0, 1] (an overlap), got {adaptive_threshold!r}")
        if max_update_proj_gap is not None and (
            isinstance(max_update_proj_gap, bool) or not isinstance(max_update_proj_gap, int) or max_update_proj_gap < 1
        ):
            raise ValueError(f"max_update_proj_gap must be an int >= 1 or None, got {max_update_proj_gap!r}")
        layerwise_engine.validate_clip_strategy(clip_strategy)
        if clip_strategy == "two_pass" and not layerwise:
            raise ValueError("clip_strategy='two_pass' is a layerwise mode strategy: it needs layerwise=True")
        if clip_strategy == "two_pass" and accumulation_steps > 1:
            raise ValueError(layerwise_engine.TWO_PASS_ACCUMULATION_ERROR)
        if loss_scaling and clip_strategy != "two_pass":
            raise ValueError("loss_scaling=True (fp16) needs clip_strategy='two_pass': only the first pass can skip an overflow step exactly")
        if capturable and not self.supports_capturable:
            raise ValueError(f"{type(self).__name__} does not support capturable=True (GaLoreAdamW and GaLoreAdamW8bit do)")
        if capturable and (layerwise or max_grad_norm is not None or backend == "torch"):
            raise ValueError(
                "capturable=True is for the step() path of the Triton kernels: it does not support layerwise=True, "
                "max_grad_norm or backend='torch'"
            )
        self.capturable = bool(capturable)
        # capturable: the device step counters and per-step scalars (optim/capturable.py).
        self._device_steps = capturable_steps.DeviceSteps(self) if capturable else None
        self._captured_params: list[torch.Tensor] | None = None  # what the last captured step() updated
        self._steps_to_refresh: int | None = None  # replays left before a refresh; None: count anew
        self.clip_strategy = clip_strategy
        self._init_two_pass(loss_scale_args, loss_scaling)
        defaults = dict(defaults, svd=svd, matmul_precision=matmul_precision)
        self.moments_on_refresh = moments_on_refresh
        self.refresh = refresh
        self.adaptive_threshold = float(adaptive_threshold)
        self.max_update_proj_gap = max_update_proj_gap
        self.backend = backend
        self.seed = int(seed)
        self.stagger = bool(stagger)
        self.layerwise = bool(layerwise)
        self.accumulation_steps = accumulation_steps
        self.max_grad_norm = max_grad_norm
        # Positions fixed when a parameter is added: the sketch seed and the
        # stagger phase derive from them, so they must not depend on anything else.
        self._param_index: dict[torch.Tensor, int] = {}
        self._group_index: dict[torch.Tensor, int] = {}
        self._galore_position: dict[torch.Tensor, int] = {}
        self._hooks = []
        self._pending: list[torch.Tensor] = []
        self._norm_pass_projectors: dict[torch.Tensor, tuple] = {}  # two_pass: refreshes from the norm pass
        self._callback_queued = False
        # Visibility; nothing here synchronizes with the host until read. track_grad_norm:
        # compute last_grad_norm without clipping too (the Trainer helper sets it in layerwise
        # mode). refresh_seconds: host wall time spent in projector refreshes (device work a
        # refresh leaves queued is not included), over refresh_count refreshes.
        self.track_grad_norm = False
        self.refresh_seconds = 0.0
        self.refresh_count = 0
        # Bytes the FSDP2 path all-reduced (refresh sketches and left projections; distributed.sharded_update).
        self.sharded_bytes_sent = 0
        self._sharded_held: list = []  # FSDP2 layerwise clipping: consumed gradients until backward ends
        self._grad_sq_sum: torch.Tensor | None = None
        self._last_grad_norm: torch.Tensor | None = None
        self._skipped_steps: torch.Tensor | None = None
        self._nonfinite_at_last_step: torch.Tensor | None = None
        self._windows_completed = 0
        # distributed.low_rank_allreduce_hook leaves here the all-reduced projected
        # gradient of each GaLore parameter it reduced in low rank; step() consumes it.
        self._reduced_low_rank: dict[torch.Tensor, torch.Tensor] = {}
        self._world_checked = False
        # Address tables of the multi-tensor launches, per (group, state kind, dtypes, device).
        self._multi_tensor_tables: dict = {}
        # Offset tables of the grouped launches, per launch layout (``_grouped_launch_key``).
        self._grouped_tables: dict = {}
        super().__init__(params, defaults)

    @staticmethod
    def _check_hyperparameters(defaults: dict) -> None:
        """Adam's, for the constructor's arguments and each param group with the defaults filled in;
        optimizers with other hyperparameters override it."""
        lr, betas, eps, weight_decay = defaults["lr"], defaults["betas"], defaults["eps"], defaults["weight_decay"]
        if not (torch.is_tensor(lr) and lr.dim() == 0):  # capturable=True takes a 0-d tensor lr
            guardrails.require_number("lr", lr)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise TypeError(f"betas must be a pair of numbers, got {betas!r}")
        for name, value in (("betas[0]", betas[0]), ("betas[1]", betas[1]), ("eps", eps), ("weight_decay", weight_decay)):
            guardrails.require_number(name, value)
        beta1, beta2 = betas
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate lr={lr}: must be >= 0")
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError(f"Invalid betas={defaults['betas']}: each must be in [0, 1)")
        if not 0.0 < eps:  # torch allows 0, where a zero gradient entry gives 0/0 = NaN in the update
            raise ValueError(f"Invalid eps={eps}: must be > 0")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay={weight_decay}: must be >= 0")

    # ----------------------------------------------------------------- groups

    HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay")
    """The keys every param group has, checked by name in a loaded checkpoint (``load_state_dict``)."""

    def add_param_group(self, param_group: dict) -> None:
        """Adds a group; a group with ``rank`` is a GaLore group and needs every key of ``GALORE_KEYS``.

        The group's own hyperparameters are checked as the constructor's are, and a parameter
        listed twice is refused (torch only warns; step() would update it twice).
        """
        self._check_hyperparameters({**self.defaults, **param_group})
        params = param_group["params"]
        if not isinstance(params, (torch.Tensor, set)):  # torch itself refuses a set, by name
            params = list(params)
            param_group = {**param_group, "params": params}
            if len({id(p) for p in params}) != len(params):
                raise ValueError("a parameter appears more than once in a param group: step() would update it twice")
        if "rank" in param_group:
            missing = [key for key in GALORE_KEYS if key not in param_group]
            if missing:
                raise ValueError(f"GaLore param group (it has 'rank') is missing key(s) {missing}; needs {GALORE_KEYS}")
            rank, gap, proj_type = param_group["rank"], param_group["update_proj_gap"], param_group["proj_type"]
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise ValueError(f"rank must be an int >= 1, got {rank!r}")
            if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
                raise ValueError(f"update_proj_gap must be an int >= 1, got {gap!r}")
            if proj_type not in PROJ_TYPES:
                raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")
            if not isinstance(param_group["scale"], (int, float)):
                raise TypeError(f"scale must be a number, got {type(param_group['scale']).__name__}")
            if self.max_update_proj_gap is not None and self.max_update_proj_gap < gap:
                raise ValueError(
                    f"max_update_proj_gap={self.max_update_proj_gap} is below this group's update_proj_gap={gap}"
                )
        if param_group.get("svd", self.defaults.get("svd", "randomized")) not in SVD_METHODS:
            raise ValueError(f"svd must be one of {SVD_METHODS}, got {param_group['svd']!r}")
        precision = param_group.get("matmul_precision", self.defaults.get("matmul_precision", "tf32x3"))
        if precision not in MATMUL_PRECISIONS:
            raise ValueError(f"matmul_precision must be one of {MATMUL_PRECISIONS}, got {precision!r}")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if self.layerwise:
            guardrails.claim_layerwise_hooks(self, [p for p in group["params"] if p.requires_grad])
        for p in group["params"]:
            self._param_index[p] = len(self._param_index)
            self._group_index[p] = len(self.param_groups) - 1
            if "rank" in group and p.dim() >= 2:
                self._galore_position[p] = len(self._galore_position)
            if self.layerwise and p.requires_grad:  # a frozen parameter gets no gradient, and no hook
                self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad_ready))

    def _galore_rank(self, group: dict, p: torch.Tensor) -> int | None:
        """The (clamped) rank if ``p`` takes the GaLore path, else None."""
        if "rank" not in group:
            return None
        if p.dim() < 2:
            warn_once("galore-1d", "1-D parameters in a GaLore group take plain AdamW (no projection).")
            return None
        m, n = _matrix(p).shape
        if min(m, n) == 0:  # nothing to project: the plain path steps an empty parameter, as torch's AdamW does
            return None
        if group["rank"] >= min(m, n):
            warn_once(
                f"rank-clamp-{group['rank']}-{m}x{n}",
                f"rank={group['rank']} >= min(m, n) for a {m}x{n} parameter: clamped to {min(m, n)}.",
            )
            return min(m, n)
        return group["rank"]

    @property
    def nonfinite_skips(self) -> int:
        """Total parameter updates skipped for a NaN/Inf gradient (synchronizes once)."""
        counts = [s["nonfinite_skips"] for s in self.state.values() if "nonfinite_skips" in s]
        if not counts:
            return 0
        return int(torch.stack([c.to(counts[0].device) for c in counts]).sum().item())

    @property
    def skipped_steps(self) -> int:
        """``step()`` calls in which some update was skipped for a NaN/Inf gradient (synchronizes once).

        With ``max_grad_norm`` one non-finite value makes the global norm non-finite and
        every parameter skips that step: ``nonfinite_skips`` counts each parameter,
        this counts the step once.
        """
        return 0 if self._skipped_steps is None else int(self._skipped_steps.item())

    @property
    def last_grad_norm(self) -> torch.Tensor | None:
        """Global L2 norm of the gradients the moments were fed in the last ``step()`` window
        (as ``max_grad_norm`` clips it), a device tensor; None unless clipping or ``track_grad_norm``."""
        return self._last_grad_norm

    @property
    def _step_supports_amp_scaling(self) -> bool:
        # GradScaler then hands its scale to step() instead of asserting on the
        # gradients layerwise mode has already consumed; step() refuses it there.
        return self.layerwise

    def summary(self, model: torch.nn.Module | None = None) -> summary_module.Summary:
        """Per-parameter table (name, shape, GaLore side, clamped rank, state bytes) against torch AdamW."""
        return summary_module.summarize(self, model)

    # ------------------------------------------------------------------ state

    def _check_grad(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        if grad.is_sparse:
            raise TypeError(f"{type(self).__name__} does not support sparse gradients (parameter of shape {tuple(p.shape)})")
        if grad.is_complex() or p.is_complex():
            raise TypeError(f"{type(self).__name__} does not support complex parameters or gradients (shape {tuple(p.shape)})")
        if not p.is_floating_point():
            raise TypeError(f"{type(self).__name__} needs floating-point parameters, got {p.dtype}")

    def _ensure_state(self, group: dict, p: torch.Tensor) -> dict:
        state = self.state[p]
        if "step" not in state:
            state.update(self._fresh_state(group, p))
        return state

    def _fresh_state(self, group: dict, p: torch.Tensor) -> dict:
        """The state ``p`` starts with, on ``p``'s device (a meta ``p`` gives its layout for free)."""
        state = {"step": 0, "nonfinite_skips": torch.zeros((), dtype=torch.int64, device=p.device)}
        if self.keeps_nonfinite_flag:
            state["nonfinite_flag"] = torch.zeros((), dtype=torch.int32, device=p.device)
        rank = self._galore_rank(group, p)
        if rank is None:
            self._init_moments(state, p, tuple(p.shape), side=None, group=group)
        else:
            side = projection_side(group["proj_type"], tuple(_matrix(p).shape))
            self._init_moments(state, p, low_rank_shape(tuple(_matrix(p).shape), side, rank), side=side, group=group)
        return state

    def _init_moments(self, state: dict, p: torch.Tensor, shape: tuple[int, ...], side: str | None, group: dict) -> None:
        raise NotImplementedError

    def _maybe_refresh(self, group: dict, p: torch.Tensor, state: dict, grad: torch.Tensor,
                       projectors: tuple | None = None) -> None:
        """Recompute the projector from ``grad`` (the full, accumulated gradient) when due.

        projectors: ``_refreshed_projectors``' result for this very gradient and state,
        already computed (by two_pass's norm pass): applied without a second SVD.
        """
        if not self._refresh_due_here(group, p, state):
            return
        if self.capturable and capturable_steps.capturing(p.device):
            raise ValueError("capturable: a projector refresh is due at this step(); run it eagerly, not in a "
                             "CUDA graph (refresh_due_next() says when)")
        kept = {key: value for key, value in state.items() if torch.is_tensor(value)} if self.capturable else None
        side = projection_side(group["proj_type"], tuple(_matrix(p).shape))
        previous = (state.get("proj_left"), state.get("proj_right"))
        left, right = self._refreshed_projectors(group, p, state, grad) if projectors is None else projectors
        for key, value in (("proj_left", left), ("proj_right", right)):
            if value is not None:
                state[key] = value
        self._after_refresh(group, p, state, side, previous, (left, right))
        if kept:
            self._keep_storage(state, kept)

    @staticmethod
    def _keep_storage(state: dict, kept: dict) -> None:
        """capturable: copy what a refresh put in ``state`` (projectors; reset or rotated moments) back into
        the tensors it replaced, so a CUDA graph captured before the refresh still reads and writes them."""
        for key, old in kept.items():
            new = state.get(key)
            if new is old or new is None:
                continue
            if new.shape != old.shape or new.dtype != old.dtype or new.device != old.device:
                raise ValueError(f"capturable: a refresh changed state[{key!r}]'s layout; a captured graph "
                                 "would read the old one")
            old.copy_(new)
            state[key] = old

    def _refresh_due_here(self, group: dict, p: torch.Tensor, state: dict) -> bool:
        return self._galore_rank(group, p) is not None and self._refresh_due(group, p, state)

    def _refreshed_projectors(self, group: dict, p: torch.Tensor, state: dict, grad: torch.Tensor) -> tuple:
        """The new ``(proj_left, proj_right)`` of a due refresh from ``grad``; ``state`` is only read."""
        side = projection_side(group["proj_type"], tuple(_matrix(p).shape))
        started = time.perf_counter()
        projectors = compute_projectors(
            _matrix(grad), self._galore_rank(group, p), side,
            svd=group["svd"],
            seed=refresh_seed(self.seed, self._param_index[p], state["step"]),
            previous=(state.get("proj_left"), state.get("proj_right")),
        )
        self.refresh_seconds += time.perf_counter() - started
        self.refresh_count += 1
        # Stored in the dot's dtype (a no-op, the same tensor, for a refresh that kept the old projector).
        dtype = projector_dtype(p.dtype)
        return tuple(None if t is None else t.to(dtype) for t in projectors)

    def _after_refresh(self, group: dict, p: torch.Tensor, state: dict, side: str, previous: tuple, new: tuple) -> None:
        """Schedule the next refresh (adaptive) and carry the moments into the new basis (``moments_on_refresh``)."""
        first = previous == (None, None)
        # A skipped refresh (non-finite gradient) returns the previous projectors themselves.
        skipped = not first and all(n is o for n, o in zip(new, previous))
        if self.refresh == "adaptive":
            gap = group["update_proj_gap"]
            if first:
                state["proj_gap"] = gap
                state["next_refresh"] = first_adaptive_refresh(state["step"], gap, self._stagger_offset(group, p))
            else:
                if not skipped:  # a skipped refresh measured nothing: the gap stays
                    overlap = moments_refresh.subspace_overlap(previous, new)
                    state["proj_gap"] = adaptive_gap(
                        state["proj_gap"], overlap, threshold=self.adaptive_threshold, min_gap=gap,
                        max_gap=self.max_update_proj_gap or MAX_GAP_FACTOR * gap,
                    )
                state["next_refresh"] = state["step"] + state["proj_gap"]
            state["refreshes"] = state.get("refreshes", 0) + 1
        if first or skipped or self.moments_on_refresh == "keep":
            return
        if self.moments_on_refresh == "reset":
            shape = low_rank_shape(tuple(_matrix(p).shape), side, self._galore_rank(group, p))
            self._init_moments(state, p, shape, side, group)
            state["moments_reset_at"] = state["step"]
        else:
            self._rotate_moments(state, side, *moments_refresh.transitions(previous, new))

    second_moment_rule = "square"
    """How ``moments_on_refresh="rotate"`` maps the second moment (``refresh.SECOND_MOMENT_RULES``):
    C²v, which beat SubTrack++'s rule in the quality study (``bench/results/*-refresh-study.md``)."""

    def _rotate_moments(self, state: dict, side: str, left, right) -> None:
        moments_refresh.rotate_adam_state(state, side, left, right, self.second_moment_rule)

    @staticmethod
    def _bias_step(state: dict) -> int:
        """Updates since the moments were last zeroed (``moments_on_refresh="reset"``): their bias correction's t."""
        return state["step"] - state.get("moments_reset_at", 0)

    def _stagger_offset(self, group: dict, p: torch.Tensor) -> int:
        if not self.stagger:
            return 0
        return stagger_offset(self._galore_position[p], len(self._galore_position), group["update_proj_gap"])

    def _refresh_due(self, group: dict, p: torch.Tensor, state: dict) -> bool:
        if "rank" not in group or p.dim() < 2:
            return False
        if not self._is_projected(state):
            return True
        if self.refresh == "adaptive":
            return state["step"] >= state["next_refresh"]
        return refresh_due(state["step"], group["update_proj_gap"], self._stagger_offset(group, p))

    def refresh_counts(self) -> dict[str, int]:
        """``{"refreshes": made, "fixed_schedule": the fixed schedule's count over the same updates}``, summed over
        the GaLore parameters; their difference is what ``refresh="adaptive"`` saved."""
        made = fixed = 0
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p, {})
                if not self._is_projected(state):
                    continue
                expected = fixed_refresh_count(state["step"], group["update_proj_gap"], self._stagger_offset(group, p))
                fixed += expected
                made += state["refreshes"] if self.refresh == "adaptive" else expected
        return {"refreshes": made, "fixed_schedule": fixed}

    # ------------------------------------------------------------------- step

    def _update(self, group: dict, p: torch.Tensor, grad: torch.Tensor, grad_is_projected: bool) -> None:
        """One update of ``p`` from its full gradient, or from its low-rank gradient when projected."""
        state = self.state[p]
        state["step"] += 1
        # An N-d parameter whose trailing dimensions cannot be viewed as one (a
        # channels_last conv weight, say) is stepped in a contiguous copy and written
        # back: stepping the copy a reshape makes would silently drop the update.
        work = p if p.dim() <= 2 or p.is_contiguous() else p.contiguous()
        self._run_step(group, work, state, grad, grad_is_projected)
        if work is not p:
            p.copy_(work)

    def _run_step(self, group, p, state, grad, grad_is_projected):
        raise NotImplementedError

    keeps_nonfinite_flag = False
    """Whether the state holds the persistent step-stamped ``nonfinite_flag`` (the Adam classes)."""

    supports_capturable = False
    """Whether ``capturable=True`` is implemented (``_capturable_step``): the classes whose step functions take
    ``device_scalars``."""

    bnb_eps = False
    """capturable: whether eps is scaled by √(1-β2ᵗ) (bitsandbytes, the 8-bit class) in every step."""

    def _device_scalars(self, state: dict) -> dict:
        """The ``device_scalars`` keyword of the step functions: none unless capturable."""
        if not self.capturable:
            return {}
        return {"device_scalars": self._device_steps.by_state[id(state)]}

    @staticmethod
    def _flag_args(state: dict, p: torch.Tensor) -> dict:
        """``flag``/``stamp`` of the step functions: the persistent flag (made here for an FSDP2
        state) and ``step``, which grows by one every update, so a flag set at an earlier step
        reads as clear."""
        flag = state.get("nonfinite_flag")
        if flag is None:
            flag = state["nonfinite_flag"] = torch.zeros((), dtype=torch.int32, device=p.device)
        return dict(flag=flag, stamp=state["step"])

    @staticmethod
    def _step_operands(p: torch.Tensor, state: dict, grad: torch.Tensor, grad_is_projected: bool):
        """``(param, grad, projection kwargs)`` as the step functions take them: matrices when projected."""
        projection = dict(proj_left=state.get("proj_left"), proj_right=state.get("proj_right"))
        if projection["proj_left"] is None and projection["proj_right"] is None:
            return p, grad, projection
        return _matrix(p), (grad if grad_is_projected else _matrix(grad)), projection

    @staticmethod
    def _is_projected(state: dict) -> bool:
        return "proj_left" in state or "proj_right" in state

    def _low_rank_grad(self, p: torch.Tensor, state: dict, grad: torch.Tensor) -> torch.Tensor:
        """The gradient as the moments see it: projected (fp32) for GaLore, else ``grad`` itself."""
        if not self._is_projected(state):
            return grad
        precision = self.param_groups[self._group_index[p]]["matmul_precision"]
        return _backend_module(self.backend, p).project(
            _matrix(grad), state.get("proj_left"), state.get("proj_right"), matmul_precision=precision,
        )

    @torch.no_grad()
    def step(self, closure=None):
        """Performs one optimization step.

        In layerwise mode the hooks already did; this runs ``closure`` and, with
        ``accumulation_steps > 1``, ends the accumulation windows that some parameter
        did not complete. Call it at the end of each window, as Trainer does.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.layerwise:
            if getattr(self, "grad_scale", None) is not None:
                raise guardrails.grad_scaler_error()
            # FSDP2's hooks free each gradient they consume; one still here was set by hand, as
            # torch.distributed.checkpoint does to create the state it loads into (zero gradients, lr 0).
            unconsumed = [(g, p) for g in self.param_groups for p in g["params"] if distributed.is_sharded(p) and p.grad is not None]
            if unconsumed:
                distributed.sharded_step(self, unconsumed)
            self._flush_windows()
            self._end_step()
            return loss
        ready, sharded = [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._check_grad(p, p.grad)
                if distributed.is_sharded(p):  # FSDP2: updated from its gradient shard, in place
                    sharded.append((group, p))
                    continue
                state = self._ensure_state(group, p)
                reduced = self._reduced_low_rank.pop(p, None)
                if reduced is not None:  # no refresh is due: the hook checked before reducing in low rank
                    ready.append((group, p, reduced, True))
                    continue
                self._maybe_refresh(group, p, state, p.grad)
                ready.append((group, p, p.grad, False))
        if sharded and self.capturable:
            raise ValueError("capturable=True does not support FSDP2 (DTensor) parameters")
        if self.capturable:
            return self._capturable_step(ready, loss)
        if sharded:
            if ready and (self.max_grad_norm is not None or self.track_grad_norm):
                raise ValueError("max_grad_norm / track_grad_norm with both FSDP2 (DTensor) and plain parameters is not supported yet")
            distributed.sharded_step(self, sharded)
        if self.max_grad_norm is None and not self.track_grad_norm:
            for group, p, grad, projected in self._update_galore_together(self._update_small_together(ready)):
                self._update(group, p, grad, grad_is_projected=projected)
        else:
            self._clip_and_update([
                (group, p, grad if projected else self._low_rank_grad(p, self.state[p], grad))
                for group, p, grad, projected in ready
            ])
        self._end_step()
        return loss

    def _capturable_step(self, ready: list, loss):
        """The updates of a capturable ``step()``: device scalars first, then the launches (``optim/capturable.py``).

        Under CUDA graph capture nothing runs, so the host step counts are left as they
        were and ``replay`` advances them; the parameters captured are remembered for it.
        """
        from .. import kernels  # as _backend_module: Triton is imported only where it runs

        if self.track_grad_norm:
            raise ValueError("capturable=True does not support track_grad_norm")
        stepped = [(group, p) for group, p, _, _ in ready]
        if any(_backend_module(self.backend, p) is not kernels for _, p in stepped):
            raise ValueError("capturable=True needs the Triton kernels: CUDA parameters (or backend='triton' "
                             "under TRITON_INTERPRET=1)")
        captured = bool(stepped) and capturable_steps.capturing(stepped[0][1].device)
        host_steps = [(self.state[p], self.state[p]["step"]) for _, p in stepped]
        self._device_steps.prepare(stepped)
        for group, p, grad, projected in self._update_small_together(ready):
            self._update(group, p, grad, grad_is_projected=projected)
        self._end_step()
        self._steps_to_refresh = None
        if captured:
            for state, step in host_steps:
                state["step"] = step
            self._device_steps.advance([self._param_index[p] for _, p in stepped], by=-1)
            self._captured_params = [p for _, p in stepped]
        return loss

    def _steps_until_refresh(self) -> int:
        """Steps that can run before the one that refreshes some projector (0: the next one does)."""
        until = None
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    if p.grad is not None:
                        return 0  # its first step creates its state (and projector)
                    continue
                if self._galore_rank(group, p) is None:
                    continue
                if not self._is_projected(state):
                    return 0
                if self.refresh == "adaptive":
                    steps = max(state["next_refresh"] - state["step"], 0)
                else:
                    steps = -(state["step"] + self._stagger_offset(group, p)) % group["update_proj_gap"]
                until = steps if until is None else min(until, steps)
        return 10**18 if until is None else until

    def refresh_due_next(self) -> bool:
        """True when the next ``step()`` refreshes some projector (or creates some state), so it must
        run eagerly rather than as the replay of a captured CUDA graph (``capturable=True``; README)."""
        return self._steps_until_refresh() == 0

    def replay(self, graph: "torch.cuda.CUDAGraph") -> None:
        """Replay ``graph``, which captured a steady ``step()`` of this optimizer (``capturable=True``), and
        advance the host's step counts as that step does. Refuses when a refresh is due: run ``step()`` then."""
        if self._captured_params is None:
            raise ValueError("replay needs a graph that captured a step() of this capturable optimizer")
        if self._steps_to_refresh is None:
            self._steps_to_refresh = self._steps_until_refresh()
        if self._steps_to_refresh == 0:
            raise ValueError("a projector refresh is due at this step: run optimizer.step() eagerly, not replay")
        graph.replay()
        for p in self._captured_params:
            self.state[p]["step"] += 1
        self._device_steps.advance([self._param_index[p] for p in self._captured_params])
        self._steps_to_refresh -= 1

    def _multi_tensor_kind(self, state: dict) -> str | None:
        """Which multi-tensor step updates a small plain parameter with this state: "fp32"
        (``multi_tensor_adamw_step``), "8bit" (``multi_tensor_adamw8bit_step``) or None (none)."""
        return None

    def _run_multi_tensor(self, group: dict, kind: str, items: list, table) -> None:
        raise NotImplementedError

    def _cached_table(self, cache: dict, key: tuple, table_class: str, p: torch.Tensor):
        """The table cache (``MultiTensorTable``, ``GroupedTable``) of a batched launch, kept across
        steps in ``cache`` under ``key``; None for the reference backend, which needs none."""
        table_cls = getattr(_backend_module(self.backend, p), table_class, None)
        return None if table_cls is None else cache.setdefault(key, table_cls())

    def _update_small_together(self, ready: list) -> list:
        """Update the small plain parameters of ``ready`` (``step()``'s items) in one multi-tensor
        launch per (group, state kind, param dtype, grad dtype, step); return the other items.

        Small: no projector, at most ``MULTI_TENSOR_MAX_NUMEL`` values, contiguous parameter
        and gradient (the norms and biases). Each parameter keeps its own state, step and
        non-finite skip, exactly as ``_update`` would. Layerwise mode updates each parameter
        from its own hook, so it does not batch.
        """
        batches: dict = {}
        rest = []
        for group, p, grad, projected in ready:
            state = self.state[p]
            kind = self._multi_tensor_kind(state)
            small = (kind is not None and not projected and not self._is_projected(state)
                     and self._galore_rank(group, p) is None and p.numel() <= MULTI_TENSOR_MAX_NUMEL
                     and p.is_contiguous() and grad.is_contiguous() and grad.layout == torch.strided)
            if not small:
                rest.append((group, p, grad, projected))
                continue
            launch = (self._group_index[p], kind, p.dtype, grad.dtype, p.device)
            batches.setdefault(launch + (state["step"], self._bias_step(state)), []).append((p, grad))
        for (group_index, kind, *launch), items in batches.items():
            for p, _ in items:
                self.state[p]["step"] += 1
            table = self._cached_table(self._multi_tensor_tables, (group_index, kind, *launch[:3]), "MultiTensorTable",
                                       items[0][0])
            self._run_multi_tensor(self.param_groups[group_index], kind, items, table)
        return rest

    def _grouped_kind(self, state: dict) -> str | None:
        """Which grouped step updates a GaLore matrix with this state: "fp32"
        (``grouped_galore_adamw_step``), "8bit" (``grouped_galore_adamw8bit_step``) or None (none)."""
        return None

    def _run_grouped(self, group: dict, kind: str, side: str, items: list, table) -> None:
        raise NotImplementedError

    def _grouped_launch_key(self, group: dict, p: torch.Tensor, grad: torch.Tensor, projected: bool) -> tuple | None:
        """``(layout, steps)``: what members of one grouped launch share, or None for a parameter
        stepped alone (a projected gradient (accumulation), the full side, an N-d parameter, a
        class without grouped steps, ``_grouped_kind``). ``layout`` holds
        everything the grouped launcher compares across members, so a group it is given never fails
        its checks; ``steps`` the step and the bias-correction step."""
        state = self.state[p]
        kind = self._grouped_kind(state)
        if kind is None or projected or p.dim() != 2 or grad.layout != torch.strided:
            return None
        left, right = state.get("proj_left"), state.get("proj_right")
        if (left is None) == (right is None):
            return None
        side, proj = ("left", left) if left is not None else ("right", right)
        moments = (state["exp_avg"], state["exp_avg_sq"]) if kind == "fp32" else (
            state["exp_avg_codes"], state["exp_avg_absmax"], state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"])
        flag = state.get("nonfinite_flag")
        if flag is None:  # made by the first per-parameter step (an FSDP2 state)
            return None
        # Members' addresses must agree modulo 16 bytes (kernels/grouped_steps.py): views into one
        # buffer (DDP's gradient_as_bucket_view) may not. The moments' shapes follow from the
        # parameter's and the projector's, and the flag and skip count are 0-d.
        layout = (self._group_index[p], kind, side, p.device, p.dtype, grad.dtype, proj.dtype,
                  p.shape, p.stride(), grad.stride(), proj.shape, proj.stride(),
                  *(t.stride() for t in moments),
                  *(t.data_ptr() % 16 for t in (p, grad, proj, *moments, flag, state["nonfinite_skips"])))
        return layout, (state["step"], self._bias_step(state))

    def _update_galore_together(self, ready: list) -> list:
        """Update the GaLore matrices of ``ready`` that share a launch key (``_grouped_launch_key``) in
        one grouped step per key; return the other items. Each matrix keeps its own state, step and
        non-finite skip, and its update is bitwise the one ``_update`` would make."""
        batches: dict = {}
        rest = []
        for item in ready:
            key = self._grouped_launch_key(*item)
            if key is None:
                rest.append(item)
            else:
                batches.setdefault(key, []).append(item)
        for (layout, _), items in batches.items():
            # Parameters over one storage (two Parameters of one tensor) would race in one launch:
            # all but the first of each step alone, one after the other, as without grouping. (Meta
            # tensors, which the launch-budget tests step, have no storage and all read address 0.)
            seen: set = set()
            members = []
            for item in items:
                address = item[1].data_ptr()
                (rest if address in seen and item[1].device.type != "meta" else members).append(item)
                seen.add(address)
            if len(members) == 1:
                rest.extend(members)
                continue
            for _, p, _, _ in members:
                self.state[p]["step"] += 1
            group_index, kind, side = layout[:3]
            table = self._cached_table(self._grouped_tables, layout, "GroupedTable", members[0][1])
            self._run_grouped(self.param_groups[group_index], kind, side, [(p, grad) for _, p, grad, _ in members],
                              table)
        return rest

    def _end_step(self) -> None:
        """Close a ``step()``: publish the window's gradient norm, count a step with skipped updates."""
        if self._grad_sq_sum is not None:
            self._last_grad_norm, self._grad_sq_sum = self._grad_sq_sum.sqrt(), None
        counts = [s["nonfinite_skips"] for s in self.state.values() if "nonfinite_skips" in s]
        if not counts:
            return
        total = torch.stack([c.to(counts[0].device) for c in counts]).sum()
        previous = self._nonfinite_at_last_step
        skipped = total > (0 if previous is None else previous.to(total.device))
        if self.capturable and previous is not None:  # in place: a CUDA graph keeps these addresses
            self._skipped_steps.add_(skipped)
            previous.copy_(total)
            return
        self._skipped_steps = skipped.long() if self._skipped_steps is None else self._skipped_steps + skipped.to(self._skipped_steps.device)
        self._nonfinite_at_last_step = total

    def _clip_and_update(self, items: list) -> None:
        """Clip the gradients-as-consumed by their global L2 norm (with ``max_grad_norm``), then update.

        The norm is over the low-rank (projected) gradient of every GaLore
        parameter and the full gradient of every other parameter, after
        accumulation. That is the norm of what the moments are fed, and the one
        quantity layerwise mode can compute without holding full gradients.
        """
        if not items:
            return
        norms = torch.stack([torch.linalg.vector_norm(g.float()).to(items[0][2].device) for _, _, g in items])
        total = torch.linalg.vector_norm(norms)
        self._add_grad_sq(total.square())
        if self.max_grad_norm is None:
            for group, p, grad in items:
                self._update(group, p, grad, grad_is_projected=self._is_projected(self.state[p]))
            return
        coef = torch.clamp(self.max_grad_norm / (total + 1e-6), max=1.0)
        for group, p, grad in items:
            projected = self._is_projected(self.state[p])
            clipped = grad.float() * coef.to(grad.device) if projected else (grad * coef.to(grad.device, grad.dtype))
            self._update(group, p, clipped, grad_is_projected=projected)

    def _add_grad_sq(self, grad_sq: torch.Tensor) -> None:
        self._grad_sq_sum = grad_sq if self._grad_sq_sum is None else self._grad_sq_sum + grad_sq.to(self._grad_sq_sum.device)

    # -------------------------------------------------------------- layerwise

    @torch.no_grad()
    def _on_grad_ready(self, p: torch.Tensor) -> None:
        """post_accumulate_grad hook: fold ``p.grad`` into the accumulation, free it, update on the k-th pass."""
        if distributed.is_sharded(p):
            distributed.sharded_grad_ready(self, p)
            return
        if not self._world_checked:
            distributed.check_layerwise_world(self)
            self._world_checked = True
        grad = p.grad
        p.grad = None
        if grad is None:
            return
        group = self.param_groups[self._group_index[p]]
        self._check_grad(p, grad)
        state = self._ensure_state(group, p)
        if self.clip_strategy == "two_pass":
            self._two_pass_grad_ready(group, p, state, grad)
            return
        state["micro_steps"] = state.get("micro_steps", 0) + 1
        last = state["micro_steps"] == self.accumulation_steps
        # A refresh needs the full accumulated gradient, so refresh-due parameters
        # accumulate at full size; the others accumulate their low-rank projection.
        full_size = self._refresh_due(group, p, state)
        if self.accumulation_steps == 1 and self.max_grad_norm is None:
            self._maybe_refresh(group, p, state, grad)
            state["micro_steps"] = 0
            if self.track_grad_norm:
                grad = self._low_rank_grad(p, state, grad)
                self._add_grad_sq(torch.linalg.vector_norm(grad.float()).square())
            self._update(group, p, grad, grad_is_projected=self.track_grad_norm and self._is_projected(state))
            return
        contribution = grad if full_size else self._low_rank_grad(p, state, grad)
        if "grad_accum" in state:
            state["grad_accum"].add_(contribution)
        else:
            state["grad_accum"] = contribution.clone() if contribution is grad else contribution
        if last:
            self._windows_completed += 1
            self._queue_for_clipping([self._end_window(group, p, state)])

    def _two_pass_grad_ready(self, group: dict, p: torch.Tensor, state: dict, grad: torch.Tensor) -> None:
        """``clip_strategy="two_pass"`` (``optim/layerwise.py``): take the norm, drop the gradient, or update.

        The norm is that of what the moments see, as with "hold". A refresh due at this
        step is computed in the first pass (the projector is needed for the norm), without
        touching the state, and kept until the update pass applies it: one SVD per refresh,
        and an overflow step changes no state. The price is the new projectors of the
        refresh-due parameters held between the two passes.
        """
        kind = self.pass_kind()
        if kind == "norm":
            view = state
            if self._refresh_due_here(group, p, state):
                projectors = self._refreshed_projectors(group, p, state, grad)
                self._norm_pass_projectors[p] = projectors
                view = {**state, **{key: value for key, value in zip(("proj_left", "proj_right"), projectors)
                                    if value is not None}}
            self.add_to_norm(self._low_rank_grad(p, view, grad))
            return
        projectors = self._norm_pass_projectors.pop(p, None)
        if kind == "skip":
            return
        # The same graph twice: the norm pass refreshed exactly where this pass is due to.
        self._maybe_refresh(group, p, state, grad, projectors=projectors)
        projected = self._is_projected(state)
        consumed = self._low_rank_grad(p, state, grad)
        multiplier = self.grad_multiplier(grad.device)
        if multiplier is not None:  # unscale and clip in fp32: 1/loss_scale may be subnormal in fp16
            consumed = consumed.float() * multiplier
        self._update(group, p, consumed, grad_is_projected=projected)

    def _max_norm(self):
        return self.max_grad_norm

    def _set_max_norm(self, value):
        self.max_grad_norm = value

    def _check_two_pass_allowed(self):
        if self.clip_strategy != "two_pass":
            raise ValueError("grad_norm/fused_backward are the two backward passes of clip_strategy='two_pass' (layerwise=True)")

    def _record_grad_norm(self, total):
        self._last_grad_norm = total

    def _end_window(self, group: dict, p: torch.Tensor, state: dict):
        """Consume ``p``'s accumulated gradient: update now, or return ``(group, p, grad)`` to clip first."""
        # A refresh was due when the window started (the step does not change within
        # it), so the accumulation is full-size and the projector is refreshed from it.
        full_size = self._refresh_due(group, p, state)
        accumulated = state.pop("grad_accum")
        state["micro_steps"] = 0
        projected = not full_size and self._is_projected(state)
        if full_size:
            self._maybe_refresh(group, p, state, accumulated)
            if self.max_grad_norm is not None or self.track_grad_norm:
                accumulated, projected = self._low_rank_grad(p, state, accumulated), self._is_projected(state)
        if self.max_grad_norm is None:
            if self.track_grad_norm:
                self._add_grad_sq(torch.linalg.vector_norm(accumulated.float()).square())
            self._update(group, p, accumulated, grad_is_projected=projected)
            return None
        return group, p, accumulated

    def _queue_for_clipping(self, items: list) -> None:
        items = [item for item in items if item is not None]
        if not items:
            return
        self._pending.extend(items)
        if not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)

    def _flush_windows(self) -> None:
        """Layerwise ``step()``: end every window some parameter did not complete.

        A parameter that missed some backward passes of the window (a routed expert, a
        branch not taken) or a window cut short (the end of an epoch) is updated with
        what it accumulated, as the ordinary optimizer's ``step()`` would do. With
        ``max_grad_norm`` these late updates are clipped together, by their own norm.
        """
        items = [
            self._end_window(group, p, self.state[p])
            for group in self.param_groups
            for p in group["params"]
            if self.state.get(p, {}).get("micro_steps")
        ]
        if items and self._windows_completed == 0:
            guardrails.warn_windows_all_incomplete(self.accumulation_steps)
        self._windows_completed = 0
        items = [item for item in items if item is not None]
        if items:
            self._clip_and_update(items)

    def remove_hooks(self) -> None:
        """Detach the layerwise hooks, e.g. before building another optimizer on the same model."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        guardrails.release_layerwise_hooks(self)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``torch.optim.Optimizer.zero_grad``; also drops clipped layerwise updates
        still waiting for the end of a backward pass that raised."""
        self._pending.clear()
        self._callback_queued = False
        self._reduced_low_rank.clear()
        super().zero_grad(set_to_none=set_to_none)

    def _finish_backward(self) -> None:
        """End of backward in layerwise mode with clipping: clip all held gradients together, then update."""
        pending, self._pending, self._callback_queued = self._pending, [], False
        with torch.no_grad():
            self._clip_and_update(pending)

    # ------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict:
        """As ``torch.optim.Optimizer.state_dict``; the state of FSDP2 (DTensor) parameters is
        DTensors (``distributed.sharded_state_dict``), which ``torch.distributed.checkpoint`` saves
        and reshards."""
        return distributed.sharded_state_dict(self, super().state_dict())

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, but every state tensor keeps its saved dtype.

        torch casts floating state to the parameter's dtype, which would round
        fp32 moments of a bf16 parameter to bf16 (its projectors are cast, to what a
        refresh stores, by the check that follows). Every state is then
        checked against this optimizer's own fresh state for its parameter (keys,
        shapes, dtypes), naming the parameter; fp32 moments loaded into the 8-bit
        class are quantized (``checkpoint.validate_loaded_state``). The fp16 loss scaler of
        ``clip_strategy="two_pass"`` is restored with it.
        """
        guardrails.check_saved_groups(self, state_dict, self.HYPERPARAMETERS)
        state_dict = self._take_loss_scaler_state(state_dict)
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # checkpoints from before the key multiplied fp32 in IEEE
            group.setdefault("matmul_precision", self.defaults["matmul_precision"])
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if torch.is_tensor(value):
                    self.state[p][key] = value.to(device=p.device, copy=True)
        distributed.localize_loaded_state(self)
        checkpoint.validate_loaded_state(self)


class GaLoreAdamW(_GaLoreOptimizer):
    """AdamW with GaLore gradient projection, fp32 moments; drop-in for ``galore_torch.GaLoreAdamW``.

    Param groups with a ``rank`` key (and ``update_proj_gap``, ``scale``,
    ``proj_type``) are GaLore groups: each matrix's gradient is projected onto a
    rank-``rank`` subspace refreshed every ``update_proj_gap`` steps, Adam runs
    there, and the update is projected back times ``scale``. Other groups are
    plain AdamW. The math is galore-torch's (``reference/galore_adamw.py``).

    Beyond galore-torch:
        backend: "auto" (Triton kernels for CUDA tensors, PyTorch otherwise),
            "torch", or "triton" (forced; on CPU tensors only under TRITON_INTERPRET=1).
        svd: "randomized" (default; ``galore_kernels.randomized_svd``, warm-started
            from the previous projector) or "exact" (``torch.linalg.svd``, as
            galore-torch). A group key ``svd`` overrides it.
        seed: base of the per-(parameter, step) sketch seeds of the randomized SVD.
        stagger: spread the parameters' refreshes evenly across the gap.
        layerwise: update each parameter in backward and free its gradient.
        accumulation_steps: (layerwise) backward passes per update. The hooks
            accumulate the projected r×n gradient in fp32 (full size, in the
            gradient's dtype, for non-GaLore parameters and for GaLore parameters
            whose projector is refreshed at that update).
        max_grad_norm: clip by the global L2 norm of the gradients the moments
            see (low-rank for GaLore parameters, full for the others; after
            accumulation). In layerwise mode ``clip_strategy`` says how:
            "hold" (the updates wait for the end of backward, holding those
            gradients meanwhile) or "two_pass" (``optimizer.grad_norm(loss)`` then
            ``optimizer.fused_backward(loss)``: a first backward takes only the
            norm, the second updates; no gradient is held; accumulation_steps=1).
        moments_on_refresh: what a projector refresh does to the low-rank moments:
            "keep" (galore-torch), "reset" (zeroed, bias correction restarted) or
            "rotate" (carried into the new basis; ``optim/refresh.py``).
        refresh: "fixed" (every ``update_proj_gap`` steps) or "adaptive": after each
            refresh the gap doubles (up to ``max_update_proj_gap``, default
            8 × ``update_proj_gap``) while the new projector's overlap
            ‖P_newᵀP_old‖²_F / r with the old exceeds ``adaptive_threshold``, and
            halves (down to ``update_proj_gap``) otherwise. ``refresh_counts()``
            reports the refreshes made and saved.
        loss_scaling: (two_pass) fp16 dynamic loss scaling, lomo-optim's
            ``DynamicLossScaler(**loss_scale_args)``; an overflow found by the first
            pass skips the step exactly (no parameter or moment changes). An fp16
            loss turns it on by itself.
        matmul_precision: how the Triton kernels multiply fp32 projection operands
            (fp32 parameters, and the ``full`` side): "tf32x3" (default; tensor cores,
            about fp32's accuracy) or "ieee" (CUDA-core FMA). A group key of the same
            name overrides it; 16-bit operands always multiply in their dtype.
        capturable: the kernels read the step, bias corrections and lr from device
            memory, so a steady ``step()`` can be captured in a CUDA graph and replayed
            with ``replay(graph)``; refresh steps run eagerly (``refresh_due_next()``).
            lr may be a 0-d tensor that a scheduler writes in place. Not with
            ``layerwise``, ``max_grad_norm`` or ``backend="torch"`` (README, "CUDA graphs").
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        no_deprecation_warning: bool = False,
        *,
        backend: str = "auto",
        svd: str = "randomized",
        seed: int = 0,
        stagger: bool = False,
        layerwise: bool = False,
        accumulation_steps: int = 1,
        max_grad_norm: float | None = None,
        moments_on_refresh: str = "keep",
        refresh: str = "fixed",
        adaptive_threshold: float = ADAPTIVE_THRESHOLD,
        max_update_proj_gap: int | None = None,
        clip_strategy: str = "hold",
        loss_scaling: bool = False,
        loss_scale_args: dict | None = None,
        matmul_precision: str = "tf32x3",
        capturable: bool = False,
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias)
        super().__init__(
            params, defaults, backend=backend, svd=svd, seed=seed, stagger=stagger,
            layerwise=layerwise, accumulation_steps=accumulation_steps, max_grad_norm=max_grad_norm,
            moments_on_refresh=moments_on_refresh, refresh=refresh, adaptive_threshold=adaptive_threshold,
            max_update_proj_gap=max_update_proj_gap,
            clip_strategy=clip_strategy, loss_scaling=loss_scaling, loss_scale_args=loss_scale_args,
            matmul_precision=matmul_precision, capturable=capturable,
        )

    def _init_moments(self, state, p, shape, side, group):
        _init_fp32_moments(state, shape, p.device)

    def _run_step(self, group, p, state, grad, grad_is_projected):
        beta1, beta2 = group["betas"]
        target, grad, projection = self._step_operands(p, state, grad, grad_is_projected)
        _backend_module(self.backend, p).galore_adamw_step(
            target, grad, state["exp_avg"], state["exp_avg_sq"], state["nonfinite_skips"], **projection,
            lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
            step=self._bias_step(state), scale=group.get("scale", 1.0), correct_bias=group["correct_bias"],
            grad_is_projected=grad_is_projected, matmul_precision=group["matmul_precision"],
            **self._flag_args(state, p), **self._device_scalars(state),
        )

    keeps_nonfinite_flag = True
    supports_capturable = True

    def _multi_tensor_kind(self, state):
        return "fp32"

    def _grouped_kind(self, state):
        # A subclass with a _run_step of its own (Natural GaLore) steps each matrix alone through it.
        return "fp32" if type(self)._run_step is GaLoreAdamW._run_step else None

    def _run_grouped(self, group, kind, side, items, table):
        beta1, beta2 = group["betas"]
        state = self.state[items[0][0]]
        _backend_module(self.backend, items[0][0]).grouped_galore_adamw_step(
            *_multi_tensor_lists(items, self.state, ("exp_avg", "exp_avg_sq")),
            **_grouped_projectors(items, self.state, side),
            lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
            step=self._bias_step(state), stamp=state["step"], scale=group.get("scale", 1.0),
            correct_bias=group["correct_bias"], matmul_precision=group["matmul_precision"], table=table,
        )

    def _run_multi_tensor(self, group, kind, items, table):
        beta1, beta2 = group["betas"]
        state = self.state[items[0][0]]
        _backend_module(self.backend, items[0][0]).multi_tensor_adamw_step(
            *_multi_tensor_lists(items, self.state, ("exp_avg", "exp_avg_sq")),
            lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
            step=self._bias_step(state), stamp=state["step"], correct_bias=group["correct_bias"], table=table,
            **self._device_scalars(state),
        )


class GaLoreAdamW8bit(_GaLoreOptimizer):
    """GaLore with bitsandbytes-style blockwise 8-bit AdamW; drop-in for ``galore_torch.GaLoreAdamW8bit``.

    Moments of at least ``min_8bit_size`` values are stored as uint8 codes of the
    dynamic maps with an fp32 absmax per 256-value block; smaller ones stay fp32,
    as in bitsandbytes. The math is galore-torch's (``reference/galore_adamw8bit.py``
    and ``reference/adamw8bit.py``). Options beyond galore-torch as in
    ``GaLoreAdamW``. bitsandbytes arguments that change the algorithm
    (``amsgrad``, ``percentile_clipping``, non-blockwise, paged) are refused
    rather than ignored.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        optim_bits: int = 32,
        args=None,
        min_8bit_size: int = quant.MIN_8BIT_SIZE,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        is_paged: bool = False,
        *,
        backend: str = "auto",
        svd: str = "randomized",
        seed: int = 0,
        stagger: bool = False,
        layerwise: bool = False,
        accumulation_steps: int = 1,
        max_grad_norm: float | None = None,
        moments_on_refresh: str = "keep",
        refresh: str = "fixed",
        adaptive_threshold: float = ADAPTIVE_THRESHOLD,
        max_update_proj_gap: int | None = None,
        clip_strategy: str = "hold",
        loss_scaling: bool = False,
        loss_scale_args: dict | None = None,
        matmul_precision: str = "tf32x3",
        capturable: bool = False,
    ):
        # galore-torch passes optim_bits=8 to bitsandbytes whatever it is given, so it is accepted and unused.
        for name, value, supported in (
            ("amsgrad", amsgrad, False),
            ("percentile_clipping", percentile_clipping, 100),
            ("block_wise", block_wise, True),
            ("is_paged", is_paged, False),
        ):
            if value != supported:
                raise ValueError(f"{name}={value!r} is not supported by GaLoreAdamW8bit (only {supported!r})")
        if args is not None:
            raise ValueError("args (a bitsandbytes GlobalOptimManager config) is not supported; pass None")
        if not (isinstance(min_8bit_size, int) and min_8bit_size >= 0):
            raise ValueError(f"min_8bit_size must be an int >= 0, got {min_8bit_size!r}")
        self.min_8bit_size = min_8bit_size
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(
            params, defaults, backend=backend, svd=svd, seed=seed, stagger=stagger,
            layerwise=layerwise, accumulation_steps=accumulation_steps, max_grad_norm=max_grad_norm,
            moments_on_refresh=moments_on_refresh, refresh=refresh, adaptive_threshold=adaptive_threshold,
            max_update_proj_gap=max_update_proj_gap,
            clip_strategy=clip_strategy, loss_scaling=loss_scaling, loss_scale_args=loss_scale_args,
            matmul_precision=matmul_precision, capturable=capturable,
        )

    def _init_moments(self, state, p, shape, side, group):
        if math.prod(shape) < self.min_8bit_size:
            _init_fp32_moments(state, shape, p.device)
            return
        codes_shape = shape if side is None else quant.lowrank_layout(shape, side)
        num_blocks = -(-math.prod(shape) // quant.BLOCK_SIZE)
        for name in ("exp_avg", "exp_avg_sq"):
            # Zero absmax dequantizes every code to 0: the moments start at zero, as bitsandbytes'.
            state[f"{name}_codes"] = torch.zeros(codes_shape, dtype=torch.uint8, device=p.device)
            state[f"{name}_absmax"] = torch.zeros(num_blocks, dtype=torch.float32, device=p.device)

    def _run_step(self, group, p, state, grad, grad_is_projected):
        beta1, beta2 = group["betas"]
        backend = _backend_module(self.backend, p)
        hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"], step=self._bias_step(state),
                     **self._flag_args(state, p), **self._device_scalars(state))
        target, grad, projection = self._step_operands(p, state, grad, grad_is_projected)
        if "exp_avg" in state:
            # Under min_8bit_size: bitsandbytes' 32-bit Adam (eps scaled by sqrt(1 - beta2^t)).
            backend.galore_adamw_step(
                target, grad, state["exp_avg"], state["exp_avg_sq"], state["nonfinite_skips"], **projection,
                scale=group.get("scale", 1.0), bnb_eps=True, grad_is_projected=grad_is_projected,
                matmul_precision=group["matmul_precision"], **hyper,
            )
            return
        quantized = (state["exp_avg_codes"], state["exp_avg_absmax"], state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"])
        if self._is_projected(state):
            backend.galore_adamw8bit_step(
                target, grad, *quantized, state["nonfinite_skips"], **projection,
                scale=group["scale"], grad_is_projected=grad_is_projected,
                matmul_precision=group["matmul_precision"], **hyper,
            )
        else:
            backend.adamw8bit_step(p, grad, *quantized, state["nonfinite_skips"], **hyper)

    keeps_nonfinite_flag = True
    supports_capturable = True
    bnb_eps = True

    def _multi_tensor_kind(self, state):
        return "fp32" if "exp_avg" in state else "8bit"

    def _grouped_kind(self, state):
        if type(self)._run_step is not GaLoreAdamW8bit._run_step:  # as GaLoreAdamW's
            return None
        return "fp32" if "exp_avg" in state else "8bit"

    def _run_grouped(self, group, kind, side, items, table):
        beta1, beta2 = group["betas"]
        state = self.state[items[0][0]]
        backend = _backend_module(self.backend, items[0][0])
        hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                     step=self._bias_step(state), stamp=state["step"], scale=group["scale"],
                     matmul_precision=group["matmul_precision"], table=table, **_grouped_projectors(items, self.state, side))
        if kind == "fp32":  # under min_8bit_size: bitsandbytes' 32-bit Adam, as _run_step
            backend.grouped_galore_adamw_step(*_multi_tensor_lists(items, self.state, ("exp_avg", "exp_avg_sq")),
                                              bnb_eps=True, **hyper)
            return
        keys = ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax")
        backend.grouped_galore_adamw8bit_step(*_multi_tensor_lists(items, self.state, keys), **hyper)

    def _run_multi_tensor(self, group, kind, items, table):
        beta1, beta2 = group["betas"]
        state = self.state[items[0][0]]
        backend = _backend_module(self.backend, items[0][0])
        hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                     step=self._bias_step(state), stamp=state["step"], table=table, **self._device_scalars(state))
        if kind == "fp32":  # under min_8bit_size: bitsandbytes' 32-bit Adam, as _run_step
            backend.multi_tensor_adamw_step(*_multi_tensor_lists(items, self.state, ("exp_avg", "exp_avg_sq")),
                                            bnb_eps=True, **hyper)
            return
        keys = ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax")
        backend.multi_tensor_adamw8bit_step(*_multi_tensor_lists(items, self.state, keys), **hyper)
