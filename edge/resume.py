"""Who may resume a request, and how often: the one place both doors (websocket and HTTP) ask.

A request id is not a credential: it shows up in logs, traces and a client's URL bar. Resuming
needs the request's resume token, `Signer.token("resume", tenant, request_id)` (bus/signing.py),
handed only to the client that made the request (the websocket `accepted` frame, the
`X-Grokstack-Resume-Token` response header). It is stateless, so every edge of every region (they
share the stack secret) checks it without a lookup. A missing or wrong token gets the answer an
unknown id gets, before anything is looked up: a prober learns nothing and costs only an HMAC.

Resumes are rate-limited by token buckets, so that random ids cannot turn into capture reads:
every attempt counts against its client (a websocket connection, or an HTTP client's address), and
one whose token is valid (it goes on to a lookup) against its tenant too. An attempt over either
gets `rate_limited` with the seconds after which one would be let through.
"""

from __future__ import annotations

import math
from collections import OrderedDict

from bus.signing import Signer
from edge.config import EdgeConfig
from edge.token_bucket import TokenBucket

PURPOSE = "resume"
HEADER = "X-Grokstack-Resume-Token"
MAX_CLIENTS = 10_000  # client addresses whose buckets are kept; the least recently seen go first


class ResumeRateLimited(Exception):
    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.message, self.retry_after_s = message, retry_after_s


class ResumeGuard:
    def __init__(self, config: EdgeConfig, signer: Signer) -> None:
        self.config = config
        self.signer = signer
        self._tenants: dict[str, TokenBucket] = {}  # tenants are few: the keys file's, or "public"
        self._clients: OrderedDict[str, TokenBucket] = OrderedDict()

    def token(self, tenant: str, request_id: str) -> str:
        return self.signer.token(PURPOSE, tenant, request_id)

    def client_bucket(self) -> TokenBucket:
        """A bucket for one client (a websocket connection keeps its own)."""
        return TokenBucket(self.config.resume_client_rate, self.config.resume_client_burst)

    def address_bucket(self, address: str) -> TokenBucket:
        """The bucket of an HTTP client's address; the map stays bounded whatever addresses come."""
        bucket = self._clients.pop(address, None) or self.client_bucket()
        self._clients[address] = bucket
        while len(self._clients) > MAX_CLIENTS:
            self._clients.popitem(last=False)  # unseen longest: its bucket has refilled anyway
        return bucket

    def admit(self, client: TokenBucket, tenant: str, request_id: str, token: str | None) -> bool:
        """Whether `token` lets the tenant resume `request_id` (check it before any lookup); raises
        ResumeRateLimited when the client or the tenant resumes too often."""
        wait = client.take()
        if wait:
            raise ResumeRateLimited(f"too many resumes from this client; at most {self.config.resume_client_rate:g} "
                                    "a second", wait)
        if not token or not self.signer.check_token(token, PURPOSE, tenant, request_id):
            return False
        bucket = self._tenants.get(tenant)
        if bucket is None:
            bucket = self._tenants[tenant] = TokenBucket(self.config.resume_tenant_rate,
                                                         self.config.resume_tenant_burst)
        wait = bucket.take()
        if wait:
            raise ResumeRateLimited(f"tenant {tenant!r} resumes too often; at most "
                                    f"{self.config.resume_tenant_rate:g} a second", wait)
        return True


def retry_after_s(wait: float) -> float:
    """A wait as clients are told it: rounded up to a tenth of a second."""
    return math.ceil(wait * 10) / 10
