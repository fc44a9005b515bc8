"""torch.ops.galore_kernels.randomized_svd through galore_kernels.svd.randomized_svd.

The oracle is the exact SVD in float64. Quality is the captured energy of the rank-r basis on the
side GaLore projects on (the smaller dimension):
    energy = ||B^T A||_F^2 / sum_{i <= r} sigma_i^2,  B = U (m <= n) or Vh^T (m > n),
which is 1 for the exact truncated SVD and below 1 for any other rank-r basis.
"""

import math
import subprocess
import sys

import pytest
import torch

from galore_kernels.svd import DEFAULT_SEED, randomized_svd

# fp32 CholeskyQR2 / Householder leave orthogonality errors of a few ulps times sqrt(k): 1e-5 is
# about 100 ulps, far below what a missing second pass (~1e-3 and worse) would leave.
ORTHONORMALITY_TOL = 1e-5


def gradient_like(m, n, alpha, seed=0, noise_floor=1e-2):
    """(m, n) fp32 with singular values i^-alpha on random orthonormal factors plus a noise floor."""
    generator = torch.Generator().manual_seed(seed)
    p = min(m, n)
    left = torch.linalg.qr(torch.randn(m, p, generator=generator, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(n, p, generator=generator, dtype=torch.float64)).Q
    spectrum = torch.arange(1, p + 1, dtype=torch.float64) ** -alpha
    noise = torch.randn(m, n, generator=generator, dtype=torch.float64) * (noise_floor / (math.sqrt(m) + math.sqrt(n)))
    return ((left * spectrum) @ right.T + noise).float()


def captured_energy(A, U, Vh, rank):
    A = A.double()
    m, n = A.shape
    projected = U[:, :rank].double().T @ A if m <= n else A @ Vh[:rank].double().T
    top = torch.linalg.svdvals(A)[:rank].square().sum()
    return (projected.square().sum() / top).item()


def orthonormality_error(columns):
    gram = columns.double().T @ columns.double()
    return (gram - torch.eye(gram.shape[0], dtype=torch.float64)).abs().max().item()


def assert_valid_factors(A, U, S, Vh, rank):
    m, n = A.shape
    assert U.shape == (m, rank) and S.shape == (rank,) and Vh.shape == (rank, n)
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    assert orthonormality_error(U) < ORTHONORMALITY_TOL
    assert orthonormality_error(Vh.T) < ORTHONORMALITY_TOL
    assert (S >= 0).all()
    assert (S[1:] <= S[:-1]).all()


# --- quality with the defaults ---------------------------------------------------------------


@pytest.mark.parametrize("shape, rank", [((512, 1376), 64), ((1376, 512), 64), ((300, 700), 32), ((301, 97), 24)])
@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.5])
def test_energy_on_power_law_spectra(shape, rank, alpha):
    A = gradient_like(*shape, alpha)
    U, S, Vh = randomized_svd(A, rank)
    assert_valid_factors(A, U, S, Vh, rank)
    assert captured_energy(A, U, Vh, rank) >= 0.99


