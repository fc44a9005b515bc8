"""The benchmark suite must keep running: `python -m bench --quick` end to end on CPU, plus its cost model.

Nothing here asserts performance; only that every section runs, every
measurement succeeds and the results file and plots are written.
"""

import os
import subprocess
import sys
from pathlib import Path

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
