# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# torch is installed first and pinned, so that the bare `torch` requirement of the
# package is already satisfied by the CPU build and never pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
# The face detector's weights (MTCNN, MIT licence) ship in this wheel: only its weight files are read,
# never its code, so none of its dependencies (an older torch, torchvision) are installed (docs/deploy.md).
DETECTOR_WEIGHTS := facenet-pytorch==2.6.0

.PHONY: install demo test lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps "$(DETECTOR_WEIGHTS)"
	touch $@

demo: install
	$(BIN)/dcq demo

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