def tiny_lm_gradients():
    """Weight gradients of a one-layer causal transformer LM after a few Adam steps on tokens of a
    sparse Markov chain (structured text, not uniform noise), d_model 128, feed-forward 344."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    d_model, d_ff, vocab, seq, batch, steps = 128, 344, 256, 32, 16, 10
    successors = torch.randint(0, vocab, (vocab, 4), generator=generator)
    embed = torch.nn.Embedding(vocab, d_model)
    layer = torch.nn.TransformerEncoderLayer(d_model, 4, d_ff, dropout=0.0, batch_first=True)
    head = torch.nn.Linear(d_model, vocab)
    model = torch.nn.ModuleList([embed, layer, head])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(seq)
    for _ in range(steps):
        tokens = torch.empty(batch, seq + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, vocab, (batch,), generator=generator)
        for t in range(seq):
            tokens[:, t + 1] = successors[tokens[:, t], torch.randint(0, 4, (batch,), generator=generator)]
        logits = head(layer(embed(tokens[:, :-1]), src_mask=mask, is_causal=True))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.dim() == 2 and name != "0.weight"}


def test_energy_on_transformer_gradients():
    gradients = tiny_lm_gradients()
    assert len(gradients) == 5  # attention in/out, both feed-forward layers, LM head
    for name, grad in gradients.items():
        rank = min(grad.shape) // 4  # GaLore's usual rank: a quarter of the hidden size
        U, S, Vh = randomized_svd(grad, rank)
        assert_valid_factors(grad, U, S, Vh, rank)
        assert captured_energy(grad, U, Vh, rank) >= 0.99, name


@pytest.mark.parametrize("shape", [(512, 1376), (1376, 512)])
def test_warm_start_beats_cold_start_with_one_more_iteration(shape):
    m, n = shape
    rank = 64
    previous = gradient_like(m, n, alpha=0.5, seed=1)
    generator = torch.Generator().manual_seed(2)
    change = torch.randn(m, n, generator=generator)
    current = previous + change * (0.05 * previous.norm() / change.norm())
    prev_U, _, prev_Vh = randomized_svd(previous, rank)
    init = prev_U if m <= n else prev_Vh  # the projector GaLore keeps between refreshes
    for power_iters in (0, 1):
        warm = randomized_svd(current, rank, power_iters=power_iters, init=init)
        cold = randomized_svd(current, rank, power_iters=power_iters + 1)
        assert_valid_factors(current, *warm, rank)
        warm_energy = captured_energy(current, warm[0], warm[2], rank)
        cold_energy = captured_energy(current, cold[0], cold[2], rank)
        assert warm_energy >= cold_energy, (power_iters, warm_energy, cold_energy)


@pytest.mark.parametrize("side", ["left", "right"])
def test_warm_start_from_either_side_and_wider_init(side):
    A = gradient_like(200, 260, alpha=1.0, seed=3)
    rank, oversample = 16, 8
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    # 40 columns: more than rank + oversample, so only the leading 24 may be used.
    init = U[:, :40] if side == "left" else Vh[:40]
    warm = randomized_svd(A, rank, oversample=oversample, power_iters=0, init=init)
    assert_valid_factors(A, *warm, rank)
    # Starting from the exact bases, zero iterations already give the exact truncated SVD.
    torch.testing.assert_close(warm[1], S[:rank], rtol=1e-4, atol=1e-6)
    assert captured_energy(A, warm[0], warm[2], rank) > 1 - 1e-5


def test_square_init_is_a_left_basis():
    A = gradient_like(120, 120, alpha=1.0, seed=4)
    rank = 8
    U, _, _ = torch.linalg.svd(A)
    # (120, 120) fits both ways. As a left basis its leading columns are the exact singular
    # vectors, so zero iterations capture everything; read as a right basis, its leading rows
    # would be unrelated directions and capture far less.
    warm = randomized_svd(A, rank, oversample=0, power_iters=0, init=U)
    assert captured_energy(A, warm[0], warm[2], rank) > 1 - 1e-5


# --- the factorization itself ----------------------------------------------------------------


@pytest.mark.parametrize("shape", [(150, 410), (410, 150)])
def test_factors_approximate_the_truncated_svd(shape):
    A = gradient_like(*shape, alpha=1.0, seed=5)
    rank = 20
    U, S, Vh = randomized_svd(A, rank)
    assert_valid_factors(A, U, S, Vh, rank)
    exact_U, exact_S, exact_Vh = torch.linalg.svd(A.double(), full_matrices=False)
    torch.testing.assert_close(S.double(), exact_S[:rank], rtol=1e-3, atol=0)
    best = (exact_U[:, :rank] * exact_S[:rank]) @ exact_Vh[:rank]
    ours = (U.double() * S.double()) @ Vh.double()
    # Eckart-Young: no rank-r matrix is closer to A than `best`; ours is within 0.1% of it.
    assert (A.double() - ours).norm() <= 1.001 * (A.double() - best).norm()


@pytest.mark.parametrize("power_iters", [0, 1, 2])
@pytest.mark.parametrize("alpha", [1.0, 2.0, 3.0])
def test_orthonormal_on_ill_conditioned_sketches(power_iters, alpha):
    # A fast-decaying spectrum makes the sketch's columns nearly parallel (condition numbers up to
    # 1e6 for alpha 3), where one CholeskyQR pass leaves errors of eps * cond^2 and the Householder
    # fallback has to take over.
    A = gradient_like(400, 600, alpha, seed=16, noise_floor=1e-6)
    U, S, Vh = randomized_svd(A, 48, power_iters=power_iters)
    assert_valid_factors(A, U, S, Vh, 48)


def test_rank_equal_to_min_dimension_is_exact():
    A = gradient_like(40, 70, alpha=1.0, seed=6)
    U, S, Vh = randomized_svd(A, 40)
    assert_valid_factors(A, U, S, Vh, 40)
    torch.testing.assert_close((U * S) @ Vh, A, atol=1e-5, rtol=0)


# --- determinism ---------------------------------------------------------------------------


def test_deterministic_per_seed_and_leaves_the_global_rng_alone():
    A = gradient_like(200, 330, alpha=0.5, seed=7)
    rng_state = torch.get_rng_state()
    first = randomized_svd(A, 16, seed=1234)
    torch.manual_seed(99)  # the global RNG must not matter
    again = randomized_svd(A, 16, seed=1234)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    torch.set_rng_state(rng_state)
    randomized_svd(A, 16, seed=1234)
    assert torch.equal(torch.get_rng_state(), rng_state)
    other = randomized_svd(A, 16, seed=1235)
    assert not torch.equal(first[0], other[0])
    default = randomized_svd(A, 16)
    for a, b in zip(default, randomized_svd(A, 16, seed=DEFAULT_SEED)):
        assert torch.equal(a, b)


# --- degenerate inputs -----------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(64, 48), (48, 64)])
def test_zero_matrix(shape):
    A = torch.zeros(shape)
    U, S, Vh = randomized_svd(A, 10)
    assert_valid_factors(A, U, S, Vh, 10)
    assert torch.equal(S, torch.zeros(10))


@pytest.mark.parametrize("shape", [(90, 130), (130, 90)])
def test_rank_deficient_matrix(shape):
    generator = torch.Generator().manual_seed(8)
    A = torch.randn(shape[0], 3, generator=generator) @ torch.randn(3, shape[1], generator=generator)
    U, S, Vh = randomized_svd(A, 16)
    assert_valid_factors(A, U, S, Vh, 16)
    exact = torch.linalg.svdvals(A.double())
    torch.testing.assert_close(S[:3].double(), exact[:3], rtol=1e-4, atol=0)
    assert S[3:].max() < 1e-4 * S[0]
    torch.testing.assert_close((U * S) @ Vh, A, atol=1e-4 * A.abs().max().item(), rtol=0)


@pytest.mark.parametrize("shape", [(1, 37), (37, 1), (1, 1), (2, 3)])
def test_tiny_shapes(shape):
    A = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    rank = min(shape)
    U, S, Vh = randomized_svd(A, rank)
    assert_valid_factors(A, U, S, Vh, rank)
    torch.testing.assert_close((U * S) @ Vh, A, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_input_dtypes_compute_in_fp32(dtype):
    A = gradient_like(160, 240, alpha=1.0, seed=10)
    low = A.to(dtype)
    U, S, Vh = randomized_svd(low, 16)
    assert_valid_factors(A, U, S, Vh, 16)
    # Same as upcasting first: the op's work is fp32 whatever the input.
    expected = randomized_svd(low.float(), 16)
    for ours, reference in zip((U, S, Vh), expected):
        assert torch.equal(ours, reference)


def test_non_contiguous_input():
    A = gradient_like(330, 200, alpha=1.0, seed=11)
    transposed_view = A.T.contiguous().T  # same values, column-major strides
    strided = torch.zeros(330, 400)[:, ::2]  # neither A nor A^T contiguous
    strided.copy_(A)
    reference = randomized_svd(A, 12)
    for view in (transposed_view, strided):
        assert not view.is_contiguous()
        U, S, Vh = randomized_svd(view, 12)
        assert_valid_factors(A, U, S, Vh, 12)
        torch.testing.assert_close(S, reference[1], rtol=1e-5, atol=0)
        # Columns agree up to sign.
        torch.testing.assert_close((U * reference[0]).sum(0).abs(), torch.ones(12), atol=1e-4, rtol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_gives_nan_without_raising(bad):
    A = gradient_like(50, 80, alpha=1.0, seed=12)
    A[3, 7] = bad
    U, S, Vh = randomized_svd(A, 6)
    assert U.shape == (50, 6) and S.shape == (6,) and Vh.shape == (6, 80)
    assert not torch.isfinite(S).all()


# --- argument checking -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, kwargs, error",
    [
        ((torch.ones(5), 1), {}, ValueError),
        ((torch.ones(2, 3, 4), 1), {}, ValueError),
        ((torch.ones(4, 5, dtype=torch.int64), 1), {}, TypeError),
        (([[1.0, 2.0]], 1), {}, TypeError),
        ((torch.ones(4, 5), 0), {}, ValueError),
        ((torch.ones(4, 5), 5), {}, ValueError),
        ((torch.ones(4, 5), 2.0), {}, TypeError),
        ((torch.ones(4, 5), True), {}, TypeError),
        ((torch.ones(4, 5), 2), {"oversample": -1}, ValueError),
        ((torch.ones(4, 5), 2), {"power_iters": -1}, ValueError),
        ((torch.ones(4, 5), 2), {"seed": 1.5}, TypeError),
        ((torch.ones(4, 5), 2), {"seed": 2**64}, ValueError),
        ((torch.ones(4, 5), 2), {"init": torch.ones(3, 3)}, ValueError),
        ((torch.ones(4, 5), 2), {"init": torch.ones(4)}, ValueError),
        ((torch.ones(4, 5), 2), {"init": torch.ones(4, 0)}, ValueError),
        ((torch.ones(4, 5), 2), {"init": torch.ones(4, 2, dtype=torch.int32)}, TypeError),
        ((torch.ones(4, 5), 2), {"init": "U"}, TypeError),
        # Sparse tensors reached the dispatcher ("Could not run ... 'SparseCPU' backend").
        ((torch.ones(4, 5).to_sparse(), 2), {}, TypeError),
        ((torch.ones(4, 5), 2), {"init": torch.ones(4, 2).to_sparse()}, TypeError),
    ],
)
def test_bad_arguments(args, kwargs, error):
    with pytest.raises(error):
        randomized_svd(*args, **kwargs)


def test_integer_like_arguments_are_accepted():
    A = gradient_like(30, 40, alpha=1.0, seed=15)
    reference = randomized_svd(A, 4, oversample=2, power_iters=1, seed=3)
    integer_tensors = randomized_svd(
        A, torch.tensor(4), oversample=torch.tensor(2), power_iters=torch.tensor(1), seed=torch.tensor(3)
    )
    for a, b in zip(reference, integer_tensors):
        assert torch.equal(a, b)


def _python(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter, where nothing has loaded the extension yet."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)


def test_operator_is_registered_on_import():
    result = _python("import galore_kernels, torch; print(torch.ops.galore_kernels.randomized_svd.default._schema)")
    assert result.returncode == 0, result.stderr
    assert "randomized_svd(Tensor A, int rank" in result.stdout


def test_missing_extension_gives_a_clear_error():
    """Without the compiled extension, import works (svd='exact' needs none) and the SVD says how to build it."""
    result = _python(
        "import sys, warnings; sys.modules['galore_kernels._C'] = None\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always'); import galore_kernels as gk, torch\n"
        "print('WARNED', any('pip install --no-build-isolation' in str(w.message) for w in caught))\n"
        "try:\n    gk.randomized_svd(torch.randn(8, 6), 2)\n"
        "except ImportError as error:\n    print('RAISED', error)\n"
    )
    assert result.returncode == 0, result.stderr
    assert "WARNED True" in result.stdout
    assert "RAISED galore_kernels._C" in result.stdout and f"torch {torch.__version__}" in result.stdout


@pytest.mark.parametrize("init", [None, "left", "right"])
def test_opcheck(init):
    """Schema, fake (meta) kernel, autograd registration and AOT dispatch, as torch.library checks them."""
    gen = torch.Generator().manual_seed(8)
    A = torch.randn(30, 20, generator=gen)
    init_basis = {None: None, "left": torch.randn(30, 6, generator=gen), "right": torch.randn(6, 20, generator=gen)}[init]
    torch.library.opcheck(torch.ops.galore_kernels.randomized_svd.default, (A, 4, 8, 1, 0, init_basis))


def test_traces_under_torch_compile():
    A = torch.randn(30, 20, generator=torch.Generator().manual_seed(9))

    def refresh(matrix):
        return torch.ops.galore_kernels.randomized_svd(matrix, 4, 8, 1, 3, None)

    compiled = torch.compile(refresh, backend="aot_eager", fullgraph=True)
    for out, expected in zip(compiled(A), refresh(A)):
        assert torch.equal(out, expected)


def test_op_checks_its_own_arguments():
    # Callers of torch.ops.galore_kernels.randomized_svd bypass the Python checks.
    with pytest.raises(RuntimeError, match="rank"):
        torch.ops.galore_kernels.randomized_svd(torch.ones(4, 5), 9, 0, 0, 0, None)
    with pytest.raises(RuntimeError, match="init"):
        torch.ops.galore_kernels.randomized_svd(torch.ones(4, 5), 2, 0, 0, 0, torch.ones(3, 3))


# --- CUDA --------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_matches_cpu_quality_and_is_deterministic():
    A = gradient_like(512, 1376, alpha=0.5, seed=13).cuda()
    U, S, Vh = randomized_svd(A, 64, seed=5)
    assert U.is_cuda and S.is_cuda and Vh.is_cuda
    assert_valid_factors(A.cpu(), U.cpu(), S.cpu(), Vh.cpu(), 64)
    assert captured_energy(A.cpu(), U.cpu(), Vh.cpu(), 64) >= 0.99
    again = randomized_svd(A, 64, seed=5)
    for a, b in zip((U, S, Vh), again):
        assert torch.equal(a, b)
    assert not torch.equal(U, randomized_svd(A, 64, seed=6)[0])


@pytest.mark.gpu
def test_cuda_degenerate_and_warm_start():
    zero = torch.zeros(64, 96, device="cuda")
    U, S, Vh = randomized_svd(zero, 8)
    assert_valid_factors(zero.cpu(), U.cpu(), S.cpu(), Vh.cpu(), 8)
    A = gradient_like(300, 700, alpha=1.0, seed=14).cuda()
    prev_U = randomized_svd(A, 32)[0]
    warm = randomized_svd(A.bfloat16(), 32, power_iters=0, init=prev_U.bfloat16())
    assert captured_energy(A.cpu(), warm[0].cpu(), warm[2].cpu(), 32) >= 0.99
