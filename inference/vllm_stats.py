"""vLLM's per-step scheduler stats into our metrics: speculative decoding and KV cache usage.

vLLM v1 hands every step's `SchedulerStats` to the stat loggers given to `AsyncLLM`. Passing one
turns stats on in the engine core even with `disable_log_stats=True`, while vLLM's periodic log
lines stay off. (vLLM then also registers its own `vllm:*` Prometheus metrics in the default
registry, so a worker's /metrics shows them beside ours.) Imported only where vLLM is.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from vllm.v1.metrics.loggers import StatLoggerBase

from inference import metrics


class GrokstackStatLogger(StatLoggerBase):
    def __init__(self, vllm_config: Any, engine_index: int = 0, role: str = "direct") -> None:
        self.role = role

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
               engine_idx: int = 0) -> None:
        if scheduler_stats is None:
            return
        spec = scheduler_stats.spec_decoding_stats  # None on steps that drafted nothing
        metrics.observe_engine_step(
            self.role, scheduler_stats.kv_cache_usage,
            drafts=spec.num_drafts if spec else 0, draft_tokens=spec.num_draft_tokens if spec else 0,
            accepted_tokens=spec.num_accepted_tokens if spec else 0)

    def log_engine_initialized(self) -> None:
        pass


def stat_loggers(role: str) -> list[Any]:
    """For `AsyncLLM.from_engine_args(..., stat_loggers=...)`: a factory per engine index."""
    return [partial(GrokstackStatLogger, role=role)]
