import os
import subprocess
import sys
from pathlib import Path

import pytest

from bus.config import BusConfig
from services.cli import build_parser, settings_from
from services.settings import ENV, SECTION_OF, SECTIONS, Settings, SettingsError, describe, environment_of, from_env

REPO = Path(__file__).resolve().parents[2]


def test_every_setting_has_one_environment_variable_and_one_section():
    assert ENV["nats_url"] == "NATS_URL" and ENV["redis_url"] == "REDIS_URL"
    assert ENV["edge_port"] == "GROKSTACK_EDGE_PORT"
    assert len(set(ENV.values())) == len(ENV)
    assert sum(len(kind.model_fields) for kind in SECTIONS.values()) == len(SECTION_OF) == len(describe())


def test_environment_is_parsed_by_type_into_sections():
    s = from_env({"NATS_URL": "nats://x:1", "GROKSTACK_EDGE_PORT": "9000",
                  "GROKSTACK_ACK_WAIT_S": "2.5", "GROKSTACK_DATA_DIR": "/tmp/d"})
    assert (s.bus.nats_url, s.edge.edge_port, s.bus.ack_wait_s, s.stack.data_dir) == (
        "nats://x:1", 9000, 2.5, Path("/tmp/d"))


@pytest.mark.parametrize("variable, value, says", [
    ("GROKSTACK_EDGE_PORT", "lots", "valid integer"),
    ("GROKSTACK_EDGE_PORT", "70000", "less than or equal to 65535"),
    ("GROKSTACK_SPEC_METHOD", "none", "'ngram', 'ngram_vllm', 'draft', 'off' or 'auto'"),
    ("GROKSTACK_SERVING_MODE", "both", "'disaggregated' or 'aggregated'"),
    ("GROKSTACK_MAX_SHARE_BATCH", "1.5", "less than or equal to 1"),
    ("GROKSTACK_REGION", "eu.west", "pattern"),
])
def test_a_bad_value_names_the_variable_and_what_it_allows(variable, value, says):
    with pytest.raises(SettingsError) as raised:
        from_env({variable: value})
    assert variable in str(raised.value) and says in str(raised.value) and repr(value) in str(raised.value)


def test_checks_across_fields_of_a_section():
    with pytest.raises(SettingsError, match="GROKSTACK_SPEC_NGRAM_MIN"):
        from_env({"GROKSTACK_SPEC_NGRAM_MIN": "5", "GROKSTACK_SPEC_NGRAM_MAX": "3"})
    with pytest.raises(SettingsError, match="GROKSTACK_SPEC_METHOD=draft needs GROKSTACK_SPEC_DRAFT_MODEL"):
        from_env({"GROKSTACK_SPEC_METHOD": "draft"})


@pytest.mark.parametrize("env, names", [
    ({"GROKSTACK_SPEC_METHOD": "none"}, ["GROKSTACK_SPEC_METHOD", "'ngram', 'ngram_vllm', 'draft', 'off' or 'auto'"]),
    ({"GROKSTACK_ACK_WAIT_S": "-1"}, ["GROKSTACK_ACK_WAIT_S", "greater than 0"]),
])
def test_a_bad_setting_stops_the_process_at_once(env, names):
    """A worker given a bad enum or an out-of-range number exits at start, before it connects to
    anything (no NATS_URL is set here), naming the variable and the allowed values."""
    run = subprocess.run([sys.executable, "-m", "services.cli", "decode"], cwd=REPO, capture_output=True,
                         text=True, timeout=60, env={**os.environ, **env})
    assert run.returncode == 2, run.stderr
    assert all(name in run.stderr for name in names), run.stderr


def test_flags_override_environment_and_are_validated_alike(monkeypatch):
    monkeypatch.setenv("GROKSTACK_REGION", "eu")
    monkeypatch.setenv("GROKSTACK_EDGE_PORT", "9000")
    s = settings_from(build_parser().parse_args(["edge", "--edge-port", "9100"]))
    assert (s.bus.region, s.edge.edge_port) == ("eu", 9100)
    with pytest.raises(SettingsError, match=r"GROKSTACK_EDGE_PORT \(--edge-port\)"):
        settings_from(build_parser().parse_args(["edge", "--edge-port", "-3"]))


def test_each_command_gets_the_flags_of_its_sections():
    edge = build_parser().parse_args(["edge"])
    assert hasattr(edge, "edge_port") and hasattr(edge, "heartbeat_s") and not hasattr(edge, "spec_method")
    decode = build_parser().parse_args(["decode"])
    assert hasattr(decode, "spec_method") and hasattr(decode, "kv_ttl_s") and not hasattr(decode, "api_port")


def test_replace_routes_field_names_to_their_sections_and_validates():
    s = Settings(edge_port=0, subject_prefix="t1")
    assert (s.edge.edge_port, s.bus.subject_prefix) == (0, "t1")
    assert s.replace(region="eu").bus.region == "eu" and s.bus.region == "local"
    with pytest.raises(ValueError):
        s.replace(max_deliver=0)
    with pytest.raises(ValueError, match="unknown setting"):
        s.replace(no_such_setting=1)


def test_bundled_model_lives_in_the_data_dir():
    s = Settings(data_dir=Path("/d"))
    assert Path(s.served.model) == Path("/d/models/SmolLM2-135M-Instruct") and s.uses_bundled_model
    assert s.served.model_id == "SmolLM2-135M-Instruct"
    own = Settings(model="/m/llama", served_model_name="")
    assert own.served.model_id == "llama" and not own.uses_bundled_model
    moved = s.replace(data_dir=Path("/e"))  # the bundled model follows the data directory
    assert Path(moved.served.model) == Path("/e/models/SmolLM2-135M-Instruct") and moved.uses_bundled_model
    assert own.replace(data_dir=Path("/e")).served.model == "/m/llama"


def test_passwords_stay_out_of_the_repr():
    s = Settings(redis_url="redis://grokstack:hunter2@h:6379/0", nats_url="nats://u:pw@h:4222")
    assert "hunter2" not in repr(s) and "pw@" not in repr(s) and "***" in repr(s.kv)
    assert "pw@" not in repr(BusConfig(nats_url="nats://u:pw@h:4222"))


def test_the_environment_handed_down_loads_back_to_the_same_settings():
    s = Settings(edge_port=1234, spec_method="ngram", data_dir=Path("/d"), region="eu")
    assert from_env(environment_of(s)) == s


def test_the_priority_table_is_consistent():
    with pytest.raises(SettingsError, match="GROKSTACK_MAX_SHARE_BATCH .* must not exceed GROKSTACK_MAX_SHARE_STAN"):
        from_env({"GROKSTACK_MAX_SHARE_BATCH": "0.9", "GROKSTACK_MAX_SHARE_STANDARD": "0.6"})
    with pytest.raises(SettingsError, match="GROKSTACK_MIN_SHARE_STANDARD"):
        from_env({"GROKSTACK_MIN_SHARE_STANDARD": "0.7", "GROKSTACK_MIN_SHARE_BATCH": "0.5"})
    table = Settings().priorities.table()
    assert [p.degrades for p in table.values()] == [False, False, True]  # only batch is capped first


def test_log_levels_are_taken_in_either_case():
    assert from_env({"GROKSTACK_LOG_LEVEL": "WARNING"}).stack.log_level == "warning"
