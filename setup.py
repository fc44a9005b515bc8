"""Build galore-kernels and its compiled operators, galore_kernels._C (torch.ops.galore_kernels.*).

What gets compiled is decided from the toolchain found:
  * a CUDA build (CUDAExtension, csrc/*.cpp + csrc/*.cu) when torch is a CUDA build and nvcc is found;
  * otherwise a CPU build (CppExtension, csrc/*.cpp), which runs every operator on CPU tensors.
Environment overrides:
  GALORE_KERNELS_CUDA=0/1   force the CPU or the CUDA build;
  MAX_JOBS                  parallel compile jobs (default: the number of CPUs, capped at 4);
  TORCH_CUDA_ARCH_LIST      GPU architectures for the CUDA build (default "8.0;9.0": A100, H100).
Install from a clone (torch must already be installed: the extension builds against it):
  pip install --no-build-isolation .            runtime only: torch and numpy
  pip install --no-build-isolation ".[hf]"      plus transformers/accelerate for the Trainer helper
  pip install --no-build-isolation -e ".[test]" in place, with the test oracles
A source distribution (`python -m build --no-isolation`) carries csrc/ whole: every source,
header and C++ test, declared as the extension's dependencies so that setuptools packs them.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()
CSRC = "csrc"


def read_version():
    text = (ROOT / "galore_kernels" / "version.py").read_text()
    return re.search(r'^__version__\s*=\s*"([^"]+)"', text, re.M).group(1)


def locate_cuda_toolkit():
    """Point CUDA_HOME at the real toolkit when nvcc on PATH is a wrapper script.

    torch takes CUDA_HOME to be the parent of nvcc's directory; for a wrapper such as
    /usr/local/bin/nvcc that is /usr/local, with no CUDA headers or libraries in it. nvcc itself
    knows where it lives (`_HERE_` in its dry-run output). Runs before torch.utils.cpp_extension
    is imported, because that module reads CUDA_HOME once at import.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    if (Path(nvcc).resolve().parent.parent / "include" / "cuda_runtime.h").exists():
        return
    try:
        dry_run = subprocess.run(
            [nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True, timeout=60, check=False
        )
    except OSError:
        return
    match = re.search(r"^#\$ _HERE_=(.+)$", dry_run.stdout + dry_run.stderr, re.M)
    if match:
        toolkit = Path(match.group(1).strip()).parent
        if (toolkit / "include" / "cuda_runtime.h").exists():
            os.environ["CUDA_HOME"] = str(toolkit)


def wheel_cuda_include_dirs():
    """Include directories of the nvidia-* wheels torch depends on (cuRAND, cuBLAS, cuSOLVER headers
    that a bare nvcc install may lack). Found through the installed `nvidia` namespace package."""
    try:
        import nvidia
    except ImportError:
        return []
    found = []
    for base in nvidia.__path__:
        for include in sorted(Path(base).glob("*/include")):
            if (include / "cuda_runtime_api.h").exists() or (include / "cublas_v2.h").exists():
                found.append(str(include))
    return found


def env_flag(name):
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value not in ("0", "1"):
        raise SystemExit(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def make_extensions():
    locate_cuda_toolkit()
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    os.environ.setdefault("MAX_JOBS", str(min(os.cpu_count() or 1, 4)))
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

    cuda_available = torch.version.cuda is not None and CUDA_HOME is not None
    forced = env_flag("GALORE_KERNELS_CUDA")
    if forced and not cuda_available:
        raise SystemExit(
            "GALORE_KERNELS_CUDA=1 but no CUDA toolchain: "
            f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME}"
        )
    with_cuda = cuda_available if forced is None else forced

    cpp_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / CSRC).glob("*.cpp"))
    cuda_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / CSRC).glob("*.cu"))
    # Everything else under csrc/ (headers, the C++ tests): a rebuild trigger, and what puts it in the sdist.
    depends = sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / CSRC).rglob("*")
        if p.is_file() and str(p.relative_to(ROOT)) not in cpp_sources + cuda_sources
    )
    cxx_flags = ["-O3"]
    if with_cuda:
        # -isystem dirs come after torch's -I CUDA_HOME/include, so the toolkit's own headers win
        # and the wheels only supply the ones it lacks.
        wheel_includes = wheel_cuda_include_dirs()
        system_includes = [flag for include in wheel_includes for flag in ("-isystem", include)]
        print(
            f"galore-kernels: CUDA build (CUDA {torch.version.cuda}, CUDA_HOME={CUDA_HOME}, "
            f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}, MAX_JOBS={os.environ['MAX_JOBS']}, "
            f"extra include dirs={wheel_includes})"
        )
        extension = CUDAExtension(
            "galore_kernels._C",
            sources=cpp_sources + cuda_sources,
            depends=depends,
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags + system_includes, "nvcc": ["-O3"] + system_includes},
        )
    else:
        reason = "GALORE_KERNELS_CUDA=0" if forced is False else (
            f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME}"
        )
        print(
            f"galore-kernels: CPU build ({reason}); leaving out the CUDA kernels {cuda_sources}: "
            "CUDA tensors get the same algorithm with a host-drawn sketch"
        )
        extension = CppExtension(
            "galore_kernels._C", sources=cpp_sources, depends=depends + cuda_sources, extra_compile_args={"cxx": cxx_flags}
        )
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = make_extensions()

setup(
    name="galore-kernels",
    version=read_version(),
    description="Fast GaLore optimizers: fused Triton kernels, 8-bit states and a randomized SVD",
    packages=find_packages(include=["galore_kernels*"]),
    python_requires=">=3.9",
    install_requires=["torch", "numpy"],
    # Runtime needs torch and numpy only; the oracles and the benchmark tools are extras.
    extras_require={
        "hf": ["transformers", "accelerate"],
        "test": ["pytest", "galore-torch==1.0", "bitsandbytes", "transformers", "accelerate"],
        "bench": ["tqdm", "matplotlib"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
