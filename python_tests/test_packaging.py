"""The install route: the sdist carries csrc/ whole and declares runtime-only dependencies.

Builds the sdist with setup.py (no compilation: about 4 s) into a temporary directory and
reads its file list and PKG-INFO. Building a wheel from it compiles the extension, which
is left to `make install` / `python -m build --no-isolation`.
"""

import email
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    out = tmp_path_factory.mktemp("sdist")
    completed = subprocess.run(
        [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(out), "sdist", "--dist-dir", str(out)],
        cwd=REPO_ROOT, env=dict(os.environ, GALORE_KERNELS_CUDA="0"), capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    (archive,) = out.glob("galore_kernels-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        root = names[0].split("/")[0]
        pkg_info = tar.extractfile(f"{root}/PKG-INFO").read().decode()
    return root, {name.split("/", 1)[1] for name in names if "/" in name}, email.message_from_string(pkg_info)


def test_sdist_carries_csrc_whole_and_the_package(sdist):
    _, files, _ = sdist
    csrc = {str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "csrc").rglob("*") if p.is_file()}
    assert {"csrc/randomized_svd.h", "csrc/tests/test_randomized_svd.cpp"} <= csrc
    assert csrc <= files, sorted(csrc - files)
    package = {
        str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "galore_kernels").rglob("*.py") if "__pycache__" not in p.parts
    }
    assert package <= files, sorted(package - files)
    assert {"setup.py", "README.md"} <= files
    assert not any(name.endswith((".so", ".pyc")) for name in files)


def test_runtime_install_pulls_neither_oracles_nor_bench_tools(sdist):
    _, _, pkg_info = sdist
    requires = pkg_info.get_all("Requires-Dist")
    runtime = {r.split(";")[0].strip() for r in requires if "extra ==" not in r}
    assert runtime == {"torch", "numpy"}

    def extra(name):
        return {r.split(";")[0].strip() for r in requires if f'extra == "{name}"' in r}

    assert {"transformers", "accelerate"} <= extra("hf")
    assert {"galore-torch==1.0", "bitsandbytes", "pytest"} <= extra("test")
    assert {"tqdm", "matplotlib"} <= extra("bench")
