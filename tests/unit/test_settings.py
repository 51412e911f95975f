from pathlib import Path

import pytest

from services.cli import build_parser, settings_from
from services.settings import ENV, Settings, from_env


def test_every_setting_has_one_environment_variable():
    assert ENV["nats_url"] == "NATS_URL" and ENV["redis_url"] == "REDIS_URL"
    assert ENV["edge_port"] == "GROKSTACK_EDGE_PORT"
    assert len(set(ENV.values())) == len(ENV)


def test_environment_is_parsed_by_type():
    s = from_env({"NATS_URL": "nats://x:1", "GROKSTACK_EDGE_PORT": "9000",
                  "GROKSTACK_ACK_WAIT_S": "2.5", "GROKSTACK_DATA_DIR": "/tmp/d"})
    assert (s.nats_url, s.edge_port, s.ack_wait_s, s.data_dir) == ("nats://x:1", 9000, 2.5, Path("/tmp/d"))


def test_a_bad_value_names_the_variable():
    with pytest.raises(SystemExit, match="GROKSTACK_EDGE_PORT"):
        from_env({"GROKSTACK_EDGE_PORT": "lots"})


def test_flags_override_environment(monkeypatch):
    monkeypatch.setenv("GROKSTACK_REGION", "eu")
    monkeypatch.setenv("GROKSTACK_EDGE_PORT", "9000")
    args = build_parser().parse_args(["edge", "--edge-port", "9100"])
    s = settings_from(args)
    assert (s.region, s.edge_port) == ("eu", 9100)


def test_bundled_model_lives_in_the_data_dir():
    s = Settings(data_dir=Path("/d"))
    assert s.model_dir == Path("/d/models/SmolLM2-135M-Instruct")
    assert s.model_id == "SmolLM2-135M-Instruct"
    assert Settings(model="/m/llama", served_model_name="").model_id == "llama"
