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
                    "## Whole optimizer step", "## Where the whole step's time goes", "## Peak memory"):
        assert heading in markdown
    # Every optimizer of the LLaMA-shaped step ran, and the layerwise training steps kept a finite loss.
    assert all(row["error"] is None for row in stages["model"]["times"])
    assert {row["impl"] for row in stages["model"]["host"]} == {"ours 8-bit", "ours fp32"}
    assert stages["llama7b_memory"]["loss"] == stages["llama7b_memory"]["loss"]
    # The profile saw the step's operators (on the CPU: PyTorch's; the device's on a GPU).
    assert stages["profile"]["rows"][0]["kernels"] and stages["profile"]["rows"][0]["wall_s"] > 0
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


def test_a_stage_inside_its_limit_is_not_stopped(tmp_path):
    # The SIGINT grace comes out of the limit: a short stage must still get its whole limit.
    with open(tmp_path / "log", "w") as log:
        status, _ = gpu_check._run([sys.executable, "-c", "import time; time.sleep(1.5)"], log=log, timeout=4,
                                   env=dict(os.environ))
    assert status == "ok"


def test_a_stage_past_its_limit_is_interrupted_before_it_is_killed(tmp_path):
    # pytest answers SIGINT by writing its JUnit XML: the stage gets that chance before SIGKILL.
    marker = tmp_path / "interrupted"
    script = f"import time\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n    open({str(marker)!r}, 'w').close()\n"
    with open(tmp_path / "log", "w") as log:
        status, seconds = gpu_check._run([sys.executable, "-c", script], log=log, timeout=4, env=dict(os.environ))
    assert status == "timeout (4 s)" and seconds < 30
    assert marker.exists()


def test_every_test_file_is_placed_on_the_gpu_or_left_out_by_name():
    files = {path.name for path in (REPO_ROOT / "python_tests").glob("test_*.py")}
    gpu, cpu_only = set(gpu_check.GPU_TEST_FILES), set(gpu_check.CPU_ONLY_TEST_FILES)
    assert not gpu & cpu_only
    assert gpu | cpu_only == files, "a new test file must be named in GPU_TEST_FILES or CPU_ONLY_TEST_FILES"


def test_conftest_writes_each_outcome_and_traceback_as_the_test_ends(tmp_path):
    (tmp_path / "conftest.py").write_text((REPO_ROOT / "python_tests" / "conftest.py").read_text())
    (tmp_path / "test_probe.py").write_text(
        "import pytest\n"
        "def test_passes(): pass\n"
        "def test_fails(): assert 1 == 2, 'planted'\n"
        "@pytest.mark.skip(reason='probe')\n"
        "def test_skipped(): pass\n"
        "@pytest.fixture\n"
        "def broken(): raise RuntimeError('fixture')\n"
        "def test_errors(broken): pass\n"
    )
    progress = tmp_path / "progress.txt"
    env = dict(os.environ, **{gpu_check.TEST_PROGRESS_VARIABLE: str(progress)})
    env.pop("PYTEST_XDIST_WORKER", None)
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_probe.py")],
                   cwd=tmp_path, env=env, capture_output=True, timeout=120)
    counts = gpu_check._progress_counts(progress)
    assert (counts["tests"], counts["failures"], counts["errors"], counts["skipped"]) == (4, 1, 1, 1)
    assert [name.split("::")[-1] for name in counts["failed_tests"]] == ["test_fails", "test_errors"]
    assert "planted" in progress.read_text()
