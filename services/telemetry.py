"""Serving the metrics every package declares: one registry per process that collects them all.

bus/metrics.py, edge/metrics.py and inference/metrics.py each keep their own registry (not
prometheus_client's default one: vLLM registers its `vllm:*` metrics there, and some of them
clash in OpenMetrics, which makes a whole OpenMetrics scrape unparseable). This process registry
collects theirs, plus the process collector (`process_start_time_seconds`, CPU and memory:
`grokstack cost --metrics` takes workers' uptime from it). One process may hold an edge and
several workers (the tests do); one scrape then shows them all, told apart by their labels.
A worker process serves its /healthz and /readyz beside /metrics (`serve_metrics`' checks).

A process binds its own metrics port (0: a free one) and, under `grokstack up`, reports it in its
ports file (`report_ports`), which its supervisor reads (`read_ports`): a port picked in advance
by the supervisor could be taken by anything else before the process binds it.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import threading
from pathlib import Path
from typing import Callable, Mapping
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import prometheus_client
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, make_wsgi_app
from prometheus_client.metrics_core import Metric
from prometheus_client.exposition import ThreadingWSGIServer, choose_encoder

from bus import metrics as bus_metrics
from edge import metrics as edge_metrics
from inference import metrics as inference_metrics

REGISTRY = CollectorRegistry()
for _package in (bus_metrics, edge_metrics, inference_metrics):
    REGISTRY.register(_package.REGISTRY)
prometheus_client.ProcessCollector(registry=REGISTRY)

VLLM_PATH = "/metrics/vllm"


class ModelNamed:
    """What a scrape shows: every sample of `registry` with the served model's name as the label
    `model_name` (vLLM's label for it), so the dashboards of a vLLM operator filter ours alike."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.model_name = ""

    def collect(self):
        for family in self.registry.collect():
            named = Metric(family.name, family.documentation, family.type, family.unit)
            named.samples = [s._replace(labels={**s.labels, "model_name": self.model_name}) for s in family.samples]
            yield named


SERVED = ModelNamed(REGISTRY)


def set_model_name(name: str) -> None:
    """The model this process serves (settings.served.model_id), on every metric it serves."""
    SERVED.model_name = name


class VllmOnly:
    """vLLM's own metrics (`vllm:*`, in prometheus_client's default registry, where vLLM's engine
    registers them in a worker process), for its dashboards and autoscalers (production-stack's,
    KEDA on vllm:num_requests_waiting). Served apart, at /metrics/vllm and in the classic text
    format only: some of them clash in OpenMetrics, which would make a whole scrape unparseable."""

    def collect(self):
        for family in prometheus_client.REGISTRY.collect():
            if family.name.startswith("vllm:"):
                yield family


def exposition(accept: str) -> tuple[bytes, str]:
    """The registry in the format the scraper's Accept header asks for: OpenMetrics (with
    exemplars) for `application/openmetrics-text`, else the classic text format."""
    encoder, content_type = choose_encoder(accept)
    return encoder(SERVED), content_type


def vllm_exposition() -> bytes:
    return generate_latest(VllmOnly())  # type: ignore[arg-type]


# A health check answers (ok, body): 200 or 503 with the body, as the edge's /healthz and /readyz do.
HealthCheck = Callable[[], tuple[bool, str]]

_servers: dict[int, WSGIServer] = {}


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Scrapes and probes come every few seconds: not worth a line each."""


def _app(checks: Mapping[str, HealthCheck]):
    """/metrics as prometheus_client serves it (any other path too, as its own server does), and
    each of `checks` at its path."""
    metrics = make_wsgi_app(SERVED)  # type: ignore[arg-type]

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == VLLM_PATH:
            start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
            return [vllm_exposition()]
        check = checks.get(path)
        if check is None:
            return metrics(environ, start_response)
        try:
            ok, body = check()
        except Exception as exc:  # a check that fails says no, with the reason
            ok, body = False, f"{type(exc).__name__}: {exc}\n"
        start_response("200 OK" if ok else "503 Service Unavailable",
                       [("Content-Type", "text/plain; charset=utf-8")])
        return [body.encode()]
    return app


def serve_metrics(host: str, port: int, checks: Mapping[str, HealthCheck] | None = None) -> int:
    """Serve /metrics, and the health `checks` by path (e.g. /healthz, /readyz), from a thread of
    this process (0: a free port); returns the port. /metrics negotiates the format as
    `exposition` does. A thread, not the event loop: a scrape must not wait for a busy loop."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    server_class = type("MetricsServer", (ThreadingWSGIServer,), {"address_family": family})
    server = make_server(host, port, _app(checks or {}), server_class, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name=f"metrics-{server.server_port}", daemon=True).start()
    bound = int(server.server_port)
    _servers[bound] = server
    return bound


def stop_serving(port: int) -> None:
    server = _servers.pop(port, None)
    if server is not None:
        server.shutdown()
        server.server_close()


def report_ports(path: str | Path, **ports: int) -> None:
    """Merge `ports` (e.g. metrics_port=8123) into the JSON file at `path`, atomically (a reader
    sees the old file or the new one); nothing when `path` is empty (not run by `grokstack up`)."""
    if not path:
        return
    path = Path(path)
    merged = {**(read_ports(path) or {}), **ports}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(merged))
    os.replace(tmp, path)


def read_ports(path: str | Path) -> dict[str, int] | None:
    """What a process reported in its ports file; None until it did."""
    try:
        return {str(k): int(v) for k, v in json.loads(Path(path).read_text()).items()}
    except (FileNotFoundError, ValueError, AttributeError):
        return None


def trace_to(endpoint: str, service: str) -> None:
    """Export this process's spans over OTLP/HTTP to `endpoint`, as service `grokstack-<service>`;
    without an endpoint nothing is set up and OpenTelemetry's API stays a no-op."""
    if not endpoint:
        return
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": f"grokstack-{service}"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    trace.set_tracer_provider(provider)
    atexit.register(provider.shutdown)  # what is still batched goes out on a clean exit

