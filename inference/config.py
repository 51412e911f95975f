"""The workers' settings: which model, how its engine runs, speculation, and the worker around it."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from bus.section import Count, Port, Section, Seconds
from kv_store.config import KvConfig

BUNDLED_MODEL_NAME = "SmolLM2-135M-Instruct"
SHARED_CORES_DECODE_PREFILL_TOKENS = 512  # EngineConfig.decode_prefill_max_tokens's -1
# The worker pools whose engines have engine-argument settings of their own (inference/pools.py);
# any other engine (the direct one) gets the shared ones only.
ENGINE_ARG_ROLES = ("prefill", "decode", "aggregated")


def _vllm_flags(value: str) -> str:
    """Checked at load without vLLM: it splits like a shell line and starts with an option. Which
    options vLLM has is checked when an engine's arguments are built (inference/profiles.py)."""
    words = shlex.split(value)  # an unclosed quote raises ValueError, named by the variable
    if words and not words[0].startswith("-"):
        raise ValueError(f"vLLM engine arguments start with an option (--name value ...), not {words[0]!r}")
    return value


def _vllm_config_file(value: str) -> str:
    if value and not value.endswith((".yaml", ".yml")):
        raise ValueError("a vLLM --config file: a .yaml or .yml path (vLLM refuses other names)")
    return value


# vLLM's own command-line syntax, as `vllm serve` takes it: "--max-num-batched-tokens 8192 --quantization fp8"
VllmFlags = Annotated[str, AfterValidator(_vllm_flags)]
# A YAML file in the format of vLLM's `--config`: keys are vLLM's argument names (max-num-batched-tokens: 8192)
VllmConfigFile = Annotated[str, AfterValidator(_vllm_config_file)]


class ModelConfig(Section):
    """The weights every engine of the stack loads, and the id clients know them by."""

    model: str = ""  # an HF model folder; "" means the bundled model (services/settings.py fills it in)
    served_model_name: str = ""  # the model id clients see; "" means the folder name
    max_model_len: Annotated[int, Field(ge=16)] = 2048

    @property
    def model_id(self) -> str:
        return self.served_model_name or self.model.rstrip("/").rsplit("/", 1)[-1]


class EngineConfig(Section):
    """How the engine (vLLM) runs on this machine (inference/profiles.py)."""

    engine_profile: Literal["cpu", "gpu", "auto"] = "auto"  # auto: gpu when CUDA is available
    block_size: Annotated[int, Field(ge=0)] = 0  # KV block size in tokens; 0 means the profile's default
    kv_cache_gib: Count = 1  # CPU profile: KV cache space per engine, whole GiB
    gpu_memory_utilization: Annotated[float, Field(gt=0.0, le=1.0)] = 0.85  # GPU profile
    prefill_slots: Count = 8  # prompts a prefill engine works on at once
    decode_slots: Count = 16  # sequences a decode (or aggregated) engine batches at once
    # A lock file shared by the engines of one machine so they take turns per forward pass
    # instead of fighting over the same cores; `grokstack up` sets it for the CPU profile.
    engine_step_lock: str = ""
    # Added to this process's nice value (a lower CPU priority). On a shared CPU `grokstack up`
    # gives the decode worker +5 so prompt processing goes first, as vLLM's own scheduler
    # prefers prefills within one engine.
    cpu_nice: Annotated[int, Field(ge=-20, le=19)] = 0
    # Prompts of at most this many tokens (with the answer so far, for a continued request) skip
    # the prefill engine: the prefill worker hands them to decode, whose engine computes them
    # inside its running batch, as one engine would. Long prompts still get a pass of their own,
    # which is what disaggregation is for: they would stall the batch's other answers. -1: 512
    # where the engines share cores (engine_step_lock), where a prompt's own pass only takes turns
    # with decode's, and 0 (every prompt to prefill) where they do not. Dynamo's "conditional
    # disaggregation" decides alike.
    decode_prefill_max_tokens: Annotated[int, Field(ge=-1, le=1 << 20)] = -1
    # Any of vLLM's engine arguments, in vLLM's own syntax, over the profile's defaults and the
    # settings above (inference/profiles.py, `engine_args`). Lowest first: the profile, the stack's
    # settings, engine_config (a vLLM --config YAML), engine_args (flags), then the same two of the
    # engine's role (prefill_engine_config, prefill_engine_args, ...). Arguments the stack owns
    # (the model, its context, slots, block size, the KV connector, prefix caching, speculation)
    # are refused with the setting to use instead.
    engine_config: VllmConfigFile = ""
    engine_args: VllmFlags = ""
    prefill_engine_config: VllmConfigFile = ""
    prefill_engine_args: VllmFlags = ""
    decode_engine_config: VllmConfigFile = ""
    decode_engine_args: VllmFlags = ""
    aggregated_engine_config: VllmConfigFile = ""
    aggregated_engine_args: VllmFlags = ""

    def engine_arg_settings(self, pool: str) -> list[tuple[str, str]]:
        """(field, value) of the engine-argument settings an engine of `pool` gets, lowest first:
        the shared ones, then its role's (a role's setting exists only to differ from the shared
        one, so it wins); within each, the file, then the flags (vLLM's own rule: flags override
        its --config file). Unset ones are left out."""
        fields = ["engine_config", "engine_args"]
        if pool in ENGINE_ARG_ROLES:
            fields += [f"{pool}_engine_config", f"{pool}_engine_args"]
        return [(name, getattr(self, name)) for name in fields if getattr(self, name)]

    @property
    def prompts_in_decode_up_to(self) -> int:
        """decode_prefill_max_tokens, resolved: prompts this long or shorter go to decode."""
        if self.decode_prefill_max_tokens >= 0:
            return self.decode_prefill_max_tokens
        return SHARED_CORES_DECODE_PREFILL_TOKENS if self.engine_step_lock else 0


