"""The benchmark suite must keep running: `python -m bench --quick` end to end on CPU, plus its cost model.

Nothing here asserts performance; only that every section runs, every
measurement succeeds and the results file and plots are written.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_quick_suite_writes_results_file_and_plots(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # the CPU path, whatever the machine
    completed = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--no-progress", "--out", str(tmp_path)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    (results,) = tmp_path.glob("*-quick.md")
    text = results.read_text()
    for heading in ("## Roofline", "## Optimizer step throughput", "## Projector refresh (SVD)", "## End-to-end training"):
        assert heading in text
    assert "error" not in text.split("## Optimizer step throughput", 1)[1].split("## Projector refresh", 1)[0]
    for plot in ("step", "svd", "train"):
        png = results.with_name(f"{results.stem}-{plot}.png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png.name})" in text
    # The refresh study writes its own file and plot, every run finite.
    (study,) = tmp_path.glob("*-quick-refresh-study.md")
    study_text = study.read_text()
    assert "## Verdicts" in study_text and "nan" not in study_text.split("## Results", 1)[1].lower()
    assert study.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The 2-process section ran every configuration.
    distributed = (tmp_path / "distributed-cpu-smoke.md").read_text()
    assert all(f"| {config} |" in distributed for config in ("single", "ddp", "ddp+low-rank hook", "fsdp2", "fsdp2 layerwise"))
    # The whole-model step: launches and host time of both of our optimizers, on meta tensors.
    model = (tmp_path / "model-cpu-smoke.md").read_text()
    assert all(f"| tiny | 8 | {impl} |" in model for impl in ("ours 8-bit", "ours fp32"))
    # Every optimizer trained to a finite loss and the acceptance line was decided.
    assert ("PASS:" in completed.stdout) != ("FAIL:" in completed.stdout)
    assert "nan" not in completed.stdout.split("Training", 1)[1].lower()
    # The tables come last.
    assert completed.stdout.rstrip().splitlines()[-1].startswith(("PASS:", "FAIL:"))


def test_cost_model_counts_by_hand(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    from bench.roofline import adamw_step_cost, galore_step_cost

    m, n, r = 1000, 300, 64  # m >= n: right projection, low-rank (1000, 64), projector (64, 300)
    fp32 = galore_step_cost(m, n, r, param_bytes=2, moment_bytes=4)
    assert fp32.flops == 4 * m * n * r
    assert fp32.bytes == 3 * m * n * 2 + 2 * 2 * 4 * m * r + 4 * n * r
    eight_bit = galore_step_cost(m, n, r, param_bytes=2, moment_bytes=1)
    blocks = -(-m * r // 256)  # 64000 values -> 250 blocks
    assert eight_bit.bytes == 3 * m * n * 2 + 2 * 2 * (m * r + 4 * blocks) + 4 * n * r
    # The rank clamps to min(m, n), as the optimizers do.
    assert galore_step_cost(m, n, 10_000, param_bytes=4, moment_bytes=4).flops == 4 * m * n * n
    full = adamw_step_cost(m, n, param_bytes=4, moment_bytes=4)
    assert (full.flops, full.bytes) == (0.0, 3 * m * n * 4 + 16 * m * n)


def _bench(tmp_path, *flags, progress=False):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path), *flags]
    if not progress:
        command.append("--no-progress")
    completed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed


def test_single_section_plot_is_named_once(tmp_path):
    _bench(tmp_path, "--only", "svd")
    (results,) = tmp_path.glob("*.md")
    assert results.name.endswith("-quick-svd.md")
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [results.stem + ".png"]
    assert f"]({results.stem}.png)" in results.read_text()
    assert "Partial results" not in results.read_text()


def test_budget_shrinks_training_and_the_bar_estimates_the_whole_section(tmp_path):
    """A budget smaller than the roofline alone leaves the fewest steps (2 of the quick config's 6)
    for each of the 5 optimizers; one bar counts all 10, with tqdm's remaining-time estimate."""
    completed = _bench(tmp_path, "--only", "train", "--budget-minutes", "0.001", progress=True)
    (results,) = tmp_path.glob("*.md")
    text = results.read_text()
    assert "2 steps, warm-up 1 steps (scaled down from 6 steps" in text
    assert re.search(r"train: .*\b10/10 \[\d\d:\d\d<\d\d:\d\d", completed.stderr), completed.stderr[-2000:]


def test_an_interrupted_run_leaves_a_partial_report(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    import bench.__main__ as bench_main
    from bench import bench_train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_train, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench_main.main(["--quick", "--no-progress", "--only", "svd", "--only", "train", "--out", str(tmp_path)])
    (results,) = tmp_path.glob("*.md")
    text = results.read_text()
    assert "**Partial results**" in text and "not run (yet): train" in text
    assert "## Projector refresh (SVD)" in text and "## End-to-end training" not in text
