import os
import textwrap

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def interpreted():
    """True when Triton kernels run under the interpreter on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def pytest_runtest_logreport(report):
    """With ``GALORE_TEST_PROGRESS`` set (``bench/gpu_check.py``), append "outcome seconds nodeid"
    and a failure's traceback to that file as each test ends. In the process that reports (the
    xdist controller, not its workers), so each test is written once."""
    path = os.environ.get("GALORE_TEST_PROGRESS")
    if not path or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    if report.when == "call":
        outcome = report.outcome
    elif report.failed:
        outcome = "error"
    elif report.when == "setup" and report.skipped:
        outcome = "skipped"
    else:
        return
    with open(path, "a") as progress:
        progress.write(f"{outcome} {report.duration:.2f} {report.nodeid}\n")
        if report.failed:
            progress.write(textwrap.indent(report.longreprtext[-4000:], "    ").rstrip() + "\n")
