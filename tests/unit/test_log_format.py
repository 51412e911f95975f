"""One log format for everything a process writes (services/logs.py): our structlog lines, the
standard library's records (nats, aiohttp, asyncio, vLLM, our KV connector), warnings, uncaught
exceptions, and the lines of a child process that vLLM starts with spawn. Each case runs in a
process of its own, configured as a grokstack process is."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from tests.conftest import REPO

PROCESS = """
import json, logging, logging.config, os, sys, threading, warnings

import structlog

from bus.log_context import request_context
from services import logs

fmt, level = sys.argv[1], sys.argv[2]
logs.configure(level, fmt, process="decode")
log = structlog.get_logger("grokstack.test")
log.info("outside")
log.debug("our debug")

# A library that prints its records itself (transformers, torch and huggingface_hub add a stderr
# handler when imported), then the configuration applied again, as vLLM does after its imports.
library = logging.getLogger("transformers.modeling")
printing = logging.StreamHandler(sys.stderr)
printing.setFormatter(logging.Formatter("PLAIN %(message)s"))
library.addHandler(printing)
library.propagate = False
with open(os.environ["VLLM_LOGGING_CONFIG_PATH"]) as file:
    logging.config.dictConfig(json.load(file))
library.warning("library warning")

with request_context("req-7", "eu", "high"):
    log.info("structlog line", tokens=3)
    logging.getLogger("nats.aio.client").warning("nats warning %s", "x")
    logging.getLogger("nats.aio.client").info("nats info")
    logging.getLogger("aiohttp.access").info("access line")
    logging.getLogger("asyncio").debug("asyncio debug")
    logging.getLogger("vllm.v1.engine.core").info("vllm info")
    logging.getLogger("vllm.v1.engine.core").debug("vllm debug")
    logging.getLogger("grokstack.kv_store").info("connector info")
    logging.getLogger("grokstack.kv_store").debug("connector debug")
    warnings.warn("careful", UserWarning)
    try:
        1 / 0
    except ZeroDivisionError:
        logging.getLogger("aiohttp.server").exception("handler failed")


def fail():
    raise RuntimeError("in thread")


thread = threading.Thread(target=fail, name="helper")
thread.start()
thread.join()
raise RuntimeError("uncaught")
"""

IN_REQUEST = {"structlog line", "nats warning x", "vllm info", "connector info", "handler failed"}
ALWAYS = IN_REQUEST | {"outside", "library warning", "uncaught exception in thread", "uncaught exception"}
NEVER = {"nats info", "access line", "asyncio debug", "vllm debug"}  # libraries at WARNING, vLLM at INFO
OURS_DEBUG = {"our debug", "connector debug"}


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("VLLM_LOGGING_CONFIG_PATH", None)
    return subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def json_lines(stderr: str) -> list[dict]:
    lines = stderr.splitlines()
    assert lines
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}\n--- stderr:\n{stderr}")
    return parsed


@pytest.mark.parametrize("level", ["info", "debug"])
def test_every_line_is_json_with_the_request_bound(level):
    result = run(PROCESS, "json", level)
    assert result.returncode == 1  # the uncaught exception
    assert result.stdout == ""
    lines = json_lines(result.stderr)
    for line in lines:
        assert {"level", "timestamp", "event", "logger"} <= line.keys(), line
        assert line["process"] == "decode", line
    by_event = {line["event"].split(":")[0] if line["logger"] == "py.warnings" else line["event"]: line
                for line in lines}
    warning = next(line for line in lines if line["logger"] == "py.warnings")
    assert "UserWarning: careful" in warning["event"] and warning["level"] == "warning"
    expected = ALWAYS | (OURS_DEBUG if level == "debug" else set())
    assert {e for e in by_event if not e.startswith("<string>")} == expected
    for event in IN_REQUEST:
        assert (by_event[event]["request_id"], by_event[event]["region"], by_event[event]["priority"]) == \
            ("req-7", "eu", "high"), by_event[event]
    assert warning["request_id"] == "req-7"
    for event in ALWAYS - IN_REQUEST:
        assert "request_id" not in by_event[event], by_event[event]
    assert by_event["nats warning x"]["logger"] == "nats.aio.client"
    assert by_event["vllm info"]["logger"] == "vllm.v1.engine.core"
    assert by_event["library warning"]["logger"] == "transformers.modeling"
    assert by_event["structlog line"]["tokens"] == 3
    assert "ZeroDivisionError" in by_event["handler failed"]["exception"]
    assert by_event["uncaught exception"]["level"] == "critical"
    assert "RuntimeError: uncaught" in by_event["uncaught exception"]["exception"]
    assert by_event["uncaught exception in thread"]["thread"] == "helper"
    assert "RuntimeError: in thread" in by_event["uncaught exception in thread"]["exception"]


def test_console_format_has_the_same_fields_and_no_json():
    result = run(PROCESS, "console", "info")
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert not [line for line in lines if line.lstrip().startswith("{")], result.stderr
    assert "PLAIN" not in result.stderr

    def line_of(event: str) -> str:
        return next(line for line in lines if event in line)
    for event in IN_REQUEST:
        line = line_of(event)
        for field in ("request_id=req-7", "region=eu", "priority=high", "process=decode"):
            assert field in line, line
    assert "[nats.aio.client]" in line_of("nats warning x") and "warning" in line_of("nats warning x")
    assert "[vllm.v1.engine.core]" in line_of("vllm info")
    assert "request_id" not in line_of("outside")
    assert "nats info" not in result.stderr and "vllm debug" not in result.stderr
    assert "RuntimeError: uncaught" in result.stderr  # the traceback, rendered for a person


CHILD = """
import json, logging, logging.config, multiprocessing, os, sys, warnings