class SpecConfig(Section):
    """Speculative decoding in the decoding engines (inference/profiles.py)."""

    # auto: the profile's default. ngram: prompt lookup by the stack's drafter
    # (inference/lookup_drafter.py); ngram_vllm: vLLM's own n-gram proposer, for comparison.
    spec_method: Literal["ngram", "ngram_vllm", "draft", "off", "auto"] = "auto"
    # Draft tokens per step at most. ngram: what a request whose drafts are accepted gets (the
    # drafter shortens or stops the others); tuned on this CPU by replaying greedy answers through
    # the drafter (8 gave 1.83x on copy-heavy answers and no loss on chat ones). A draft model pays
    # per draft token: 4-5 suit it.
    spec_tokens: Count = 8
    spec_ngram_min: Count = 2
    spec_ngram_max: Count = 8
    spec_draft_model: str = ""  # HF folder of the draft model for spec_method=draft
    spec_max_batch: Count = 1  # speculate only while at most this many sequences decode
    # ngram: a request whose recent drafts were accepted less than this stops drafting (and
    # tries again now and then), so answers that do not copy from their prompt pay nothing
    spec_min_acceptance: Annotated[float, Field(ge=0.0, le=1.0)] = 0.4

    @model_validator(mode="after")
    def _consistent(self) -> "SpecConfig":
        if self.spec_ngram_min > self.spec_ngram_max:
            raise ValueError(f"spec_ngram_min ({self.spec_ngram_min}) must not exceed spec_ngram_max "
                             f"({self.spec_ngram_max})")
        if self.spec_method == "draft" and not self.spec_draft_model:
            raise ValueError("spec_method=draft needs spec_draft_model (an HF folder)")
        return self


class WorkerConfig(Section):
    """The pool worker around an engine: how much work it takes, how it stops, what it costs."""

    # Token budgets (inference/budget.py): a worker pulls a job only while it has room for the
    # largest job there can be, so vLLM's continuous batch stays full but never over-full.
    # Prefill counts prompt tokens to compute (cached ones excluded); decode counts KV tokens
    # (prompt + max_tokens) and 0 means the engine's whole KV cache.
    prefill_token_budget: Count = 8192
    decode_token_budget: Annotated[int, Field(ge=0)] = 0
    drain_timeout_s: Seconds = 20.0  # on SIGTERM, running jobs get this long to finish
    gpu_price_per_hour: Annotated[float, Field(ge=0.0)] = 3.0  # dollars per accelerator-hour
    gpus_per_worker: Annotated[float, Field(gt=0.0)] = 1.0  # accelerators each worker's engine occupies
    metrics_port: Port = 0  # /metrics (and health) of a worker process; 0: a free port, logged
    # Liveness (/healthz) fails once the serving worker's event loop has not ticked for this long
    # (its engine's start, which blocks the loop, does not count); at 3 times it the process
    # exits (inference/worker.py EXIT_LOOP_STALLED), so its jobs move on as after a crash.
    worker_loop_stall_s: Annotated[float, Field(gt=0.0, le=3600.0)] = 10.0
    # How often a worker asks whether the peer of its pool it watches still has its connection
    # (inference/peer_watch.py): a worker killed outright has its jobs handed on within about this
    # long, not when their leases lapse (GROKSTACK_ACK_WAIT_S). 0: no watching, leases only.
    peer_probe_s: Annotated[float, Field(ge=0.0, le=60.0)] = 0.1


@dataclass(frozen=True)
class EngineSetup:
    """What an engine is built from, composed from the sections that concern it (as vLLM's
    VllmConfig composes its own): the model, the engine, speculation, and the KV store its
    connector talks to. Not a section of its own: services/ composes it from the settings."""
    served: ModelConfig
    engine: EngineConfig
    spec: SpecConfig
    kv: KvConfig
    cache_root: Path  # where vLLM keeps its caches (VLLM_CACHE_ROOT), inside the data directory
    # The stack secret's file (settings.bus.secret_file): the KV connector seals and checks
    # every block with it. Its path reaches the connector, never the key.
    secret_file: str = ""
    # The stack's OTLP endpoint (settings.stack.otlp_traces_endpoint): vLLM's own spans go there
    # too, in the request's trace; "" for none.
    traces_endpoint: str = ""
