"""The bus's own Prometheus metrics. Each package declares its metrics in its own registry
(edge/metrics.py, inference/metrics.py); services/telemetry.py serves them all from one."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

REGISTRY = CollectorRegistry()

DEAD_LETTERS = Counter(
    "grokstack_dead_letters_total", "Messages dead-lettered, by work kind (req, decode).", ["kind"],
    registry=REGISTRY)


STALE_EVENTS = Counter(
    "grokstack_stale_events_total",
    "Events of a request's superseded attempt (another region took it over) that a listener dropped.",
    registry=REGISTRY)


def count_dead_letter(kind: str) -> None:
    DEAD_LETTERS.labels(kind).inc()


def count_stale_event() -> None:
    STALE_EVENTS.inc()
