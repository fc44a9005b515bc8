# The whole set-up on a fresh machine: `make test` and `make bench`.
PYTHON ?= python3
VENV   := .venv
# e.g. VENV_ARGS=--system-site-packages to reuse a machine's own torch (an offline GPU box).
VENV_ARGS ?=
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# No GPU here means the Triton kernels run under the interpreter on CPU tensors.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
ifeq ($(HAS_GPU),0)
export TRITON_INTERPRET := 1
endif

.PHONY: test bench install ctest pytest clean gpu-check gpu-wheels

# The GPU machine's Triton, beside the project's: the sm_90 compile gate
# (python_tests/test_kernels_sm90.py) compiles every launch under both.
TRITON_GPU := .venv-triton36

$(VENV)/.installed: setup.py requirements-test.txt
	$(PYTHON) -m venv $(VENV_ARGS) $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install -r requirements-test.txt
	touch $@

$(VENV)/.built: $(VENV)/.installed $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h)
	$(PIP) install --no-build-isolation -e . -v
	touch $@

$(TRITON_GPU)/.installed: $(VENV)/.installed
	rm -rf $(TRITON_GPU)
	$(PIP) install --no-deps --target $(TRITON_GPU) triton==3.6.0
	touch $@

install: $(VENV)/.built

ctest: $(VENV)/.built
	cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" -DPython3_EXECUTABLE=$(abspath $(PY)) -DCMAKE_BUILD_TYPE=Release
	cmake --build build/cmake -j 2
	cd build/cmake && ctest --output-on-failure

pytest: $(VENV)/.built $(TRITON_GPU)/.installed
	$(PY) -m pytest python_tests -q -ra --durations=15

test: ctest pytest

bench: $(VENV)/.built
	$(PY) -m bench

# On a bare CUDA box without network: build, the whole suite natively, every GPU number
# (bench/gpu_check.py). GPU_CHECK_ARGS=--dry-run runs every stage at tiny sizes on the CPU;
# GPU_CHECK_OUT picks the results directory (default bench/results/).
GPU_CHECK_OUT ?= bench/results
gpu-check:
	$(PYTHON) -m bench.gpu_check --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

# On a networked machine: the wheels gpu-check installs there (.whl/, git-ignored, < 60 MB).
# galore-torch's and bitsandbytes' other requirements (torch, transformers, numpy, packaging)
# are on the GPU machine already.
GPU_WHEELS := galore-torch==1.0 bitsandbytes==0.50.2
gpu-wheels:
	mkdir -p .whl
	$(PYTHON) -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)
	@du -cb .whl/*.whl | tail -1 | awk '{ printf "wheels: %.1f MB\n", $$1 / 1e6; if ($$1 >= 60e6) exit 1 }'

clean:
	rm -rf build $(VENV) $(TRITON_GPU) *.egg-info galore_kernels/_C*.so
