# make install | make demo | make test  (see README.md)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Where pip looks for torch. Empty: the default index (on a CUDA machine, PyPI's CUDA build).
# On a CPU-only machine without a local CPU wheel, point it at PyTorch's CPU wheel index.
TORCH_INDEX ?=
PYTEST_ARGS ?=

.PHONY: install demo test clean

install: $(VENV)/.installed

# torch first, then the build tools deepspeed's setup.py imports, then dslm with deepspeed built
# against that torch (--no-build-isolation, or pip pulls a second, multi-GB CUDA torch into the build).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install setuptools wheel packaging psutil ninja numpy==2.4.6
	$(PY) -m pip install --no-build-isolation -e ".[test]"
	touch $@

demo: install
	bash launch/demo.sh

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) data/demo runs/demo .pytest_cache
