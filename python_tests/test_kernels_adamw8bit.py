"""kernels/adamw8bit.py against reference/adamw8bit.py.

Each step starts the kernel and the reference from the same parameter and moments,
so every comparison is of one step; the inputs evolve over the steps, as in training.
Without a GPU the kernels run under ``TRITON_INTERPRET=1`` on CPU tensors.

Tolerances, and why:
* codes: equal except where the normalized moment sits on a midpoint to within the
  last bit, which a fused multiply-add on the GPU can move; at most 0.1% of codes
  may differ, each by exactly one.
* absmax: rtol 1e-6 (a few ulp of the same fp32 max).
* fp32 parameters: rtol 1e-5 / atol 1e-6 (op order and FMA only).
* 16-bit parameters are judged by the update, which a tolerance on the parameter
  itself would hide (one bf16 ulp of a unit-normal weight is larger than a step).
  The parameters are drawn at ``PARAM_SCALE`` (an LLM's init std), weight decay is
  large enough that lr·wd spans ulps, and every check first asserts that the fp32
  twin's update spans several ulps, so that dropping any term of the step shows.
  Then, in L2 norm over the tensor, the kernel's error against the fp32 twin (the
  reference run on an fp32 copy) is at most twice the reference's own error in that
  dtype (its one rounding, as flash-attention measures it). That bound also holds
  the GaLore kernels' bf16 normalized update N: measured, the kernels' error is at
  most 1.09× the reference's own, ranks 1 to 300, bf16 and fp16.
"""

from __future__ import annotations

import os

import pytest
import torch

import triton
import triton.language as tl

from galore_kernels import reference
from galore_kernels.kernels import adamw8bit_step
from galore_kernels.kernels.adamw8bit import _nearest_code
from galore_kernels.quant import create_dynamic_map, dynamic_map_midpoints, quantize_blockwise

# Under the interpreter the kernels take CPU tensors; otherwise they need CUDA ones.
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)
PARAM_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
WEIGHT_DECAYS = [0.0, 1.0]
"""lr·wd = 1e-2 moves a bf16 weight by 2-3 ulps: a smaller decay is below 16-bit resolution."""
PARAM_SCALE = 0.02
"""Parameters are drawn as LLM weights are initialized: then a step is several 16-bit ulps."""
MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10}


@pytest.fixture(autouse=True)
def needs_triton_backend(request):
    """Skip, at run time rather than import, where the kernels cannot run (or would take hours)."""
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("Triton kernels need a CUDA device or TRITON_INTERPRET=1")
    if DEVICE == "cpu" and request.node.get_closest_marker("gpu") is not None:
        pytest.skip("LLaMA-size shapes are for native GPU runs, not the interpreter")


def assert_codes_close(codes: torch.Tensor, ref_codes: torch.Tensor, name: str) -> None:
    """Equal up to ties: at most 0.1% differ (at least one allowed), each by one code."""
    diff = (codes.int() - ref_codes.int()).abs()
    assert diff.max().item() <= 1, f"{name}: a code differs by {diff.max().item()}"
    allowed = max(1, codes.numel() // 1000)
    assert (diff > 0).sum().item() <= allowed, f"{name}: {(diff > 0).sum().item()} codes differ"


def ulp(values: torch.Tensor) -> torch.Tensor:
    """The spacing of ``values.dtype`` (16-bit) at each element, as fp32."""
    _, exponent = torch.frexp(values.float())
    return torch.ldexp(torch.ones_like(values, dtype=torch.float32), exponent - 1 - MANTISSA_BITS[values.dtype])


def assert_param_close(out: torch.Tensor, ref_lowp: torch.Tensor, ref_fp32: torch.Tensor,
                       before: torch.Tensor) -> None:
    """fp32: tight; 16-bit: judged by the update, see the module doc. ``before``: the parameter before the step."""
    assert out.dtype == ref_lowp.dtype
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref_lowp, rtol=1e-5, atol=1e-6)
        return
    update = torch.linalg.vector_norm(ref_fp32 - before.float())
    resolution = torch.linalg.vector_norm(ulp(before))
    assert update >= 2 * resolution, f"the test's update ({update:.3g}) is below the parameter's ulps ({resolution:.3g})"
    error = torch.linalg.vector_norm(out.float() - ref_fp32).item()
    bound = 2 * torch.linalg.vector_norm(ref_lowp.float() - ref_fp32).item()
    assert error <= bound, f"{out.dtype} parameter error {error:.3g} > {bound:.3g} (update {update:.3g})"


def random_8bit_state(numel: int, generator: torch.Generator, device=DEVICE):
    """Quantized moments of a plausible size: |exp_avg| ~ 0.1, exp_avg_sq ~ 1e-2."""
    exp_avg = torch.randn(numel, generator=generator) * 0.1
    exp_avg_sq = torch.rand(numel, generator=generator) * 1e-2
    exp_avg_state = quantize_blockwise(exp_avg.to(device), signed=True)
    return (*exp_avg_state, *quantize_blockwise(exp_avg_sq.to(device), signed=False))


