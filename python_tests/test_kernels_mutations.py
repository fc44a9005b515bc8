"""The kernel tests can fail: each planted defect must make them fail.

For every kernel family (plain 8-bit AdamW, GaLore with fp32 moments, GaLore with
8-bit moments) the launcher is patched, in turn, to

* skip the write: the parameter is left as it was (the moments still update);
* drop weight decay;
* drop the update (the step size is zero; the decay still applies);
* use the wrong bias correction (that of the next step);

and the family's reference comparison, ``test_matches_reference`` of its test
module, must then raise, for fp32 and for each 16-bit dtype: the 16-bit tests once
passed with the update missing (a tolerance on the parameter, wider than a step).
The multi-tensor and grouped launchers (many tensors in one launch) are patched to
drop a tensor, skip them all for one non-finite gradient, or use the wrong bias
correction, and their comparisons with the per-tensor kernels must raise.
"""

from __future__ import annotations

import contextlib
import functools
from unittest import mock

import pytest
import test_kernels_adamw8bit
import test_kernels_galore_adamw
import test_kernels_galore_adamw8bit
import torch
from test_kernels_adamw8bit import needs_triton_backend  # noqa: F401 (autouse fixture)

import galore_kernels.kernels.adamw8bit as adamw8bit_module
import galore_kernels.kernels.galore_adamw as galore_adamw_module
import galore_kernels.kernels.galore_adamw8bit as galore_adamw8bit_module

# family -> (module whose launcher and host scalars are patched, launcher name, scalars function name)
FAMILIES = {
    "adamw8bit": (adamw8bit_module, "adamw8bit_step", "adam8bit_scalars"),
    "galore_adamw": (galore_adamw_module, "galore_adamw_step", "adamw_scalars"),
    "galore_adamw8bit": (galore_adamw8bit_module, "galore_adamw8bit_step", "adam8bit_scalars"),
}
MUTATIONS = ["skip_write", "drop_weight_decay", "drop_update", "wrong_bias_correction"]


def family_tests(family: str, dtype: torch.dtype):
    """The family's reference comparisons, with weight decay on (the test calls its module's launcher)."""
    if family == "adamw8bit":
        return [functools.partial(test_kernels_adamw8bit.test_matches_reference, dtype, 1.0, (37, 53))]
    module = test_kernels_galore_adamw if family == "galore_adamw" else test_kernels_galore_adamw8bit
    return [functools.partial(module.test_matches_reference, side, 1.0, dtype) for side in ("left", "right", "full")]


@contextlib.contextmanager
def planted(family: str, mutation: str):
    """Patch ``family``'s launcher (as its test module imported it) or host scalars with ``mutation``."""
    module, launcher_name, scalars_name = FAMILIES[family]
    launcher = getattr(module, launcher_name)
    scalars = getattr(module, scalars_name)
    test_module = {"adamw8bit": test_kernels_adamw8bit, "galore_adamw": test_kernels_galore_adamw,
                   "galore_adamw8bit": test_kernels_galore_adamw8bit}[family]

    if mutation == "skip_write":
        def mutant(param, *args, **kwargs):
            before = param.clone()
            launcher(param, *args, **kwargs)
            param.copy_(before)

        target = (test_module, launcher_name, mutant)
    elif mutation == "drop_weight_decay":
        target = (test_module, launcher_name, lambda *args, **kwargs: launcher(*args, **{**kwargs, "weight_decay": 0.0}))
    elif mutation == "drop_update":
        target = (module, scalars_name, lambda **kwargs: {**scalars(**kwargs), "step_size": 0.0})
    else:
        target = (module, scalars_name, lambda **kwargs: scalars(**{**kwargs, "step": kwargs["step"] + 1}))
    with mock.patch.object(*target):
        yield


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mutation", MUTATIONS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_planted_defect_fails_the_kernel_tests(family, mutation, dtype):
    for run_test in family_tests(family, dtype):
        with planted(family, mutation), pytest.raises(AssertionError):
            run_test()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_unmutated_kernel_tests_pass(family):
    """The control: the same tests, unpatched, pass (so a failure above is the defect's)."""
    for dtype in (torch.float32, torch.bfloat16):
        for run_test in family_tests(family, dtype):
            run_test()


