"""``LOMO`` and ``AdaLomo``: drop-in replacements for lomo-optim 0.1.1's ``Lomo`` and ``AdaLomo``.

LOMO (arXiv 2306.09782) fuses the update into backward: each parameter is updated by
a hook as soon as its gradient is ready, and the gradient is freed at once, so at
most one full-size gradient exists at a time. The call protocol is lomo-optim's::

    optimizer = gk.AdaLomo(model, lr=1e-3, clip_grad_norm=1.0)
    loss = model(**batch).loss
    optimizer.grad_norm(loss)          # first backward: global norm and overflow only
    optimizer.fused_backward(loss, lr) # second backward: the updates

``grad_norm`` is needed with ``clip_grad_norm`` and with an fp16 loss (dynamic loss
scaling, which then defaults ``clip_grad_norm`` to 1.0 as lomo-optim does); it
is the ``two_pass`` strategy of ``layerwise.py``. An overflow (or any non-finite
gradient) found by it skips the step exactly: no parameter or state changes, and
the fp16 scale backs off. ``fused_backward(loss)`` without ``lr`` uses each group's
``lr``, so LR schedulers work; with ``lr`` it sets the groups' lr first, as lomo-optim.

State per parameter: ``step`` (int); for AdaLomo also the fp32 second moment,
``exp_avg_sq_row`` (m,) and ``exp_avg_sq_col`` (n,) for a matrix, ``exp_avg_sq`` (n,)
for a vector. The math is ``reference/lomo.py``.
"""

from __future__ import annotations

import numbers

import torch

from . import guardrails, layerwise
from .galore_adamw import BACKENDS, _backend_module


