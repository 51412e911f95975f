"""A token bucket: `rate` tokens a second, up to `burst` at once. The edge's one rate limiter:
a tenant's model tokens a minute (edge/admission.py) and resume attempts (edge/resume.py)."""

from __future__ import annotations

import time


class TokenBucket:
    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.level = float(burst)
        self.at = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(float(self.burst), self.level + (now - self.at) * self.rate)
        self.at = now

    def take(self, tokens: float = 1) -> float:
        """Takes `tokens` and returns 0, or returns the seconds until they would be there (a take
        above `burst` waits for a full bucket, then takes them all)."""
        self._refill()
        want = min(tokens, self.burst)
        if self.level >= want:
            self.level -= tokens
            return 0.0
        return (want - self.level) / self.rate

    def give_back(self, tokens: float) -> None:
        self._refill()
        self.level = min(float(self.burst), self.level + max(0, tokens))
