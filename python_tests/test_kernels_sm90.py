"""The sm_90 compile gate (``bench/sm90_compile.py``): every launch compiles for an H100, without one.

Under the project's Triton and under ``triton==3.6.0`` (the GPU machine's; ``make test``
installs it into ``.venv-triton36``), each distinct launch the optimizers make over
the gate's case table must compile with no spills, fit the H100's shared memory,
and run its 16-bit dots at LLaMA shapes on wgmma. The second test plants each of
those defects in a throwaway kernel and checks that the gate reports it.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
TRITON_GPU_VERSION, TRITON_GPU_PATH = "3.6.0", REPO_ROOT / ".venv-triton36"

sys.path.insert(0, str(REPO_ROOT))
from bench import sm90_compile  # noqa: E402


def _project_triton_version() -> str:
    code = "import triton; print(triton.__version__)"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="module")
def gate_results(tmp_path_factory):
    """``{version: result}`` of one gate run under every Triton, the Tritons in parallel."""
    paths = [None]
    if _project_triton_version() != TRITON_GPU_VERSION:
        if not (TRITON_GPU_PATH / "triton").is_dir():
            pytest.fail(f"triton=={TRITON_GPU_VERSION} is not in {TRITON_GPU_PATH}: run `make test` "
                        f"(or `pip install --no-deps --target {TRITON_GPU_PATH.name} triton=={TRITON_GPU_VERSION}`)")
        paths.append(str(TRITON_GPU_PATH))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    results = sm90_compile.run_versions(paths, tiny=False, jobs=max(1, cores // len(paths)), timeout=900)
    out = tmp_path_factory.mktemp("sm90") / "sm90-compile.md"
    out.write_text(sm90_compile.format_markdown(results))
    print(f"resource table: {out}")
    return {result["triton"]: result for result in results}


@pytest.mark.parametrize("version", ["project", TRITON_GPU_VERSION])
def test_every_launch_compiles_for_sm90(gate_results, version):
    if version == "project":
        version = _project_triton_version()
    result = gate_results[version]
    failures = [f"{row['kernel']} [{row['case']}] {row['spec']}: {'; '.join(row['failures'])}"
                for row in result["rows"] if row["failures"]]
    assert not failures, f"Triton {version}: {len(failures)} of {result['launches']} launches fail:\n" + "\n".join(failures)
    # The wgmma rule is not vacuous: LLaMA-shape 16-bit dots were reached, and every one lowered to wgmma.
    required = [row for row in result["rows"] if row["needs_wgmma"] and row["dot16"]]
    assert required and all(row["wgmma"] for row in required)


PLANTED = textwrap.dedent('''
    import json, sys
    import torch
    import triton
    import triton.language as tl
    from bench import sm90_compile as gate

    @triton.jit
    def big_tile(x_ptr, y_ptr, out_ptr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for k in range(0, 4):
            x = tl.load(x_ptr + offs[:, None] * BLOCK_K + offs_k[None, :] + k)
            y = tl.load(y_ptr + offs_k[:, None] * BLOCK + offs[None, :] + k)
            acc = tl.dot(x, y, acc)
        tl.store(out_ptr + offs[:, None] * BLOCK + offs[None, :], acc)

    def launch(dtype, block, block_k, **options):
        x = torch.empty(block, block_k, dtype=dtype, device="meta")
        y = torch.empty(block_k, block, dtype=dtype, device="meta")
        out = torch.empty(block, block, device="meta")
        big_tile[(1,)](x, y, out, BLOCK=block, BLOCK_K=block_k, **options)

    with gate.record_launches() as launches:
        launches.case = gate.Case("fp32", "bf16", (4096, 4096), 128, "left")
        launch(torch.bfloat16, 256, 256, num_warps=4, num_stages=4)  # shared memory overflow
        launch(torch.float32, 128, 32, num_warps=1, num_stages=1)    # 128x128 fp32 accumulator in 32 threads
        launch(torch.bfloat16, 16, 16, num_warps=1, num_stages=1)    # a warpgroup MMA needs 4 warps
    print(json.dumps([gate.compile_launch(launch) for launch in launches]))
''')


def test_gate_reports_planted_defects(tmp_path):
    script = tmp_path / "planted.py"
    script.write_text(PLANTED)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(REPO_ROOT), TRITON_CACHE_DIR=str(tmp_path / "cache"))
    completed = subprocess.run([sys.executable, str(script)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                               timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    overflow, spilling, no_wgmma = json.loads(completed.stdout.strip().splitlines()[-1])
    assert any("shared memory" in failure for failure in overflow["failures"]) or overflow["error"], overflow
    assert spilling["spill_bytes"] > 0 and any("spills" in failure for failure in spilling["failures"])
    assert no_wgmma["dot16"] and not no_wgmma["wgmma"]
    assert no_wgmma["failures"] == ["16-bit dot at a LLaMA shape with rank >= 128 did not lower to wgmma"]
