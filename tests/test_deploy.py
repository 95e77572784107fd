"""The deployment files in deploy/: compose, Dockerfile, systemd units, Prometheus, Grafana.

- The compose file validates against the compose specification's JSON schema (the copy that the
  check-jsonschema package ships as `vendor.compose-spec`; no network), names every service with
  a health check, and each kvferry service's environment + the mounted kvferry.toml load with
  kvferry's own config loader into consistent addresses. `docker compose config` runs too when the
  compose CLI plugin is installed (it needs no daemon); otherwise that part is skipped.
- systemd: there is no systemd manager here (no systemd as PID 1, so no user manager either), so
  the units cannot be started by systemd. Instead the test follows deploy/README.md's installation
  block line by line into a temporary root (files installed where the README says; the venv and
  the user it creates are stood in for by a link to this venv's `kvferry`), runs
  `systemd-analyze verify --root` and `systemd-analyze security --offline` on the installed units,
  and then starts the services the README enables with the units' own ExecStart lines,
  Environment= and EnvironmentFile= (systemd's precedence and %i / %l specifiers applied), with
  only ports, engine and device changed through the installed environment file, as an operator
  of a CPU-only host would.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml

from services.config import load_config
from services.launcher import free_port_block, free_ports

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
UNITS = ("kvferry-scheduler.service", "kvferry-frontend.service", "kvferry-worker@.service")
KVFERRY_SERVICES = {"scheduler", "frontend", "worker-0", "worker-1", "cpu-worker-0", "cpu-worker-1"}
ALL_SERVICES = KVFERRY_SERVICES | {"prometheus", "grafana"}
KVFERRY = Path(sys.executable).with_name("kvferry")  # this venv's, standing in for /opt/kvferry/venv's


# ---- helpers ---------------------------------------------------------------------------------------

def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's `${VAR:-default}` / `${VAR}` interpolation, with an empty environment by default."""
    env = env or {}
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)


def documented_metrics() -> dict[str, tuple[str, str]]:
    """{metric name: (service, type)} from deploy/README.md's metrics table."""
    out = {}
    for line in (DEPLOY / "README.md").read_text().splitlines():
        m = re.match(r"^\| (frontend|scheduler|worker) \| `(kvferry_\w+|vllm:\w+)` \| (counter|gauge|histogram) \|", line)
        if m:
            out[m.group(2)] = (m.group(1), m.group(3))
    return out


def readme_block(marker: str) -> list[str]:
    """The command lines of the ```sh block after `<!-- test: marker -->` in deploy/README.md."""
    text = (DEPLOY / "README.md").read_text()
    m = re.search(rf"<!-- test: {marker} -->\n```sh\n(.*?)```", text, re.S)
    assert m, f"deploy/README.md has no block marked {marker}"
    return [ln.strip() for ln in m.group(1).splitlines() if ln.strip() and not ln.strip().startswith("#")]


def kvferry_toml() -> dict[str, Any]:
    return tomllib.loads((DEPLOY / "kvferry.toml").read_text())


# ---- compose -----------------------------------------------------------------------------------------