class _LomoOptimizer(layerwise.TwoPassBackward, torch.optim.Optimizer):
    """Hooks, the two-pass protocol, loss scaling and checkpoints; subclasses define state and step."""

    def __init__(self, model: torch.nn.Module, defaults: dict, *, clip_grad_norm, clip_grad_value,
                 loss_scale_args: dict | None, backend: str):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"{type(self).__name__} takes the model (an nn.Module), got {type(model).__name__}")
        for name, clip in (("clip_grad_norm", clip_grad_norm), ("clip_grad_value", clip_grad_value)):
            if clip is not None:
                guardrails.require_number(name, clip)
                if not clip > 0:
                    raise ValueError(f"{name} should be positive, got {clip}.")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self._param_names = {p: name for name, p in model.named_parameters()}
        self.model = model
        self.clip_grad_norm = clip_grad_norm
        self.clip_grad_value = clip_grad_value
        self.backend = backend
        self._init_two_pass(loss_scale_args, loss_scaling=False)
        self.last_grad_norm: torch.Tensor | None = None  # of the last grad_norm pass, a device tensor
        self._hooks = []
        self._group_of: dict[torch.Tensor, dict] = {}
        super().__init__(model.parameters(), defaults)

    def add_param_group(self, param_group: dict) -> None:
        """As torch's, but the group's hyperparameters and parameters are checked first, as the
        constructor's are, so that a bad group is refused whole instead of failing in a hook."""
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        param_group = {**param_group, "params": params}
        self._check_hyperparameters({**self.defaults, **param_group})
        for p in params:
            name, p = p if isinstance(p, tuple) else (self._param_names.get(p), p)  # torch takes (name, tensor) too
            self._check_param(f"of shape {tuple(p.shape)}" if name is None else repr(name), p)
        super().add_param_group(param_group)
        self._group_of.update((p, self.param_groups[-1]) for p in self.param_groups[-1]["params"])
        trainable = [p for p in self.param_groups[-1]["params"] if p.requires_grad]
        guardrails.claim_layerwise_hooks(self, trainable)
        self._hooks.extend(p.register_post_accumulate_grad_hook(self._on_grad_ready) for p in trainable)

    @staticmethod
    def _check_hyperparameters(group: dict) -> None:
        for name in ("lr", "weight_decay"):
            guardrails.require_number(name, group[name])
        if not group["lr"] >= 0:
            raise ValueError(f"Invalid learning rate lr={group['lr']}: must be >= 0")
        if not group["weight_decay"] >= 0:
            raise ValueError(f"Invalid weight_decay={group['weight_decay']}: must be >= 0")

    def _check_param(self, label: str, p: torch.Tensor) -> None:
        """Refuse what the hooks would fail on mid-backward (the gradient is a complex one)."""
        if p.requires_grad and p.is_complex():
            raise TypeError(f"{type(self).__name__} does not support complex parameters: parameter {label} is {p.dtype}")

    def _max_norm(self):
        return self.clip_grad_norm

    def _set_max_norm(self, value):
        self.clip_grad_norm = value

    @torch.no_grad()
    def _on_grad_ready(self, p: torch.Tensor) -> None:
        grad = p.grad
        p.grad = None
        kind = self.pass_kind()
        if grad is None or kind == "skip":
            return
        if grad.is_sparse or grad.is_complex():
            raise TypeError(f"{type(self).__name__} does not support sparse or complex gradients (shape {tuple(p.shape)})")
        if kind == "norm":
            self.add_to_norm(grad)
            return
        group = self._group_of[p]
        state = self.state[p]
        if "step" not in state:
            state.update(self._fresh_state(p))
        state["step"] += 1
        work = p if p.is_contiguous() else p.contiguous()
        self._run_step(group, work, state, grad.contiguous())
        if work is not p:
            p.copy_(work)

    def _common_args(self, group: dict, p: torch.Tensor) -> dict:
        coef = self.clip_coef.to(p.device) if self.clip_coef is not None else None
        return dict(lr=group["lr"], weight_decay=group["weight_decay"], loss_scale=self._loss_scale(),
                    clip_coef=coef, clip_grad_value=self.clip_grad_value)

    @torch.no_grad()
    def step(self, closure=None):
        """The updates run in ``fused_backward``; this only runs ``closure`` (for Trainer-style loops)."""
        if closure is not None:
            with torch.enable_grad():
                return closure()
        return None

    def remove_hooks(self) -> None:
        """Detach the hooks, e.g. before building another optimizer on the same model."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        guardrails.release_layerwise_hooks(self)

    # ------------------------------------------------------------ checkpoint

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``; state tensors keep their (fp32) dtype and are
        checked against this optimizer's fresh state; the fp16 loss scaler is restored."""
        guardrails.check_saved_groups(self, state_dict, self.defaults)
        state_dict = self._take_loss_scaler_state(state_dict)
        super().load_state_dict(state_dict)
        self._group_of = {p: group for group in self.param_groups for p in group["params"]}  # new group dicts
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if torch.is_tensor(value):
                    self.state[p][key] = value.to(device=p.device, copy=True)
        for index, p in enumerate(params):
            if p in self.state and self.state[p]:
                self._validate_state(index, p, self.state[p])

    def _validate_state(self, index: int, p: torch.Tensor, state: dict) -> None:
        fresh = self._fresh_state(p)
        label = f"parameter {index} (shape {tuple(p.shape)})"
        if set(state) != set(fresh):
            raise ValueError(f"{label}: the checkpoint's state has keys {sorted(state)}, {type(self).__name__} expects {sorted(fresh)}")
        if isinstance(state["step"], bool) or not isinstance(state["step"], int):
            raise ValueError(f"{label}: state 'step' should be an int, got {state['step']!r}")
        for key, value in fresh.items():
            if torch.is_tensor(value) and (state[key].shape != value.shape or state[key].dtype != value.dtype):
                raise ValueError(f"{label}: state {key!r} is {tuple(state[key].shape)} {state[key].dtype}, "
                                 f"expected {tuple(value.shape)} {value.dtype}")

    def _fresh_state(self, p: torch.Tensor) -> dict:
        raise NotImplementedError

    def _run_step(self, group, p, state, grad):
        raise NotImplementedError


class LOMO(_LomoOptimizer):
    """LOMO: SGD fused into backward; drop-in for ``lomo_optim.Lomo`` (same arguments and defaults).

    Beyond lomo-optim: ``backend`` ("auto": the Triton kernel for CUDA tensors, PyTorch
    otherwise; "torch"; "triton"), a skipped step on any non-finite gradient found by
    ``grad_norm``, the fp16 scale that also grows back after ``scale_window`` clean steps,
    and ``fused_backward(loss)`` taking the scheduler's lr.
    """

    def __init__(self, model: torch.nn.Module, lr: float = 1e-3, clip_grad_norm: float | None = None,
                 clip_grad_value: float | None = None, weight_decay: float = 0.0, loss_scale_args: dict | None = None,
                 *, backend: str = "auto"):
        super().__init__(model, dict(lr=lr, weight_decay=weight_decay), clip_grad_norm=clip_grad_norm,
                         clip_grad_value=clip_grad_value, loss_scale_args=loss_scale_args, backend=backend)

    def _fresh_state(self, p):
        return {"step": 0}

    def _run_step(self, group, p, state, grad):
        _backend_module(self.backend, p).lomo_step(p, grad, **self._common_args(group, p))


