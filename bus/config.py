"""The bus's settings: where NATS is, who this process is on it, leases and stream bounds."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from bus.section import Count, Section, Seconds, SubjectToken
from bus.subjects import Subjects


class BusConfig(Section):
    """Where NATS is, who this process is on it, and the bounds of the JetStream streams."""

    nats_url: str = ""  # "" means: `grokstack up` starts an embedded server
    # JSON file of NATS logins per role (bus/credentials.py); "" means the one the embedded server
    # writes, <data_dir>/nats/credentials.json, when it exists (services/settings.py fills it in).
    nats_credentials: str = ""
    # TLS to NATS: a CA to trust (else the system's, for tls:// URLs), and a client certificate
    # and key when the server asks for one (mutual TLS).
    nats_tls_ca: str = ""
    nats_tls_cert: str = ""
    nats_tls_key: str = ""
    subject_prefix: SubjectToken = "gs"
    region: SubjectToken = "local"
    worker_id: str = ""  # this process's name on the bus (heartbeats, edge id); "" means host-pid
    heartbeat_s: Seconds = 2.0
    # The lease on a job: a worker renews it 6 times per period while it works on the job, and
    # JetStream hands the job to another worker once it lapses. A worker killed outright has its
    # jobs handed on by the peer that watches it long before (inference/peer_watch.py), if its
    # loop was seen running within half a lease; so the lease is what a worker whose loop stalls
    # then dies costs, and what a loop stall must outlast to cost nothing. On a shared 2-core
    # machine decode loops lag 0.3-0.4 s behind under load: 0.6 s made the watcher give up.
    ack_wait_s: Seconds = 1.5
    max_deliver: Count = 5  # deliveries of one job before it is dead-lettered
    request_ttl_s: Seconds = 600.0  # queued requests older than this are dropped by the server
    # Publishing a request whose id (Nats-Msg-Id) was seen within this window stores it once:
    # the idempotency window of direct publishes. At most request_ttl_s.
    dedupe_window_s: Seconds = 600.0
    work_stream_mb: Count = 1024  # bound of each work-queue stream
    dead_letter_stream_mb: Count = 256
    capture_max_age_s: Seconds = 24 * 3600.0  # the capture streams drop traffic older than this
    capture_max_mb: Count = 2048  # ...and the oldest beyond this size
    # How long a process waits at start for its streams, which `grokstack provision` makes.
    streams_wait_s: Seconds = 30.0
    # The stack's signing secret (bus/signing.py: resume tokens, KV block tags), the same file in
    # every process of every region; "" means <data_dir>/secret, made there when missing.
    secret_file: str = ""

    @property
    def credentials_file(self) -> Path | None:
        return Path(self.nats_credentials) if self.nats_credentials else None

    @property
    def worker_name(self) -> str:
        return self.worker_id or f"{socket.gethostname()}-{os.getpid()}"

    @property
    def subjects(self) -> Subjects:
        return Subjects(self.subject_prefix)