def clone_all(tensors):
    return [t.clone() for t in tensors]


def run_steps(param, grads, *, weight_decay, steps_from=1, generator=None, check=True):
    """Steps kernel and reference from common inputs; returns the kernel's final tensors."""
    generator = generator or torch.Generator().manual_seed(1)
    states = random_8bit_state(param.numel(), generator, param.device)
    skips = torch.zeros((), dtype=torch.int64, device=param.device)
    for step, grad in enumerate(grads, start=steps_from):
        ref_param, ref_states, ref_skips = param.clone(), clone_all(states), skips.clone()
        before, ref_fp32 = param.clone(), param.to(torch.float32, copy=True)
        reference.adamw8bit_step(ref_param, grad, *ref_states, ref_skips, weight_decay=weight_decay, step=step, **HYPER)
        reference.adamw8bit_step(
            ref_fp32, grad, *clone_all(states), skips.clone(), weight_decay=weight_decay, step=step, **HYPER
        )
        adamw8bit_step(param, grad, *states, skips, weight_decay=weight_decay, step=step, **HYPER)
        if check:
            assert_param_close(param, ref_param, ref_fp32, before)
            assert_codes_close(states[0], ref_states[0], "exp_avg_codes")
            assert_codes_close(states[2], ref_states[2], "exp_avg_sq_codes")
            torch.testing.assert_close(states[1], ref_states[1], rtol=1e-6, atol=0)
            torch.testing.assert_close(states[3], ref_states[3], rtol=1e-6, atol=0)
            assert torch.equal(skips, ref_skips)
    return param, states, skips


@pytest.mark.parametrize("dtype", PARAM_DTYPES)
@pytest.mark.parametrize("weight_decay", WEIGHT_DECAYS)
@pytest.mark.parametrize("shape", [(37, 53), (300,), (4, 3, 5, 7)])
def test_matches_reference(dtype, weight_decay, shape):
    gen = torch.Generator().manual_seed(0)
    param = (torch.randn(shape, generator=gen) * PARAM_SCALE).to(DEVICE, dtype)
    grads = [torch.randn(shape, generator=gen).to(DEVICE, dtype) for _ in range(3)]
    run_steps(param, grads, weight_decay=weight_decay)


@pytest.mark.parametrize("dtype", PARAM_DTYPES)
def test_strided_param_and_grad(dtype):
    """A transposed parameter and gradients that are transposed views or slices."""
    gen = torch.Generator().manual_seed(2)
    param = (torch.randn(53, 37, generator=gen) * PARAM_SCALE).to(DEVICE, dtype).t()
    grads = [
        torch.randn(53, 37, generator=gen).to(DEVICE, dtype).t(),
        torch.randn(37, 106, generator=gen).to(DEVICE, dtype)[:, ::2],
        torch.randn(40, 60, generator=gen).to(DEVICE, dtype)[2:39, 3:56],
    ]
    out, *_ = run_steps(param, grads, weight_decay=1.0)
    assert out.stride() == (1, 37)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_gradient_skips_step(bad):
    gen = torch.Generator().manual_seed(3)
    param = torch.randn(37, 53, generator=gen).to(DEVICE)
    states = random_8bit_state(param.numel(), gen)
    skips = torch.full((), 5, dtype=torch.int64, device=DEVICE)
    grad = torch.randn(37, 53, generator=gen).to(DEVICE)
    grad[30, 50] = bad
    before = [param.clone(), *clone_all(states)]
    adamw8bit_step(param, grad, *states, skips, weight_decay=0.1, step=4, **HYPER)
    for after, original in zip([param, *states], before):
        assert torch.equal(after, original)
    assert skips.item() == 6


def test_exact_ties_and_sign_fix():
    """Codes at exact midpoints round down; a tiny negative momentum never decodes as +0.

    With beta1 = 0 the new exp_avg is the gradient itself, and a block whose largest
    |g| is 1 normalizes by exactly 1, so block 0 holds every signed midpoint exactly.
    """
    midpoints = dynamic_map_midpoints(True, torch.device("cpu"))
    grad = torch.cat([torch.ones(1), midpoints, torch.tensor([1.0, -1e-9, 1e-9]), torch.zeros(253)]).to(DEVICE)
    param = torch.zeros(grad.shape, device=DEVICE)
    zero = torch.zeros(grad.shape, device=DEVICE)
    states = [*quantize_blockwise(zero, signed=True), *quantize_blockwise(zero, signed=False)]
    ref_states = clone_all(states)
    hyper = dict(lr=1e-3, beta1=0.0, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)
    adamw8bit_step(param, grad, *states, torch.zeros((), dtype=torch.int64, device=DEVICE), **hyper)
    reference.adamw8bit_step(
        torch.zeros_like(param), grad, *ref_states, torch.zeros((), dtype=torch.int64, device=DEVICE), **hyper
    )
    codes = states[0].long().cpu()
    assert torch.equal(codes[1:256], torch.arange(255))
    assert codes[257].item() == 126 and codes[258].item() == 127
    for state, ref_state in zip(states, ref_states):
        assert torch.equal(state, ref_state)


