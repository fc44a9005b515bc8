"""Projector refresh: galore_kernels.randomized_svd against torch.linalg.svd and torch.svd_lowrank.

The matrix is gradient-like: singular values decaying as i^-alpha on random orthonormal factors,
plus a Gaussian noise floor. Each method is timed (median of `repeats` calls after a warm-up call)
and scored by the captured energy of its rank-r basis on the side GaLore projects on (the
smaller dimension, galore-torch's "std" rule):

    energy = ||B^T A||_F^2 / sum_{i <= r} sigma_i^2,   B = U (m <= n) or Vh^T (m > n),

which is 1 for the exact truncated SVD. svd_lowrank returns q = r + 8 vectors; only the first r
count. "Equal captured energy" pairs: randomized_svd with oversample 8 and power_iters q runs the
same number of products with A as svd_lowrank(q=r+8, niter=q), so their energies agree (to the
sketch's randomness) and the time ratio of a pair is the speed-up at equal energy. Timing rounds
interleave the methods; each time is the median over `repeats` rounds. The warm rows
start from the projector of a slightly drifted matrix, as a GaLore refresh does, and "per step"
spreads a refresh over update_proj_gap=200 optimizer steps.

Run with `python -m bench.bench_svd [--device cpu|cuda]`; the table is printed last and written
to bench/results/svd-<device>-<date>.md.
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
from pathlib import Path

import torch

from galore_kernels.svd import DEFAULT_OVERSAMPLE, DEFAULT_POWER_ITERS, randomized_svd

from . import device_name, median_seconds

UPDATE_PROJ_GAP = 200
SPECTRUM_ALPHA = 0.5  # slow decay: the hard end of gradient spectra, where the methods differ
NOISE_FLOOR = 1e-2  # relative to sigma_1
DRIFT = 0.05  # relative size of the change between two refreshes in the warm rows
DEFAULT_SHAPES = {"cpu": [(2048, 5504)], "cuda": [(4096, 11008)]}
DEFAULT_RANKS = {"cpu": [256], "cuda": [512]}
RESULTS_DIR = Path(__file__).parent / "results"


def gradient_like(m: int, n: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """(m, n) fp32 with singular values i^-SPECTRUM_ALPHA plus a noise floor."""
    generator = torch.Generator(device=device).manual_seed(seed)
    p = min(m, n)
    left = torch.linalg.qr(torch.randn(m, p, device=device, generator=generator)).Q
    right = torch.linalg.qr(torch.randn(n, p, device=device, generator=generator)).Q
    spectrum = torch.arange(1, p + 1, device=device, dtype=torch.float32) ** -SPECTRUM_ALPHA
    noise = torch.randn(m, n, device=device, generator=generator) * (NOISE_FLOOR / (math.sqrt(m) + math.sqrt(n)))
    return (left * spectrum) @ right.T + noise


def drifted(matrix: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """The matrix at the previous refresh: DRIFT of its norm changed in a random direction."""
    generator = torch.Generator(device=matrix.device).manual_seed(seed)
    change = torch.randn(matrix.shape, device=matrix.device, generator=generator)
    return matrix + change * (DRIFT * matrix.norm() / change.norm())


def projector_side_basis(matrix: torch.Tensor, U: torch.Tensor, Vh: torch.Tensor, rank: int) -> torch.Tensor:
    m, n = matrix.shape
    return U[:, :rank] if m <= n else Vh[:rank].T


def captured_energy(matrix: torch.Tensor, basis: torch.Tensor, top_energy: float) -> float:
    m, n = matrix.shape
    projected = basis.T @ matrix if m <= n else matrix @ basis
    return float(projected.double().square().sum()) / top_energy


def run(device="cpu", shapes=None, ranks=None, repeats: int = 3) -> list[dict]:
    """Time and score every method on each (shape, rank); one dict per method and case."""
    device = torch.device(device)
    shapes = shapes or DEFAULT_SHAPES[device.type]
    ranks = ranks or DEFAULT_RANKS[device.type]
    rows = []
    for m, n in shapes:
        matrix = gradient_like(m, n, device)
        previous = drifted(matrix)
        singular_values = torch.linalg.svdvals(matrix.double())
        for rank in ranks:
            top_energy = float(singular_values[:rank].square().sum())
            prev_U, _, prev_Vh = randomized_svd(previous, rank)
            init = prev_U if m <= n else prev_Vh
            # (method, settings, the svd_lowrank niter it has equal energy with or None, call)
            cases = [("torch.linalg.svd", "exact", None, lambda: torch.linalg.svd(matrix, full_matrices=False))]
            for niter in (1, 2):
                cases.append(
                    (
                        "torch.svd_lowrank",
                        f"q=r+8, niter={niter}",
                        niter,
                        lambda niter=niter: _lowrank_as_usvh(matrix, rank, niter),
                    )
                )
                cases.append(
                    (
                        "randomized_svd cold",
                        f"oversample=8, power_iters={niter}",
                        niter,
                        lambda niter=niter: randomized_svd(matrix, rank, oversample=8, power_iters=niter),
                    )
                )
            defaults = f"oversample={DEFAULT_OVERSAMPLE}, power_iters={DEFAULT_POWER_ITERS} (defaults)"
            cases.append(("randomized_svd cold", defaults, None, lambda: randomized_svd(matrix, rank)))
            for power_iters in (0, 1):
                cases.append(
                    (
                        "randomized_svd warm",
                        f"oversample={DEFAULT_OVERSAMPLE}, power_iters={power_iters}",
                        None,
                        lambda power_iters=power_iters: randomized_svd(
                            matrix, rank, power_iters=power_iters, init=init
                        ),
                    )
                )
            energies = []
            for _, _, _, fn in cases:  # also the warm-up call of each method
                U, _, Vh = fn()
                energies.append(captured_energy(matrix, projector_side_basis(matrix, U, Vh, rank), top_energy))
            # Rounds interleave the methods, so a load change on a shared machine hits all of them
            # alike and the ratios stay meaningful.
            times = [[] for _ in cases]
            for _ in range(repeats):
                for case_times, (_, _, _, fn) in zip(times, cases):
                    case_times.append(median_seconds(fn, device, warmup=0, repeats=1))
            for (method, settings, equal_energy_niter, _), energy, case_times in zip(cases, energies, times):
                seconds = statistics.median(case_times)
                rows.append(
                    {
                        "device": device_name(device),
                        "threads": torch.get_num_threads(),
                        "m": m,
                        "n": n,
                        "rank": rank,
                        "method": method,
                        "settings": settings,
                        "equal_energy_niter": equal_energy_niter,
                        "seconds": seconds,
                        "energy": energy,
                        "per_step_ms": seconds / UPDATE_PROJ_GAP * 1e3,
                    }
                )
            _add_ratios(rows, m, n, rank)
    return rows


def _lowrank_as_usvh(matrix, rank, niter):
    U, S, V = torch.svd_lowrank(matrix, q=rank + 8, niter=niter)
    return U, S, V.T


def _add_ratios(rows, m, n, rank):
    """Speed-ups against torch.linalg.svd and against the svd_lowrank row of equal product count."""
    case = [row for row in rows if (row["m"], row["n"], row["rank"]) == (m, n, rank)]
    exact = next(row["seconds"] for row in case if row["method"] == "torch.linalg.svd")
    lowrank = {row["equal_energy_niter"]: row["seconds"] for row in case if row["method"] == "torch.svd_lowrank"}
    for row in case:
        row["vs_linalg_svd"] = exact / row["seconds"]
        matched = row["method"] != "torch.svd_lowrank" and row["equal_energy_niter"] is not None
        row["vs_svd_lowrank_equal_energy"] = lowrank[row["equal_energy_niter"]] / row["seconds"] if matched else None


def format_table(rows) -> str:
    """A markdown table of run()'s rows."""
    header = (
        "| shape | rank | method | settings | time (ms) | per step @gap 200 (ms) | energy | x linalg.svd "
        "| x svd_lowrank, equal energy |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for row in rows:
        lowrank_ratio = row["vs_svd_lowrank_equal_energy"]
        lines.append(
            f"| {row['m']}x{row['n']} | {row['rank']} | {row['method']} | {row['settings']} "
            f"| {row['seconds'] * 1e3:.1f} | {row['per_step_ms']:.3f} | {row['energy']:.5f} "
            f"| {row['vs_linalg_svd']:.1f} | {'' if lowrank_ratio is None else f'{lowrank_ratio:.2f}'} |"
        )
    return header + "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", action="append", help="MxN, repeatable")
    parser.add_argument("--rank", action="append", type=int, help="repeatable")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    shapes = [tuple(int(size) for size in shape.lower().split("x")) for shape in args.shape] if args.shape else None
    rows = run(args.device, shapes, args.rank, args.repeats)
    device = torch.device(args.device)
    table = format_table(rows)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"svd-{device.type}-{datetime.date.today().isoformat()}.md"
    path.write_text(
        f"# Projector refresh, {rows[0]['device']}, {rows[0]['threads']} threads, torch {torch.__version__}\n\n"
        f"Matrix: singular values i^-{SPECTRUM_ALPHA} plus a {NOISE_FLOOR:g} noise floor; warm rows start from "
        f"the projector of the matrix {DRIFT:g} away; energy on the smaller side (see bench/bench_svd.py).\n\n"
        + table
    )
    print(f"wrote {path}")
    print(table)


if __name__ == "__main__":
    main()
