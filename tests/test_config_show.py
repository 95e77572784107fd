"""`kvferry config show`: the effective configuration after the file, KVFERRY_* environment and --set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from services.config import load_config, to_toml

ROOT = Path(__file__).resolve().parents[1]


def show(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("KVFERRY_")}
    return subprocess.run([sys.executable, "-m", "cli.main", "config", "show", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT, env={**base, **(env or {})})


def test_file_then_environment_then_set(tmp_path):
    cfg = tmp_path / "kvferry.toml"
    cfg.write_text('[cluster]\nbase_port = 18000\nhttp_port = 9000\n[worker]\nmodel = "smollm2"\nmax_num_seqs = 8\n'
                   '[scheduler]\npolicy = "load"\n')
    out = show("--config", str(cfg), "--set", "cluster.http_port=9100",
               env={"KVFERRY_WORKER_MAX_NUM_SEQS": "16", "KVFERRY_CLUSTER_HTTP_PORT": "9050",
                    "KVFERRY_SCHEDULER_MIGRATE_OUT_BELOW": "5"})
    assert out.returncode == 0, out.stderr
    data = tomllib.loads(out.stdout)
    assert set(data) == {"cluster", "scheduler", "worker", "frontend", "supervisor"}
    assert data["cluster"]["base_port"] == 18000  # file
    assert data["worker"]["model"] == "smollm2" and data["scheduler"]["policy"] == "load"  # file
    assert data["worker"]["max_num_seqs"] == 16  # environment over file
    assert data["scheduler"]["migrate_out_below"] == 5.0  # environment over default
    assert data["cluster"]["http_port"] == 9100  # --set over environment
    assert data["frontend"]["max_inflight"] == 1024  # default


def test_output_is_a_config_file_that_loads_back_the_same(tmp_path):
    out = show("--config", str(ROOT / "deploy" / "kvferry.toml"),
               env={"KVFERRY_CLUSTER_OVERRIDES": '{scheduler = "tcp://10.0.0.1:17100"}'})
    assert out.returncode == 0, out.stderr
    saved = tmp_path / "effective.toml"
    saved.write_text(out.stdout)
    again = load_config(saved, env={})
    expected = load_config(ROOT / "deploy" / "kvferry.toml",
                           env={"KVFERRY_CLUSTER_OVERRIDES": '{scheduler = "tcp://10.0.0.1:17100"}'})
    assert again == expected
    assert again.cluster.scheduler() == "tcp://10.0.0.1:17100"


def test_section_and_json():
    out = show("--section", "worker", "--json", env={"KVFERRY_WORKER_ENGINE": "sim"})
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert list(data) == ["worker"] and data["worker"]["engine"] == "sim"
    out = show("--section", "scheduler")
    assert out.returncode == 0 and list(tomllib.loads(out.stdout)) == ["scheduler"]


def test_secrets_are_masked_unless_asked():
    env = {"KVFERRY_FRONTEND_API_KEY": "s3cret"}
    out = show("--section", "frontend", env=env)
    assert "s3cret" not in out.stdout and tomllib.loads(out.stdout)["frontend"]["api_key"] == "********"
    out = show("--section", "frontend", "--show-secrets", env=env)
    assert tomllib.loads(out.stdout)["frontend"]["api_key"] == "s3cret"


def test_errors_name_the_setting(tmp_path):
    out = show(env={"KVFERRY_WORKER_NO_SUCH": "1"})
    assert out.returncode == 2 and "no_such" in out.stderr
    out = show("--set", "worker.max_num_seqs=many")
    assert out.returncode == 2 and "max_num_seqs" in out.stderr
    out = show("--set", "nosection.x=1")
    assert out.returncode == 2 and "unknown section" in out.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[workers]\nmodel = 1\n")
    out = show("--config", str(bad))
    assert out.returncode == 2 and "unknown sections" in out.stderr


def test_toml_writer_round_trips_awkward_values():
    data = {"a": {"s": 'quote " and \\ back\nslash', "f": float("inf"), "g": -0.5, "b": False, "n": 3,
                  "t": {"x.y": "tcp://h:1"}}}
    assert tomllib.loads(to_toml(data)) == data
