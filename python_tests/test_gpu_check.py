"""``make gpu-check`` keeps working: its dry run (every stage at tiny sizes on the CPU) end to end.

The GPU run itself needs a GPU; what is checked here is everything around the
numbers: wheels installed from a directory and put on PYTHONPATH, every stage run
in its own process and reported, at most 8 result files under GPU_CHECK_OUT, the
summary printed last, and a stage past its limit killed (its children too) without
stopping the others.
"""

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
from bench import gpu_check  # noqa: E402


def make_probe_wheel(directory: Path) -> None:
    """A minimal pure-Python wheel, as ``make gpu-wheels`` would leave in .whl/."""
    directory.mkdir()
    dist_info = "gpucheckprobe-1.0.dist-info"
    files = {
        "gpucheckprobe/__init__.py": "VALUE = 42\n",
        f"{dist_info}/METADATA": "Metadata-Version: 2.1\nName: gpucheckprobe\nVersion: 1.0\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist_info}/RECORD"] = "".join(f"{name},,\n" for name in files) + f"{dist_info}/RECORD,,\n"
    with zipfile.ZipFile(directory / "gpucheckprobe-1.0-py3-none-any.whl", "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)


def test_dry_run_runs_every_stage_and_reports(tmp_path):
    make_probe_wheel(tmp_path / "wheels")
    out = tmp_path / "out"
    env = dict(os.environ, GPU_CHECK_OUT=str(out))
    completed = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--dry-run", "--wheels", str(tmp_path / "wheels")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    files = sorted(out.iterdir())
    assert 1 <= len(files) <= 8
    (results,) = out.glob("*-gpu-check-dry-run.json")
    stages = json.loads(results.read_text())["stages"]
    assert list(stages) == [name for name, _ in gpu_check.STAGES]
    assert {name: stage["status"] for name, stage in stages.items()} == dict.fromkeys(stages, "ok")
    junit = stages["pytest"]["junit"]
    assert junit["tests"] > 0 and junit["failures"] == junit["errors"] == 0
    log = results.with_suffix(".log").read_text()
    assert "Successfully installed gpucheckprobe" in log
    markdown = results.with_suffix(".md").read_text()
    for heading in ("## pytest", "## Roofline", "## Optimizer step", "## Projector refresh (SVD)",
                    "## Whole optimizer step", "## Peak memory"):
        assert heading in markdown
    # Every optimizer of the LLaMA-shaped step ran, and the layerwise training steps kept a finite loss.
    assert all(row["error"] is None for row in stages["model"]["times"])
    assert {row["impl"] for row in stages["model"]["host"]} == {"ours 8-bit", "ours fp32"}
    assert stages["llama7b_memory"]["loss"] == stages["llama7b_memory"]["loss"]
    # The summary comes last and names the files.
    assert completed.stdout.rstrip().splitlines()[-1].startswith("wrote ")
    assert "DRY RUN" in completed.stdout


def test_a_stage_past_its_limit_is_killed_with_its_children(tmp_path):
    marker = tmp_path / "child-survived"
    # The stage starts a grandchild that would write the marker after the limit.
    script = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
              f"\"import time; time.sleep(3); open({str(marker)!r}, 'w').close()\"]); time.sleep(60)")
    with open(tmp_path / "log", "w") as log:
        started = time.perf_counter()
        status, seconds = gpu_check._run([sys.executable, "-c", script], log=log, timeout=1, env=dict(os.environ))
    assert status == "timeout (1 s)" and seconds < 30 and time.perf_counter() - started < 30
    time.sleep(4)
    assert not marker.exists()
    with open(tmp_path / "log", "a") as log:
        assert gpu_check._run([sys.executable, "-c", "raise SystemExit(3)"], log=log, timeout=60,
                              env=dict(os.environ))[0] == "failed (exit 3)"
