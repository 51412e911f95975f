"""Serving the metrics every package declares: one registry per process that collects them all.

bus/metrics.py, edge/metrics.py and inference/metrics.py each keep their own registry (not
prometheus_client's default one: vLLM registers its `vllm:*` metrics there, and some of them
clash in OpenMetrics, which makes a whole OpenMetrics scrape unparseable). This process registry
collects theirs, plus the process collector (`process_start_time_seconds`, CPU and memory:
`grokstack cost --metrics` takes workers' uptime from it). One process may hold an edge and
several workers (the tests do); one scrape then shows them all, told apart by their labels.
"""

from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.exposition import choose_encoder

from bus import metrics as bus_metrics
from edge import metrics as edge_metrics
from inference import metrics as inference_metrics

REGISTRY = CollectorRegistry()
for _package in (bus_metrics, edge_metrics, inference_metrics):
    REGISTRY.register(_package.REGISTRY)
prometheus_client.ProcessCollector(registry=REGISTRY)


def exposition(accept: str) -> tuple[bytes, str]:
    """The registry in the format the scraper's Accept header asks for: OpenMetrics (with
    exemplars) for `application/openmetrics-text`, else the classic text format."""
    encoder, content_type = choose_encoder(accept)
    return encoder(REGISTRY), content_type


_servers: dict[int, object] = {}


def serve_metrics(host: str, port: int) -> int:
    """Serve /metrics from a thread of this worker process (0: a free port); returns the port.
    prometheus_client's server negotiates the format as `exposition` does."""
    server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
    bound = int(server.server_port)
    _servers[bound] = server
    return bound


def stop_serving(port: int) -> None:
    server = _servers.pop(port, None)
    if server is not None:
        server.shutdown()  # type: ignore[attr-defined]
        server.server_close()  # type: ignore[attr-defined]
