"""Dead-lettering: a message that cannot be served is recorded with the reason, once."""

from __future__ import annotations

import time

import structlog
from nats.js import JetStreamContext

from bus.codec import encode, printable_payload
from bus.messages import DeadLetter
from bus import metrics
from bus.subjects import Subjects

log = structlog.get_logger("grokstack.bus")

MAX_RECORDED_PAYLOAD = 256 * 1024


async def dead_letter(js: JetStreamContext, subjects: Subjects, region: str, kind: str, subject: str,
                      data: bytes, reason: str, worker_id: str, deliveries: int = 1) -> None:
    metrics.count_dead_letter(kind)
    payload, encoding = printable_payload(data[:MAX_RECORDED_PAYLOAD])
    if len(data) > MAX_RECORDED_PAYLOAD:
        reason = f"{reason} (payload truncated from {len(data)} bytes)"
    record = DeadLetter(subject=subject, reason=reason, payload=payload, encoding=encoding,
                        worker_id=worker_id, deliveries=deliveries, failed_at=time.time())
    try:
        await js.publish(subjects.dead_letter(region, kind), encode(record), timeout=5)
    except Exception as exc:  # the record is best effort; the log line below always happens
        log.error("dead letter not stored", error=str(exc))
    log.warning("dead-lettered", subject=subject, reason=reason, deliveries=deliveries)
