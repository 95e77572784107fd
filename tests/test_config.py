"""Service configuration: TOML file, KVFERRY_* environment, then flags."""

import pytest

from services.config import ConfigFileError, load_config


def test_defaults_file_env_and_flags_layer_in_order(tmp_path):
    f = tmp_path / "kvferry.toml"
    f.write_text('[cluster]\nbase_port = 18000\n[worker]\nmodel = "smollm2"\nmax_num_seqs = 8\n')
    cfg = load_config(f, env={"KVFERRY_WORKER_MAX_NUM_SEQS": "16", "KVFERRY_SCHEDULER_POLICY": "rr", "OTHER": "x"},
                      overrides={"worker": {"max_num_seqs": 32, "model": None}})
    assert cfg.cluster.base_port == 18000
    assert cfg.cluster.scheduler() == "tcp://127.0.0.1:18000"
    assert cfg.worker.model == "smollm2"  # a None flag does not override
    assert cfg.worker.max_num_seqs == 32
    assert cfg.scheduler.policy == "rr"
    assert cfg.worker.resolved_id == "worker-0"


@pytest.mark.parametrize("text,match", [
    ("[worker]\nnope = 1\n", "unknown setting 'nope'"),
    ("[workers]\n", "unknown sections"),
    ("[worker]\nmax_num_seqs = 'x'\n", "expected int"),
    ("[cluster]\nbase_port = 0\n", "base_port"),
    ("[worker\n", "kvferry.toml"),
])
def test_bad_config_names_the_setting(tmp_path, text, match):
    f = tmp_path / "kvferry.toml"
    f.write_text(text)
    with pytest.raises(ConfigFileError, match=match):
        load_config(f, env={})
