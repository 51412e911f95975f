"""`grokstack publish`, `replay` and `trace` as a user runs them: the console script in a
subprocess, against the real servers and a stack (fake engine) in this process."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from tests.pipeline.harness import running_stack
from tests.pipeline.test_chat_flow import engines, expected

GROKSTACK = str(Path(sys.executable).parent / "grokstack")


async def grokstack(settings, *args: str, timeout: float = 60.0) -> tuple[int, str, str]:
    env = {**os.environ, "NATS_URL": settings.bus.nats_url, "GROKSTACK_NATS_CREDENTIALS": settings.bus.nats_credentials,
           "GROKSTACK_SUBJECT_PREFIX": settings.bus.subject_prefix, "GROKSTACK_LOG_LEVEL": "warning"}
    proc = await asyncio.create_subprocess_exec(GROKSTACK, *args, env=env,
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()


async def test_publish_follows_the_tokens_and_no_wait_prints_the_id(settings):
    async with running_stack(settings, *engines(settings)):
        code, out, err = await grokstack(settings, "publish", "hello from the cli",
                                         "--max-tokens", "60", "--temperature", "0")
        assert code == 0, err
        assert out == expected("hello from the cli")
        assert "[stop:" in err and "completion tokens]" in err

        code, out, err = await grokstack(settings, "publish", "--no-wait", "--idempotency-key",
                                         "later-1", "fire and forget")
        assert code == 0 and out.strip() == "later-1", err
        code, out, err = await grokstack(settings, "publish", "--attach", "later-1")
        assert code == 0 and out == expected("fire and forget"), err


async def test_publish_from_a_json_file(settings, tmp_path):
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"messages": [{"role": "user", "content": "from a file"}],
                               "priority": "interactive", "max_tokens": 60}))
    async with running_stack(settings, *engines(settings)):
        code, out, err = await grokstack(settings, "publish", "--json", str(job))
    assert code == 0 and out == expected("from a file"), err


async def test_publish_a_batch_file_with_progress_and_results(settings, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    lines = [{"prompt": f"batch job {n}", "priority": "batch", "max_tokens": 60} for n in range(5)]
    lines.insert(2, {"prompt": "bad", "max_tokens": 0})  # invalid: reported on its line
    jobs.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out_file = tmp_path / "answers.jsonl"
    async with running_stack(settings, *engines(settings)):
        code, _, err = await grokstack(settings, "publish", "--file", str(jobs), "--out",
                                       str(out_file), "--concurrency", "3")
    results = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert code == 1  # one line failed
    assert [r["line"] for r in results] == [1, 2, 3, 4, 5, 6]
    good = [r for r in results if r["line"] != 3]
    assert [r["text"] for r in good] == [expected(f"batch job {n}") for n in range(5)]
    assert all(r["finish_reason"] == "stop" and r["error"] is None for r in good)
    assert "max_tokens" in results[2]["error"] and results[2]["text"] is None
    assert "publishing jobs.jsonl" in err and "6/6" in err  # the progress bar
    assert "5 answered, 1 failed" in err


async def test_replay_and_trace_commands(settings, tmp_path):
    async with running_stack(settings, *engines(settings)):
        code, _, err = await grokstack(settings, "publish", "--idempotency-key", "traced-1",
                                       "--max-tokens", "30", "look at me")
        assert code == 0, err
        code, lines, err = await grokstack(settings, "replay", "--request", "traced-1")
        assert code == 0, err
        dump = tmp_path / "dump.jsonl"
        code, _, err = await grokstack(settings, "replay", "--request", "traced-1", "--out", str(dump))
        assert code == 0, err
        code, timeline, err = await grokstack(settings, "trace", "traced-1")
        assert code == 0, err
        code, rerun, err = await grokstack(settings, "replay", "--request", "traced-1", "--rerun")
        assert code == 0 and "identical" in rerun, (rerun, err)
        code, _, err = await grokstack(settings, "replay", "--request", "traced-1", "--republish",
                                       "--to-prefix", settings.bus.subject_prefix)
        assert code == 2 and "--live" in err
    text = lines.splitlines()
    assert "request traced-1" in text[0] and "final traced-1" in text[-1]
    records = [json.loads(line) for line in dump.read_text().splitlines()]
    assert len(records) == len(text) and records[0]["message"]["type"] == "chat_request"
    assert "trace of traced-1" in timeline and "first token" in timeline


async def test_publish_with_a_client_login_and_a_clear_error_without_one(settings):
    async with running_stack(settings, *engines(settings)):
        code, out, err = await grokstack(settings, "publish", "--client", "public:dev", "as a back-end",
                                         "--max-tokens", "60")
        assert code == 0 and out == expected("as a back-end"), err
        code, _, err = await grokstack(settings, "publish", "--client", "acme:billing", "not mine")
        assert code == 1 and "no NATS client logins matching client:acme:billing" in err


async def test_provision_makes_the_streams_a_runtime_role_waits_for(settings):
    fresh = settings.replace(subject_prefix="tprov" + settings.bus.subject_prefix[1:])
    code, out, err = await grokstack(fresh, "provision")
    assert code == 0, err
    s = fresh.bus.subjects
    assert out.split() == [s.stream("req", "local"), s.stream("decode", "local"), s.stream("capture", "local"),
                           s.stream("dlq", "local")]
    code, out, err = await grokstack(fresh.replace(nats_url="nats://127.0.0.1:1"), "provision")
    assert code == 1 and "cannot connect to NATS" in err
