"""vLLM's real log lines in the stack's format (services/logs.py): a process configured as a worker
is, with the stack's engine (vLLM's front end here, its engine core and model worker in processes it
spawns), answers one request. Redis is not there, so our KV connector, inside the engine core,
warns that its lookups fail: its lines too."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from services.embedded import free_port
from tests.conftest import REPO

pytestmark = pytest.mark.engine

REQUEST = "req-engine-logs"
WORKER = f"""
import asyncio, logging, sys

from services import logs


async def main(data_dir, secret_file, redis_url):
    import structlog

    from bus.log_context import request_context
    from bus.messages import SamplingSpec
    from inference.pools import pool_named
    from kv_store.records import KvRequest
    from services.processes import vllm_engine
    from services.settings import Settings

    settings = Settings(data_dir=data_dir, secret_file=secret_file, redis_url=redis_url, max_model_len=512)
    engine = vllm_engine(settings, pool_named("aggregated"))
    await engine.start()
    try:
        with request_context({REQUEST!r}, "eu", "high"):
            structlog.get_logger("grokstack.test").info("generating")
            sampling = SamplingSpec(max_tokens=4, temperature=0.0)
            async for _ in engine.generate({REQUEST!r}, list(range(100, 180)), sampling, 4,
                                           kv=KvRequest({REQUEST!r}, "")):
                pass
            logging.getLogger("nats.aio.client").warning("a library line in the request")
    finally:
        await engine.shutdown()


if __name__ == "__main__":
    logs.configure("info", "json", process="aggregated")
    asyncio.run(main(*sys.argv[1:]))
"""
# Lines no code of ours or vLLM's formats: torch's C++ code writes to the file descriptor itself
# (c10's own logging; today one line, a NUMA binding notice, in the model worker), and Python's
# multiprocessing resource tracker, a bare interpreter, warns when vLLM's shutdown, which kills its
# engine core after a 5 s grace, left a shared memory segment behind (a warning and its source line).
CPP_LINE = re.compile(r"^\[[IWEF]\d{4} \d\d:\d\d:\d\d")
TRACKER_LINE = re.compile(r"multiprocessing/resource_tracker\.py:\d+: \w+Warning: resource_tracker: ")


def test_vllm_lines_from_every_engine_process_are_json(tmp_path):
    script = tmp_path / "worker.py"  # vLLM spawns its processes: the main module must be a file
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, str(script), str(REPO / ".data"), str(tmp_path / "secret"),
         f"redis://127.0.0.1:{free_port()}/0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    assert result.stdout == ""
    lines, foreign = [], []
    for line in result.stderr.splitlines():
        if CPP_LINE.match(line) or TRACKER_LINE.search(line) or (
                foreign and TRACKER_LINE.search(foreign[-1]) and line.startswith("  ")):
            foreign.append(line)
            continue
        try:
            lines.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}\n--- stderr:\n{result.stderr[-5000:]}")
    assert len([line for line in foreign if CPP_LINE.match(line)]) <= 2, foreign
    for line in lines:
        assert {"level", "timestamp", "event", "logger"} <= line.keys(), line
        assert line["process"] == "aggregated", line

    vllm = [line for line in lines if line["logger"].startswith("vllm.")]
    assert any(line["level"] == "info" and "subprocess" not in line for line in vllm)  # the front end
    assert any(line["level"] == "info" and line.get("subprocess", "").startswith("EngineCore") for line in vllm)
    assert any(line.get("subprocess", "").startswith("VllmWorker") for line in vllm)  # the model's process
    connector = [line for line in lines if line["logger"] == "grokstack.kv_store"]
    assert any("kv lookup failed" in line["event"] and line.get("subprocess", "").startswith("EngineCore")
               for line in connector), connector
    in_request = {line["event"]: line for line in lines if line.get("request_id") == REQUEST}
    assert {"generating", "a library line in the request"} <= in_request.keys()
    assert in_request["a library line in the request"]["region"] == "eu"
    assert "checkpoint shards" not in result.stderr  # no progress bar
