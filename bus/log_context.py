"""Who a log line is about: a request's identity, bound once per request for every line its task
writes (structlog contextvars are per asyncio task), wherever the request is handled."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import structlog


@contextmanager
def request_context(request_id: str, region: str, priority: str, **extra: object) -> Iterator[None]:
    tokens = structlog.contextvars.bind_contextvars(
        request_id=request_id, region=region, priority=priority, **extra)
    try:
        yield
    finally:
        structlog.contextvars.reset_contextvars(**tokens)
