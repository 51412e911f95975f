"""The real stack for integration tests: vLLM with the bundled model, as separate processes.

Order matters for memory and CPU on a 2-core machine: the reference outputs come from one
plain vLLM engine in this process, which is shut down before the stack's two engines start.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from bus.messages import ChatMessage, SamplingSpec
from bus.subjects import Subjects
from services.embedded import free_port
from services.lab.spec_bench import GROUNDED
from services.settings import ENV, Settings
from services.supervisor import Supervisor, child_environment
from tests.conftest import REPO, provisioned, unique_prefix

SHORT = [{"role": "user", "content": "What is the capital of France?"}]
LONG = [{"role": "system", "content": "You are a careful assistant. " * 20},
        {"role": "user", "content": "Write a short poem about the sea and the sky, in four lines."}]
# Direct-job tests have their own prompt: its KV in Redis must not turn the websocket tests'
# first-time writes into cache hits.
DIRECT = [{"role": "user", "content": "What is the capital of Italy?"}]
# The OpenAI API and resume tests likewise (several runs of it: later ones hit the KV cache).
API = [{"role": "user", "content": "Name three rivers in Europe and the countries they cross."}]
# An answer that copies from its prompt: speculation (on by default) drafts and is accepted.
COPY = [{"role": "user", "content": GROUNDED[1]}]
REFERENCE_PROMPTS = {"short": SHORT, "long": LONG, "direct": DIRECT, "api": API, "copy": COPY}
# The completions API's plain text prompt (no chat template)
TEXT = "The three primary colours of light are"
MAX_TOKENS = 40


@dataclass
class Reference:
    prompt_token_ids: list[int]
    text: str


@dataclass
class RunningStack:
    settings: Settings
    url: str
    procs: dict[str, subprocess.Popen]
    logs: Path
    supervisor: Supervisor  # started the processes; stops them all at the end of the session

    @property
    def subjects(self) -> Subjects:
        return self.settings.bus.subjects

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.edge.api_port}/v1"

    @property
    def page_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.edge.edge_port}/"


@dataclass
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    start_ns: int
    end_ns: int


class OtlpReceiver:
    """What an OpenTelemetry collector would receive over OTLP/HTTP (protobuf), kept in memory:
    the stack's processes export their spans here (GROKSTACK_OTLP_TRACES_ENDPOINT)."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )
        self.spans: list[Span] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                request = ExportTraceServiceRequest.FromString(body)
                for resource in request.resource_spans:
                    service = next((a.value.string_value for a in resource.resource.attributes
                                    if a.key == "service.name"), "")
                    for scope in resource.scope_spans:
                        receiver.spans += [Span(service, s.name, s.trace_id.hex(), s.span_id.hex(),
                                                s.parent_span_id.hex(), s.start_time_unix_nano, s.end_time_unix_nano)
                                           for s in scope.spans]
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="session")
def otlp_receiver() -> OtlpReceiver:
    receiver = OtlpReceiver()
    yield receiver
    receiver.server.shutdown()


@pytest.fixture(scope="session")
def engine_settings(nats_url: str, nats_credentials: str, redis_url: str, otlp_receiver: OtlpReceiver) -> Settings:
    prefix = unique_prefix()
    return provisioned(Settings(nats_url=nats_url, nats_credentials=nats_credentials, redis_url=redis_url,
                                otlp_traces_endpoint=otlp_receiver.url, subject_prefix=prefix,
                                kv_key_prefix=f"gskv:{prefix}", data_dir=REPO / ".data", edge_port=free_port(),
                                api_port=free_port(), heartbeat_s=0.5, worker_id=prefix, log_format="json",
                                engine_step_lock=str(REPO / ".data" / f"{prefix}.step.lock"),
                                # every prompt through the prefill engine and its KV through Redis:
                                # the path these tests hold to a plain engine's answers (short
                                # prompts handed to decode have tests of their own)
                                decode_prefill_max_tokens=0))


def in_process(settings: Settings) -> Settings:
    """Settings for an engine started in the test process: without the OTLP endpoint, as vLLM
    would make its tracer provider this process's (set once: the pipeline tests' would be refused)."""
    return settings.replace(otlp_traces_endpoint="")