class AdaLomo(_LomoOptimizer):
    """AdaLomo: Adafactor-style factored second moment with grouped update normalization, fused into
    backward; drop-in for ``lomo_optim.AdaLomo`` 0.1.1 (same arguments, order and defaults).

    loss_scale: the static loss scale of lomo-optim 0.1.1 (a power of two, exact) for
    fp32/bf16 losses; an fp16 loss uses dynamic scaling with ``loss_scale_args`` instead.
    eps: (eps1, eps2): eps1 is added to g², eps2 floors the parameter RMS that scales lr.
    Matrices keep row and column statistics; vectors a full second moment; parameters
    with more than two dimensions are refused (lomo-optim cannot step them either).
    """

    def __init__(self, model: torch.nn.Module, lr: float = 1e-3, loss_scale: float = 2**10,
                 eps: tuple[float, float] = (1e-30, 1e-3), clip_threshold: float = 1.0, decay_rate: float = -0.8,
                 clip_grad_norm: float | None = None, clip_grad_value: float | None = None, weight_decay: float = 0.0,
                 *, loss_scale_args: dict | None = None, backend: str = "auto"):
        guardrails.require_number("loss_scale", loss_scale)
        if not loss_scale > 0:
            raise ValueError(f"loss_scale must be > 0, got {loss_scale}")
        self.static_loss_scale = float(loss_scale)
        eps = tuple(eps) if isinstance(eps, list) else eps
        defaults = dict(lr=lr, weight_decay=weight_decay, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate)
        super().__init__(model, defaults, clip_grad_norm=clip_grad_norm, clip_grad_value=clip_grad_value,
                         loss_scale_args=loss_scale_args, backend=backend)

    @staticmethod
    def _check_hyperparameters(group: dict) -> None:
        _LomoOptimizer._check_hyperparameters(group)
        eps = group["eps"]
        # eps1 > 0: with 0, an exactly-zero gradient row gives rsqrt(0)·0 = NaN, spread over the parameter.
        if not (isinstance(eps, (tuple, list)) and len(eps) == 2
                and all(isinstance(e, numbers.Real) and not isinstance(e, bool) for e in eps)
                and eps[0] > 0 and eps[1] >= 0):
            raise ValueError(f"eps must be (eps1, eps2), numbers with eps1 > 0 and eps2 >= 0, got {eps!r}")
        for name in ("clip_threshold", "decay_rate"):
            guardrails.require_number(name, group[name])
        if not group["clip_threshold"] > 0:
            raise ValueError(f"clip_threshold must be > 0, got {group['clip_threshold']}")
        if not group["decay_rate"] < 0:
            raise ValueError(f"decay_rate must be < 0 (beta = 1 - step^decay_rate), got {group['decay_rate']}")

    def _check_param(self, label, p):
        super()._check_param(label, p)
        if p.dim() not in (1, 2):
            raise ValueError(f"AdaLomo steps vectors and matrices only; parameter {label} has shape {tuple(p.shape)}")

    def _loss_scale(self) -> float:
        return self.static_loss_scale if self.loss_scaler is None else self.loss_scaler.loss_scale

    def _fresh_state(self, p):
        state = {"step": 0}
        if p.dim() == 2:
            state["exp_avg_sq_row"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
            state["exp_avg_sq_col"] = torch.zeros(p.shape[1], dtype=torch.float32, device=p.device)
        else:
            state["exp_avg_sq"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
        return state

    def _run_step(self, group, p, state, grad):
        eps1, eps2 = group["eps"]
        _backend_module(self.backend, p).adalomo_step(
            p, grad, state.get("exp_avg_sq_row"), state.get("exp_avg_sq_col"), state.get("exp_avg_sq"),
            step=state["step"], clip_threshold=group["clip_threshold"], decay_rate=group["decay_rate"],
            eps1=eps1, eps2=eps2, **self._common_args(group, p),
        )