from services import logs


def engine_core():
    # What vLLM does first in each process it starts: apply the logging configuration the parent's
    # VLLM_LOGGING_CONFIG_PATH named (vllm.logger.configure_logging).
    with open(os.environ["VLLM_LOGGING_CONFIG_PATH"]) as file:
        logging.config.dictConfig(json.load(file))
    logging.getLogger("vllm.v1.engine.core").info("engine core line")
    logging.getLogger("grokstack.kv_store").warning("connector line")
    import structlog
    structlog.get_logger("grokstack.x").info("structlog in child")
    warnings.warn("child warning")


if __name__ == "__main__":
    logs.configure("info", sys.argv[1], process="decode")
    child = multiprocessing.get_context("spawn").Process(target=engine_core, name="EngineCore_DP0")
    child.start()
    child.join()
    sys.exit(child.exitcode)
"""


def test_a_spawned_child_writes_the_same_format(tmp_path):
    script = tmp_path / "child.py"  # spawn re-imports the main module: it must be a file
    script.write_text(CHILD)
    result = run(f"import runpy; runpy.run_path({str(script)!r}, run_name='__main__')", "json")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    lines = json_lines(result.stderr)
    events = {line["event"].split(":")[0] if line["logger"] == "py.warnings" else line["event"] for line in lines}
    assert {"engine core line", "connector line", "structlog in child"} <= events, lines
    assert any("child warning" in line["event"] for line in lines)
    for line in lines:
        assert line["process"] == "decode" and line["subprocess"] == "EngineCore_DP0", line


WHERE = """
import json, os, stat, sys
from services import logs
logs.configure("info", "json", process="x")
path = os.environ["VLLM_LOGGING_CONFIG_PATH"]
print(json.dumps({"path": path, "configure": os.environ["VLLM_CONFIGURE_LOGGING"],
                  "mode": stat.S_IMODE(os.stat(path).st_mode), "config": json.load(open(path))}))
"""


def test_vllm_is_pointed_at_this_process_configuration():
    env_before = {**os.environ, "VLLM_CONFIGURE_LOGGING": "0"}  # an operator's value is overridden
    result = subprocess.run([sys.executable, "-c", WHERE], cwd=REPO, env={**env_before, "PYTHONPATH": str(REPO)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["configure"] == "1"
    assert out["mode"] == stat.S_IRUSR | stat.S_IWUSR  # a dictConfig file can name code to run
    assert out["config"]["formatters"]["grokstack"]["()"] == "services.logs.formatter"
    assert out["config"]["loggers"]["vllm"]["level"] == "INFO"
    assert not os.path.exists(out["path"])  # removed when the process exits
