"""The engine interface over vLLM v1's AsyncLLM.

AsyncLLM watches its engine core process: once it is gone, `errored` is true and every request
raises vLLM's EngineDeadError, which this engine turns into `EngineDead` (inference/engine.py).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

import structlog

from bus.messages import ChatMessage, SamplingSpec, Speculation
from inference.config import EngineSetup
from inference.engine import EngineChunk, EngineDead
from inference.pools import Pool
from inference.profiles import apply_vllm_environment, engine_args, resolve_profile, spec_method
from kv_store.records import KvRequest, report_from_params, request_to_params

log = structlog.get_logger("grokstack.engine")


def speculation_of(metrics: Any) -> Speculation | None:
    """vLLM's per-request speculation counts (engine arg per_request_spec_decode_metrics)."""
    if metrics is None:
        return None
    steps = sum(metrics.histogram)
    accepted = sum(j * count for j, count in enumerate(metrics.histogram))
    return Speculation(steps=steps, drafted_tokens=metrics.num_draft_tokens, accepted_tokens=accepted)


class VllmEngine:
    def __init__(self, setup: EngineSetup, pool: Pool) -> None:
        self.setup = setup
        self.pool = pool
        self.profile = resolve_profile(setup.engine)
        self.model_id = setup.served.model_id
        self.max_model_len = setup.served.max_model_len
        self._llm: Any = None
        self._tokenizer: Any = None
        self.kv_capacity_tokens = 0  # known after start: the engine's KV cache, in tokens

    async def start(self) -> None:
        if not (Path(self.setup.served.model) / "config.json").exists():
            raise SystemExit(f"no model at {self.setup.served.model}: run `grokstack model` to "
                             "prepare the bundled one, or pass --model <HF folder>")
        apply_vllm_environment(self.setup.engine, self.profile, self.setup.cache_root)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from inference.vllm_stats import stat_loggers

        t0 = time.monotonic()
        args = engine_args(self.setup, self.profile, self.pool)
        args.setdefault("use_tqdm_on_load", False)  # its progress bar would break the log format (services/logs.py)
        log.info("engine starting", role=self.pool.name, profile=self.profile.name,
                 model=args["model"], block_size=args["block_size"],
                 speculative=spec_method(self.setup.spec, self.profile, self.pool))
        # our stat logger feeds the metrics from each scheduler step (inference/vllm_stats.py)
        self._llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**args), stat_loggers=stat_loggers(self.pool.name))
        self._tokenizer = self._llm.tokenizer
        # The engine core measured its cache at start and told the front end how many blocks.
        cache = self._llm.vllm_config.cache_config
        self.kv_capacity_tokens = int(cache.num_gpu_blocks or 0) * int(cache.block_size)
        log.info("engine ready", role=self.pool.name, seconds=round(time.monotonic() - t0, 1),
                 kv_capacity_tokens=self.kv_capacity_tokens)

    async def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None

    def dead_reason(self) -> str | None:
        if self._llm is None or not self._llm.errored:
            return None
        return "vLLM's engine core is gone (EngineDeadError; its cause is logged above)"

    def render_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        rendered = self._tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=True, tokenize=True)
        ids = rendered["input_ids"] if hasattr(rendered, "keys") else rendered
        return list(ids)

    def detokenize(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids)

    async def generate(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingSpec,
                       max_tokens: int, kv: KvRequest | None = None) -> AsyncIterator[EngineChunk]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        # vLLM hands kv_transfer_params between its processes as plain dicts, both ways.
        params = SamplingParams(
            max_tokens=max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
            stop=list(sampling.stop) or None, seed=sampling.seed,
            output_kind=RequestOutputKind.DELTA,
            extra_args={"kv_transfer_params": request_to_params(kv)} if kv is not None else None)
        from vllm.v1.engine.exceptions import EngineDeadError

        if (reason := self.dead_reason()) is not None:
            raise EngineDead(reason)
        # AsyncLLM aborts the request in the engine when this generator is cancelled.
        try:
            async for out in self._llm.generate({"prompt_token_ids": prompt_token_ids}, params,
                                                request_id=request_id):
                completion = out.outputs[0]
                if not completion.token_ids and not completion.text and not out.finished:
                    continue
                yield EngineChunk(
                    token_ids=list(completion.token_ids), text=completion.text,
                    finish_reason=completion.finish_reason if out.finished else None,
                    prompt_tokens=len(out.prompt_token_ids or prompt_token_ids),
                    cached_tokens=out.num_cached_tokens or 0,
                    kv=report_from_params(out.kv_transfer_params) if out.finished else None,
                    speculation=speculation_of(completion.spec_decode_metrics) if out.finished else None)
        except EngineDeadError as exc:
            raise EngineDead(self.dead_reason() or f"vLLM's engine core is gone: {exc}") from exc
        except Exception as exc:
            # A dying core may first surface as another error (a closed socket): the engine's
            # state says which it was.
            if (reason := self.dead_reason()) is not None:
                raise EngineDead(reason) from exc
            raise