def test_compose_file_validates_against_the_compose_spec_schema():
    schema = json.loads(resources.files("check_jsonschema.builtin_schemas.vendor")
                        .joinpath("compose-spec.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    validator = cls(schema, format_checker=cls.FORMAT_CHECKER)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(compose())]
    assert not errors, errors
    # The schema does catch mistakes (a guard against validating against nothing).
    broken = compose()
    broken["services"]["scheduler"]["healthcheck"]["intervall"] = "5s"
    assert list(validator.iter_errors(broken))


def test_compose_file_passes_docker_compose_config():
    has_plugin = shutil.which("docker") and subprocess.run(
        ["docker", "compose", "version"], capture_output=True).returncode == 0
    if not has_plugin:
        pytest.skip("the docker compose CLI plugin is not installed (the schema test covers the file)")
    for profile in ("gpu", "cpu", "monitoring"):
        out = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "--profile", profile, "config", "--quiet"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr


def test_compose_names_every_service_with_health_checks_and_restart_policies():
    doc = compose()
    services = doc["services"]
    assert set(services) == ALL_SERVICES
    for name, svc in services.items():
        assert svc["healthcheck"]["test"][0] == "CMD", name
        assert svc["restart"] == "unless-stopped", name
    assert services["worker-0"]["profiles"] == ["gpu"] and services["cpu-worker-0"]["profiles"] == ["cpu"]
    assert "profiles" not in services["scheduler"] and "profiles" not in services["frontend"]
    for name in KVFERRY_SERVICES - {"scheduler"}:
        assert services[name]["depends_on"]["scheduler"]["condition"] == "service_healthy", name


def test_compose_health_checks_probe_each_service_port():
    cfg = kvferry_toml()
    services = compose()["services"]

    def probed_port(name: str) -> int:
        cmd = " ".join(services[name]["healthcheck"]["test"])
        m = re.search(r"http://127\.0\.0\.1:(\d+)/health", cmd)
        assert m, (name, cmd)
        return int(m.group(1))

    assert probed_port("scheduler") == cfg["scheduler"]["metrics_port"]
    assert probed_port("frontend") == cfg["cluster"]["http_port"]
    for name in ("worker-0", "worker-1", "cpu-worker-0", "cpu-worker-1"):
        index = int(services[name]["command"][services[name]["command"].index("--index") + 1])
        assert probed_port(name) == cfg["worker"]["metrics_port"] + index, name


def test_compose_gpu_workers_reserve_their_gpu():
    services = compose()["services"]
    for name in ("worker-0", "worker-1"):
        svc = services[name]
        index = svc["command"][svc["command"].index("--index") + 1]
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert device["device_ids"] == [index], name
        assert svc["image"] == "kvferry:gpu" and svc["build"]["target"] == "gpu"
    for name in ("cpu-worker-0", "cpu-worker-1"):
        assert "deploy" not in services[name]
        assert services[name]["image"] == "kvferry:cpu"


def test_compose_environment_and_config_file_load_into_consistent_addresses():
    """Each kvferry container's settings, as kvferry loads them: the mounted file, then its environment."""
    services = compose()["services"]
    loaded = {}
    for name in KVFERRY_SERVICES:
        svc = services[name]
        mount = next(v for v in svc["volumes"] if isinstance(v, dict) and v["target"] == "/etc/kvferry/kvferry.toml")
        assert mount["read_only"] and (COMPOSE.parent / mount["source"]).resolve() == DEPLOY / "kvferry.toml"
        cmd = svc["command"]
        assert cmd[cmd.index("--config") + 1] == "/etc/kvferry/kvferry.toml"
        env = {k: interpolate(str(v)) for k, v in svc["environment"].items()}
        cfg = load_config(DEPLOY / "kvferry.toml", env=env)
        loaded[name] = cfg
        assert cfg.cluster.host == name, name  # what it announces: reachable by service name
        assert cfg.cluster.bind_host == "0.0.0.0" and cfg.cluster.http_host == "0.0.0.0"
        assert cfg.cluster.scheduler() == f"tcp://scheduler:{cfg.cluster.base_port}", name
    assert loaded["frontend"].frontend.model == loaded["worker-0"].worker.model == "smollm2"
    assert loaded["cpu-worker-0"].worker.device == "cpu" and loaded["worker-0"].worker.device == "cuda"
    assert loaded["cpu-worker-1"].worker.model == loaded["frontend"].frontend.model


def test_dockerfile_has_gpu_and_cpu_images_as_a_non_root_user():
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    stages: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^FROM\s+\S+\s+AS\s+(\S+)", line, re.I)
        if m:
            current = m.group(1)
            stages[current] = []
        elif current and line.strip() and not line.startswith("#"):
            stages[current].append(line)
    assert {"gpu", "cpu", "build-gpu", "build-cpu", "runtime"} <= set(stages)
    for target in ("gpu", "cpu"):
        body = "\n".join(stages[target])
        assert re.search(rf"COPY --from=build-{target} /opt/kvferry/venv", body), target  # multi-stage
        users = re.findall(r"^USER\s+(\S+)", body, re.M)
        assert users and users[-1] not in ("root", "0"), target
    assert "useradd --system --uid 10001" in "\n".join(stages["runtime"])
    assert 'ENTRYPOINT ["kvferry"]' in text
    for src in re.findall(r"^COPY (?!--from)(\S+) ", text, re.M):  # sources from the build context exist
        assert src == "." or (ROOT / src).exists(), src
    # The context filter keeps every package pyproject.toml installs.
    ignore = (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert f"!{pattern.rstrip('*')}/" in ignore, pattern
    # ... and those of the SDK's distribution (sdk/pyproject.toml), which the image installs first
    sdk = tomllib.loads((ROOT / "sdk" / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package in sdk["packages"]:
        folder = (ROOT / "sdk" / sdk["package-dir"][package]).resolve().relative_to(ROOT)
        assert f"!{folder}/" in ignore, package
    assert re.search(r"^RUN pip install /src/sdk /src\b", text, re.M), "the SDK's distribution, then the server's"
    assert "!pyproject.toml" in ignore and "!README.md" in ignore and "!deploy/kvferry.toml" in ignore


# ---- systemd ------------------------------------------------------------------------------------------

def _run_install_block(root: Path) -> list[str]:
    """Follow deploy/README.md's systemd installation into `root`; returns the units it enables."""
    enabled: list[str] = []
    for line in readme_block("systemd-install"):
        argv = shlex.split(line)
        if argv[0] == "useradd":
            assert argv[-1] == "kvferry"  # the units' User=: not created in a test
        elif argv[:3] == ["python3.11", "-m", "venv"]:
            venv_bin = root / argv[3].lstrip("/") / "bin"
            venv_bin.mkdir(parents=True)
            # A script, not a symlink: systemd-analyze --root resolves absolute links inside the root.
            (venv_bin / "kvferry").write_text(f'#!/bin/sh\nexec {shlex.quote(str(KVFERRY))} "$@"\n')
            (venv_bin / "kvferry").chmod(0o755)
        elif argv[0].endswith("/bin/pip"):
            assert (root / argv[0].lstrip("/")).parent.is_dir()  # into the venv made above (this venv has it all)
        elif argv[0] == "install" and "-d" in argv:
            (root / argv[-1].lstrip("/")).mkdir(parents=True, exist_ok=True)
        elif argv[0] == "install":
            args = argv[1:]
            files = [a for i, a in enumerate(args) if not a.startswith("-") and args[i - 1] not in ("-m", "-g", "-o")]
            *sources, dest = files
            for src in sources:
                matches = glob.glob(str(ROOT / src))
                assert matches, f"{line}: {src} does not exist"
                for f in matches:
                    target = root / dest.lstrip("/")
                    target = target / Path(f).name if dest.endswith("/") else target
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(f, target)
        elif argv[:2] == ["systemctl", "daemon-reload"]:
            pass
        elif argv[:2] == ["systemctl", "enable"]:
            enabled = [a for a in argv[2:] if not a.startswith("--")]
        else:
            raise AssertionError(f"the test does not know how to follow {line!r}: teach it")
    # systemd-analyze --root needs the distribution's own units (targets) under the root too.
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    return enabled


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, list[str]]:
    if shutil.which("systemd-analyze") is None or not Path("/usr/lib/systemd/system").is_dir():
        pytest.skip("systemd-analyze (Debian's systemd package) is not installed")
    root = tmp_path_factory.mktemp("root")
    return root, _run_install_block(root)


def test_readme_installs_every_unit_and_the_files_they_reference(installed):
    root, enabled = installed
    unit_dir = root / "etc/systemd/system"
    assert sorted(p.name for p in unit_dir.iterdir()) == sorted(UNITS)
    assert set(enabled) == {"kvferry-scheduler.service", "kvferry-frontend.service", "kvferry-worker@0.service",
                            "kvferry-worker@1.service"}
    for unit in UNITS:
        text = (unit_dir / unit).read_text()
        for path in re.findall(r"(?:EnvironmentFile=-?|--config )(/\S+)", text):
            assert (root / path.lstrip("/")).is_file(), f"{unit} references {path}, which the README does not install"
        assert re.search(r"^ExecStart=/opt/kvferry/venv/bin/kvferry ", text, re.M)
        for key in ("User=kvferry", "NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes",
                    "ProtectHome=yes", "Restart=on-failure", "WantedBy=multi-user.target"):
            assert re.search(rf"^{re.escape(key)}$", text, re.M), (unit, key)
    worker = (unit_dir / "kvferry-worker@.service").read_text()
    assert re.search(r"^Environment=CUDA_VISIBLE_DEVICES=%i\b", worker, re.M)
    assert "--index %i" in worker and "After=network-online.target kvferry-scheduler.service" in worker


def test_units_pass_systemd_analyze_verify(installed):
    root, enabled = installed
    out = subprocess.run(["systemd-analyze", "verify", f"--root={root}", *enabled],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and not out.stderr.strip() and not out.stdout.strip(), out.stderr + out.stdout
    # The check is real: a unit whose ExecStart is missing fails it.
    kvferry = root / "opt/kvferry/venv/bin/kvferry"
    kvferry.rename(kvferry.with_name("moved"))
    try:
        bad = subprocess.run(["systemd-analyze", "verify", f"--root={root}", "kvferry-scheduler.service"],
                             capture_output=True, text=True, timeout=120)
    finally:
        kvferry.with_name("moved").rename(kvferry)
    assert bad.returncode != 0 and "not executable" in bad.stderr


def test_units_are_hardened(installed):
    root, enabled = installed
    for unit in enabled:
        out = subprocess.run(["systemd-analyze", "security", "--offline=yes", f"--root={root}", "--threshold=20",
                              unit], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        level = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", out.stdout).group(1))
        assert level < 2.0, f"{unit}: exposure {level}"


def _environment_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip().strip('"')
    return env


def _unit_command(root: Path, unit_name: str) -> tuple[list[str], dict[str, str]]:
    """ExecStart argv and environment of an enabled unit, as systemd would run it (paths into `root`)."""
    template = re.sub(r"@[^.]+\.service$", "@.service", unit_name)
    instance = unit_name.split("@", 1)[1].split(".")[0] if "@" in unit_name else ""
    text = (root / "etc/systemd/system" / template).read_text()
    specifiers = {"%i": instance, "%l": socket.gethostname().split(".")[0], "%%": "%"}

    def expand(s: str) -> str:
        return re.sub(r"%[il%]", lambda m: specifiers[m.group(0)], s)

    env: dict[str, str] = {}
    for value in re.findall(r"^Environment=(.*)$", text, re.M):
        env.update(kv.split("=", 1) for kv in shlex.split(expand(value)))
    for value in re.findall(r"^EnvironmentFile=-?(.*)$", text, re.M):  # after Environment=: it wins
        env.update(_environment_file(root / value.strip().lstrip("/")))
    (exec_start,) = re.findall(r"^ExecStart=(.*)$", text, re.M)
    argv = [str(root / a.lstrip("/")) if a.startswith("/opt/kvferry/") or a.startswith("/etc/kvferry/") else a
            for a in shlex.split(expand(exec_start))]
    return argv, env


@pytest.mark.slow
@pytest.mark.e2e  # every enabled unit's process
def test_enabled_units_serve_with_their_own_command_lines(installed):
    """The services the README enables, started with the units' ExecStart and environment; the
    installed environment file gets what a CPU-only test host changes (ports, sim engine, cpu)."""
    root, enabled = installed
    http, base = free_ports(2)
    metrics = free_port_block(3)
    env_file = root / "etc/kvferry/kvferry.env"
    original = env_file.read_text()
    env_file.write_text(original + "\n".join([
        "", f"KVFERRY_CLUSTER_BASE_PORT={base}", f"KVFERRY_CLUSTER_HTTP_PORT={http}",
        f"KVFERRY_SCHEDULER_METRICS_PORT={metrics}", f"KVFERRY_WORKER_METRICS_PORT={metrics + 1}",
        "KVFERRY_WORKER_DEVICE=cpu", "KVFERRY_WORKER_ENGINE=sim", "KVFERRY_WORKER_MODEL=instant",
        "KVFERRY_FRONTEND_MODEL=tiny", "KVFERRY_LOG_LEVEL=WARNING", ""]))
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("KVFERRY_")}
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        for unit in enabled:
            argv, env = _unit_command(root, unit)
            assert argv[0] == str(root / "opt/kvferry/venv/bin/kvferry")
            if "@" in unit:
                assert env["CUDA_VISIBLE_DEVICES"] == unit.split("@")[1].split(".")[0]
            procs[unit] = subprocess.Popen(argv, env={**base_env, **env}, stdout=subprocess.PIPE,
                                           stderr=subprocess.DEVNULL, text=True, cwd=root)
        for unit, proc in procs.items():
            line = proc.stdout.readline()
            assert line.startswith("READY"), f"{unit}: {line!r} (exit {proc.poll()})"
        deadline = time.monotonic() + 60
        urls = [f"http://127.0.0.1:{http}/health", f"http://127.0.0.1:{metrics}/health",
                f"http://127.0.0.1:{metrics + 1}/health", f"http://127.0.0.1:{metrics + 2}/health"]
        while True:
            codes = []
            for url in urls:
                try:
                    codes.append(httpx.get(url, timeout=2).status_code)
                except httpx.HTTPError:
                    codes.append(0)
            if codes == [200] * len(urls):
                break
            assert time.monotonic() < deadline, dict(zip(urls, codes))
            time.sleep(0.2)
        out = subprocess.run([sys.executable, "-m", "cli.main", "ctl", "status", "--json", "--base-port", str(base)],
                             capture_output=True, text=True, timeout=30, cwd=ROOT, env=base_env)
        assert out.returncode == 0, out.stderr
        host = socket.gethostname().split(".")[0]
        assert sorted(i["worker_id"] for i in json.loads(out.stdout)["instances"]) == [f"{host}-0", f"{host}-1"]
        r = httpx.post(f"http://127.0.0.1:{http}/v1/completions", json={"model": "tiny", "prompt": "hi",
                                                                         "max_tokens": 4}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = {}
        for unit, proc in procs.items():
            try:
                codes[unit] = proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[unit] = "killed"
        env_file.write_text(original)
    # A clean stop exits 0: Restart=on-failure leaves the unit stopped.
    assert all(c == 0 for c in codes.values()), codes


# ---- Prometheus and Grafana ------------------------------------------------------------------------

def test_prometheus_config_scrapes_every_service_of_the_compose_stack():
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert set(jobs) == {"kvferry-frontend", "kvferry-scheduler", "kvferry-worker"}
    targets = {t for j in jobs.values() for sc in j["static_configs"] for t in sc["targets"]}
    services = compose()["services"]
    for target in targets:
        host, port = target.rsplit(":", 1)
        assert host in services, target
        assert f"127.0.0.1:{port}/health" in " ".join(services[host]["healthcheck"]["test"]), target
    assert {t.rsplit(":", 1)[0] for t in targets} == KVFERRY_SERVICES
    assert all(j["metrics_path"] == "/metrics" for j in jobs.values())
    mount = services["prometheus"]["volumes"][0].split(":")
    assert (COMPOSE.parent / mount[0]).resolve() == DEPLOY / "prometheus" / "prometheus.yml"


def test_metrics_table_follows_prometheus_naming():
    docs = documented_metrics()
    assert len(docs) >= 40
    for name, (_, kind) in docs.items():
        # ours, or vLLM's own name of one of them (for dashboards written for vLLM)
        assert re.fullmatch(r"kvferry_[a-z0-9_]+|vllm:[a-z0-9_]+", name), name
        assert name.endswith("_total") == (kind == "counter"), name
        if kind == "histogram":
            assert name.endswith(("_seconds", "_stages", "_tokens")), name  # the unit last


def test_grafana_dashboard_queries_documented_metrics():
    dash = json.loads((DEPLOY / "grafana" / "kvferry-dashboard.json").read_text())
    docs = documented_metrics()
    used = set()
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "kvferry-prometheus", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            for name in re.findall(r"kvferry_\w+", target["expr"]):
                base = re.sub(r"_(bucket|count|sum)$", "", name)
                assert name in docs or base in docs, (panel["title"], name)
                used.add(base if base in docs else name)
    services = {docs[n][0] for n in used}
    assert services == {"frontend", "scheduler", "worker"}
    # Every histogram the issue asks for is on the dashboard.
    assert {"kvferry_time_to_first_token_seconds", "kvferry_inter_token_latency_seconds",
            "kvferry_e2e_request_latency_seconds", "kvferry_dispatch_latency_seconds",
            "kvferry_migration_downtime_seconds"} <= used
    prov = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert prov["datasources"][0]["uid"] == "kvferry-prometheus"
