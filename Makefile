# make install | make demo | make test  (see README.md)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch: with an NVIDIA driver, the default (CUDA) build of torch 2.13.0; without one, the CPU
# build, found by pip in its local wheels or in TORCH_INDEX (PyTorch's CPU wheel index).
TORCH_INDEX ?=
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch==2.13.0,torch==2.13.0+cpu)
PYTEST_ARGS ?=
# llama-cpp-python builds llama.cpp from source: the library only (no examples, tools, server or
# multimodal library), without OpenMP (ggml's own thread pool)
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
	-DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF

.PHONY: install demo test clean

install: $(VENV)/.installed

# torch first, then the build tools deepspeed's setup.py and llama-cpp-python (scikit-build-core) need,
# then dslm with deepspeed built against that torch (--no-build-isolation, or pip pulls a second,
# multi-GB CUDA torch into the build) and llama.cpp built from source.
$(VENV)/.installed: pyproject.toml local/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) || { \
	    echo "make install: could not install $(TORCH_SPEC); on a CPU-only machine pass" \
	         "TORCH_INDEX=https://download.pytorch.org/whl/cpu" >&2; exit 1; }
	$(PY) -m pip install setuptools wheel packaging psutil==7.2.2 ninja numpy==2.4.6 scikit-build-core==0.11.6
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install --no-build-isolation -e ".[test,llama]"
	touch $@

demo: install
	bash launch/demo.sh

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) data/demo runs/demo data/demo-instructions.jsonl data/code-instruct-tiny runs/code-instruct-tiny .pytest_cache