def skipping_all_for_one(launcher):
    """``launcher`` of many tensors, mutated so that one non-finite gradient skips every tensor of the launch."""
    def mutant(params, grads, *rest, **kwargs):
        bad = any(not torch.isfinite(g).all() for g in grads)
        launcher(params, [g * float("nan") if bad else g for g in grads], *rest, **kwargs)

    return mutant


MULTI_TENSOR_MUTATIONS = ["drop_last_tensor", "wrong_bias_correction", "one_skip_for_the_batch"]


@contextlib.contextmanager
def planted_multi_tensor(kind: str, mutation: str):
    """Patch the multi-tensor launcher (as ``kernels`` exports it) or its host scalars with ``mutation``."""
    import galore_kernels.kernels as kernels_package
    import galore_kernels.kernels.multi_tensor as multi_tensor_module

    name = "multi_tensor_adamw_step" if kind == "fp32" else "multi_tensor_adamw8bit_step"
    launcher = getattr(kernels_package, name)
    if mutation == "drop_last_tensor":  # a grid one program short
        def mutant(*lists, **kwargs):
            launcher(*(items[:-1] for items in lists), **kwargs)

        target = (kernels_package, name, mutant)
    elif mutation == "one_skip_for_the_batch":  # a non-finite tensor skips every tensor of the launch
        target = (kernels_package, name, skipping_all_for_one(launcher))
    else:
        scalars_name = "adamw_scalars" if kind == "fp32" else "adam8bit_scalars"
        scalars = getattr(multi_tensor_module, scalars_name)
        target = (multi_tensor_module, scalars_name, lambda **kwargs: scalars(**{**kwargs, "step": kwargs["step"] + 1}))
    with mock.patch.object(*target):
        yield


@pytest.mark.parametrize("mutation", MULTI_TENSOR_MUTATIONS)
@pytest.mark.parametrize("kind", ["fp32", "8bit"])
def test_planted_defect_fails_the_multi_tensor_tests(kind, mutation):
    import test_kernels_multi_tensor

    poison = float("nan") if mutation == "one_skip_for_the_batch" else None
    with planted_multi_tensor(kind, mutation), pytest.raises(AssertionError):
        test_kernels_multi_tensor.test_matches_per_tensor_kernels_and_reference(kind, torch.bfloat16, poison)


GROUPED_MUTATIONS = ["drop_last_member", "wrong_bias_correction", "one_skip_for_the_group"]


@contextlib.contextmanager
def planted_grouped(kind: str, mutation: str):
    """Patch the grouped launcher (as ``kernels`` exports it) or its host scalars with ``mutation``."""
    import galore_kernels.kernels as kernels_package
    import galore_kernels.kernels.grouped_steps as grouped_module

    name = "grouped_galore_adamw_step" if kind == "fp32" else "grouped_galore_adamw8bit_step"
    launcher = getattr(kernels_package, name)
    if mutation == "drop_last_member":  # a grid one member short
        def mutant(*lists, **kwargs):
            side = "proj_lefts" if kwargs.get("proj_lefts") is not None else "proj_rights"
            launcher(*(items[:-1] for items in lists), **{**kwargs, side: kwargs[side][:-1]})

        target = (kernels_package, name, mutant)
    elif mutation == "one_skip_for_the_group":  # a non-finite member skips every member of the launch
        target = (kernels_package, name, skipping_all_for_one(launcher))
    else:
        scalars_name = "adamw_launch_scalars" if kind == "fp32" else "galore8bit_launch_scalars"
        scalars = getattr(grouped_module, scalars_name)
        target = (grouped_module, scalars_name, lambda *args, **kwargs: scalars(*args, **{**kwargs, "step": kwargs["step"] + 1}))
    with mock.patch.object(*target):
        yield


@pytest.mark.parametrize("mutation", GROUPED_MUTATIONS)
@pytest.mark.parametrize("kind", ["fp32", "8bit"])
def test_planted_defect_fails_the_grouped_tests(kind, mutation):
    import test_kernels_grouped_steps

    poison = float("nan") if mutation == "one_skip_for_the_group" else None
    with planted_grouped(kind, mutation), pytest.raises(AssertionError):
        test_kernels_grouped_steps.test_matches_per_parameter_kernels_and_reference(kind, "right", torch.bfloat16, poison)