@pytest.fixture(scope="session")
def reference(engine_settings: Settings) -> dict[str, Reference]:
    """Greedy answers of one plain vLLM engine (no bus, no KV connector) to the test prompts."""
    from inference.pools import DIRECT
    from services.processes import vllm_engine

    async def run() -> dict[str, Reference]:
        engine = vllm_engine(in_process(engine_settings), DIRECT)
        await engine.start()
        out = {}
        for name, messages in REFERENCE_PROMPTS.items():
            ids = engine.render_chat([ChatMessage(**m) for m in messages])
            text = "".join([c.text async for c in engine.generate(
                f"ref-{name}", ids, SamplingSpec(max_tokens=MAX_TOKENS, temperature=0.0), MAX_TOKENS)])
            out[name] = Reference(ids, text)
        ids = engine.tokenize(TEXT)
        out["text"] = Reference(ids, "".join([c.text async for c in engine.generate(
            "ref-text", ids, SamplingSpec(max_tokens=MAX_TOKENS, temperature=0.0), MAX_TOKENS)]))
        await engine.shutdown()
        return out

    return asyncio.run(run())


@pytest.fixture(scope="session")
def vllm_stack(reference, engine_settings: Settings, tmp_path_factory) -> RunningStack:
    """Prefill, decode and edge processes, ready when each one's health endpoint says so (the
    workers' /readyz on their metrics ports, the edge's /readyz); stopped, newest first, at the end
    with every worker tests added through `spawn_worker`."""
    logs = tmp_path_factory.mktemp("stack-logs")
    env = child_environment(engine_settings)
    supervisor = Supervisor()
    try:
        for role in ("prefill", "decode", "edge"):
            if role == "edge":
                role_env, port = env, engine_settings.edge.edge_port
            else:  # each worker answers /readyz on a metrics port of its own
                port = free_port()
                role_env = {**env, ENV["metrics_port"]: str(port)}
            supervisor.start(role, [sys.executable, "-m", "services.cli", role], env=role_env, cwd=REPO,
                             log=logs / f"{role}.log", ready_url=f"http://127.0.0.1:{port}/readyz", grace_s=60)
        supervisor.wait_ready(600)  # a RuntimeError naming the process and its log if one exits or is late
        procs = {child.name: child.proc for child in supervisor.children()}
        yield RunningStack(engine_settings, f"ws://127.0.0.1:{engine_settings.edge.edge_port}", procs, logs,
                           supervisor)
    finally:
        supervisor.stop_all()


def spawn_worker(stack: RunningStack, settings: Settings, role: str) -> subprocess.Popen:
    """One more worker process beside the stack's, logging to `<logs>/<worker id>.log` (its
    region's streams provisioned first); the stack's teardown stops it if the test did not."""
    provisioned(settings)
    return stack.supervisor.start(settings.bus.worker_id, [sys.executable, "-m", "services.cli", role],
                                  env=child_environment(settings), cwd=REPO,
                                  log=stack.logs / f"{settings.bus.worker_id}.log", grace_s=60).proc


def wait_for_heartbeat(settings: Settings, role: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    """Until the worker `settings.bus.worker_id` says it serves (its engine has started); at once
    a RuntimeError if its process `proc` exits first."""
    import nats

    from bus.codec import decode
    from bus.credentials import BusAuth
    from bus.messages import Heartbeat

    async def wait() -> None:
        nc = await nats.connect(settings.bus.nats_url, **BusAuth.of(settings.bus, "ops").connect_options())
        try:
            sub = await nc.subscribe(settings.bus.subjects.heartbeat(settings.bus.region, role))
            deadline = asyncio.get_running_loop().time() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"the {role} worker {settings.bus.worker_id} exited ({proc.returncode}) "
                                       "before it served")
                try:
                    beat = decode((await sub.next_msg(timeout=1.0)).data, Heartbeat)
                except nats.errors.TimeoutError:
                    if asyncio.get_running_loop().time() > deadline:
                        raise
                    continue
                if beat.worker_id == settings.bus.worker_id:
                    return
        finally:
            await nc.close()
    asyncio.run(wait())