@triton.jit
def _nearest_code_kernel(x_ptr, out_ptr, midpoints_ptr, numel, SIGNED: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, _nearest_code(x, midpoints_ptr, SIGNED), mask=mask)


@pytest.mark.parametrize("signed", [True, False])
def test_nearest_code_is_exact(signed):
    """The arithmetic code estimate plus one neighbour comparison equals the exact nearest-code search
    on every code, every midpoint and their fp32 neighbours (±40 ulps), and on random values of every decade."""
    qmap = create_dynamic_map(signed)
    midpoints = (qmap[:-1] + qmap[1:]) / 2
    bits = torch.cat([qmap, midpoints]).view(torch.int32)
    gen = torch.Generator().manual_seed(7)
    sign = torch.randint(0, 2, (100_000,), generator=gen) * 2 - 1 if signed else 1
    x = torch.cat([(bits + offset).view(torch.float32) for offset in range(-40, 41)]
                  + [torch.exp(-18 * torch.rand(100_000, generator=gen)) * sign, torch.tensor([0.0, -0.0, 1.0])])
    x = x[(x.abs() <= 1) & ((x >= 0) | signed)]
    out = torch.full(x.shape, -1, dtype=torch.int32, device=DEVICE)
    _nearest_code_kernel[(triton.cdiv(x.numel(), 1024),)](
        x.to(DEVICE), out, dynamic_map_midpoints(signed, torch.device(DEVICE)), x.numel(), SIGNED=signed, BLOCK=1024
    )
    expected = torch.bucketize(x, midpoints, right=False)
    mismatched = (out.cpu().long() != expected).sum().item()
    assert mismatched == 0, f"{mismatched} of {x.numel()} codes differ from the nearest"


def test_deterministic():
    gen = torch.Generator().manual_seed(4)
    param = torch.randn(37, 53, generator=gen).to(DEVICE, torch.bfloat16)
    grads = [torch.randn(37, 53, generator=gen).to(DEVICE, torch.bfloat16) for _ in range(2)]
    first = run_steps(param.clone(), grads, weight_decay=0.1, check=False)
    second = run_steps(param.clone(), grads, weight_decay=0.1, check=False)
    for a, b in zip([first[0], *first[1]], [second[0], *second[1]]):
        assert torch.equal(a, b)


def test_input_validation():
    param = torch.randn(37, 53, device=DEVICE)
    grad = torch.randn(37, 53, device=DEVICE)
    codes1, absmax1, codes2, absmax2 = random_8bit_state(param.numel(), torch.Generator().manual_seed(5))
    skips = torch.zeros((), dtype=torch.int64, device=DEVICE)
    kwargs = dict(weight_decay=0.0, step=1, **HYPER)
    with pytest.raises(TypeError, match="exp_avg_codes"):
        adamw8bit_step(param, grad, codes1.int(), absmax1, codes2, absmax2, skips, **kwargs)
    with pytest.raises(TypeError, match="param"):
        adamw8bit_step(param.double(), grad, codes1, absmax1, codes2, absmax2, skips, **kwargs)
    with pytest.raises(ValueError, match="grad"):
        adamw8bit_step(param, grad[:, :-1], codes1, absmax1, codes2, absmax2, skips, **kwargs)
    with pytest.raises(ValueError, match="exp_avg_sq_absmax"):
        adamw8bit_step(param, grad, codes1, absmax1, codes2, absmax2[:-1], skips, **kwargs)
    with pytest.raises(ValueError, match="nonfinite_skips"):
        adamw8bit_step(param, grad, codes1, absmax1, codes2, absmax2, skips.view(1), **kwargs)
    with pytest.raises(ValueError, match="step"):
        adamw8bit_step(param, grad, codes1, absmax1, codes2, absmax2, skips, **{**kwargs, "step": 0})


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4096, 4096), (4096, 11008), (11008, 4096)])
def test_llama7b_shapes_on_gpu(shape, dtype):
    gen = torch.Generator().manual_seed(6)
    param = (torch.randn(shape, generator=gen) * PARAM_SCALE).to("cuda", dtype)
    grads = [torch.randn(shape, generator=gen).to("cuda", dtype) for _ in range(3)]
    run_steps(param, grads, weight_decay=0.1, generator=gen)
