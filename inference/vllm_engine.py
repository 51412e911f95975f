"""The engine interface over vLLM v1's AsyncLLM.

AsyncLLM watches its engine core process: once it is gone, `errored` is true and every request
raises vLLM's EngineDeadError, which this engine turns into `EngineDead` (inference/engine.py).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

import structlog

from bus import tracing
from bus.messages import MODEL_DEFAULTED, ChatMessage, SamplingSpec, Speculation, TokenLogprob, TopLogprob
from inference.config import EngineSetup
from inference.engine import EngineChunk, EngineDead, JobRefused
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


def model_defaults(model_config: Any) -> dict[str, float]:
    """The sampling defaults of the engine's model: its generation config's (vLLM's
    `--generation-config`, `--override-generation-config`), for the fields a client may leave unset."""
    return {name: value for name, value in model_config.get_diff_sampling_param().items() if name in MODEL_DEFAULTED}


def sampling_params(sampling: SamplingSpec, max_tokens: int, kv: KvRequest | None,
                    defaults: dict[str, float] | None = None) -> Any:
    """vLLM's SamplingParams of a request; a field it left unset takes `defaults` (the model's),
    else vLLM's neutral value, as vLLM's own server does."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    unset = {**MODEL_DEFAULTED, **(defaults or {})}
    chosen = {name: unset[name] if getattr(sampling, name) is None else getattr(sampling, name)
              for name in MODEL_DEFAULTED}
    return SamplingParams(
        max_tokens=max_tokens, stop=list(sampling.stop) or None, seed=sampling.seed, **chosen,
        ignore_eos=sampling.ignore_eos,
        min_tokens=min(sampling.min_tokens, max_tokens), stop_token_ids=list(sampling.stop_token_ids) or None,
        include_stop_str_in_output=sampling.include_stop_str_in_output,
        skip_special_tokens=sampling.skip_special_tokens,
        spaces_between_special_tokens=sampling.spaces_between_special_tokens,
        logit_bias=dict(sampling.logit_bias) or None, logprobs=sampling.logprobs,
        output_kind=RequestOutputKind.DELTA,
        # vLLM hands kv_transfer_params between its processes as plain dicts, both ways.
        extra_args={"kv_transfer_params": request_to_params(kv)} if kv is not None else None)


# vLLM's floor for a log probability of -inf (JSON has no infinities).
LOGPROB_FLOOR = -9999.0


def logprobs_of(token_ids: Sequence[int], logprobs: Any, top_n: int | None) -> list[TokenLogprob] | None:
    """vLLM's per-position {token id: Logprob} as wire records. Each position holds the chosen
    token (with its rank in the vocabulary) and the `top_n` most likely ones (ranks 1..top_n):
    the chosen one is among those only when its rank says so."""
    if logprobs is None or top_n is None:
        return None
    out = []
    for token_id, at in zip(token_ids, logprobs, strict=True):
        chosen = at[token_id]
        top = sorted((v for v in at.values() if v.rank is not None and 1 <= v.rank <= top_n), key=lambda v: v.rank)
        out.append(TokenLogprob(chosen.decoded_token or "", max(chosen.logprob, LOGPROB_FLOOR),
                                [TopLogprob(v.decoded_token or "", max(v.logprob, LOGPROB_FLOOR)) for v in top]))
    return out


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
        self.sampling_defaults: dict[str, float] = {}  # known after start: the model's (model_defaults)

    async def start(self) -> None:
        if not (Path(self.setup.served.model) / "config.json").exists():
            raise SystemExit(f"no model at {self.setup.served.model}: run `grokstack model` to "
                             "prepare the bundled one, or pass --model <HF folder>")
        apply_vllm_environment(self.setup.engine, self.profile, self.setup.cache_root,
                               traced=bool(self.setup.traces_endpoint))
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
        self.sampling_defaults = model_defaults(self._llm.model_config)
        log.info("engine ready", role=self.pool.name, seconds=round(time.monotonic() - t0, 1),
                 kv_capacity_tokens=self.kv_capacity_tokens, sampling_defaults=self.sampling_defaults)

    async def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None

    def dead_reason(self) -> str | None:
        if self._llm is None or not self._llm.errored:
            return None
        return "vLLM's engine core is gone (EngineDeadError; its cause is logged above)"

    def _trace_headers(self) -> dict[str, str] | None:
        """The current span's context for vLLM, when vLLM traces (else it warns and drops them)."""
        traced = self._llm.vllm_config.observability_config.otlp_traces_endpoint
        return tracing.headers_with_context() if traced else None

    def render_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        rendered = self._tokenizer.apply_chat_template(
            [m.as_template_input() for m in messages], add_generation_prompt=True, tokenize=True)
        ids = rendered["input_ids"] if hasattr(rendered, "keys") else rendered
        return list(ids)

    def tokenize(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=True))

    def detokenize(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids)

    async def generate(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingSpec,
                       max_tokens: int, kv: KvRequest | None = None) -> AsyncIterator[EngineChunk]:
        params = sampling_params(sampling, max_tokens, kv, self.sampling_defaults)
        from vllm.exceptions import VLLMValidationError
        from vllm.v1.engine.exceptions import EngineDeadError

        if (reason := self.dead_reason()) is not None:
            raise EngineDead(reason)
        # AsyncLLM aborts the request in the engine when this generator is cancelled.
        try:
            # vLLM's own spans (with --otlp-traces-endpoint among the engine arguments) join the
            # request's trace as children of the worker's span.
            async for out in self._llm.generate({"prompt_token_ids": prompt_token_ids}, params,
                                                request_id=request_id, trace_headers=self._trace_headers()):
                completion = out.outputs[0]
                if not completion.token_ids and not completion.text and not out.finished:
                    continue
                yield EngineChunk(
                    token_ids=list(completion.token_ids), text=completion.text,
                    finish_reason=completion.finish_reason if out.finished else None,
                    prompt_tokens=len(out.prompt_token_ids or prompt_token_ids),
                    cached_tokens=out.num_cached_tokens or 0,
                    kv=report_from_params(out.kv_transfer_params) if out.finished else None,
                    speculation=speculation_of(completion.spec_decode_metrics) if out.finished else None,
                    logprobs=logprobs_of(completion.token_ids, completion.logprobs, sampling.logprobs))
        except EngineDeadError as exc:
            raise EngineDead(self.dead_reason() or f"vLLM's engine core is gone: {exc}") from exc
        except VLLMValidationError as exc:
            # Parameters this engine refuses as configured (e.g. min_p and logit_bias while it
            # speculates): every retry would be refused alike.
            raise JobRefused("invalid_request", f"the engine refuses the request: {exc}") from None
        except Exception as exc:
            # A dying core may first surface as another error (a closed socket): the engine's
            # state says which it was.
            if (reason := self.dead_reason()) is not None:
                raise EngineDead(reason) from exc
            raise
