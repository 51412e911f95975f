from pathlib import Path

import pytest
import yaml

from bus.messages import ChatMessage, SamplingSpec
from services.lab.fake_engine import FakeEngine
from inference.config import ENGINE_ARG_ROLES
from inference.pools import DIRECT, pool_named
from inference.profiles import (OWNED, PROFILES, EngineArgsError, engine_args, kv_transfer_config, setting_name,
                                speculative_config)
from services.processes import engine_setup
from services.settings import ENV, SECTION_OF, Settings, SettingsError, from_env

S = Settings(redis_url="redis://r:1/0")
SETUP = engine_setup(S)
PREFILL, DECODE, AGGREGATED = (pool_named(name) for name in ("prefill", "decode", "aggregated"))


def spec_with(**changes):
    return S.spec.replace(**changes)


def test_cpu_profile_is_float32_eager_and_speculates_with_the_stacks_drafter_on_decode():
    cpu = PROFILES["cpu"]
    assert (cpu.dtype, cpu.enforce_eager) == ("float32", True)
    decode = speculative_config(S.spec, cpu, DECODE)  # auto: the stack's drafter (see profiles.py)
    # the stack's drafter, by qualname, told its limits through vLLM's additional_config
    assert decode == {"method": "custom_class", "model": "inference.lookup_drafter.LookupDrafter",
                      "num_speculative_tokens": 8}
    args = engine_args(engine_setup(S.replace(spec_method="ngram", spec_max_batch=3)), cpu, DECODE)
    assert args["additional_config"]["grokstack_lookup_drafter"]["max_batch"] == 3
    # vLLM's own n-gram proposer stays selectable: speculation stops above spec_max_batch sequences
    native = speculative_config(spec_with(spec_method="ngram_vllm"), cpu, DECODE)
    assert native["method"] == "ngram"
    assert native["num_speculative_tokens_per_batch_size"] == [[1, 1, 8], [2, 4096, 0]]
    assert speculative_config(S.spec, cpu, PREFILL) is None
    assert speculative_config(spec_with(spec_method="off"), cpu, DECODE) is None


def test_draft_model_mode_is_selectable():
    spec = speculative_config(spec_with(spec_method="draft", spec_draft_model="/d"), PROFILES["cpu"], DECODE)
    assert spec["method"] == "draft_model" and spec["model"] == "/d"


def test_roles_get_their_kv_connector_role():
    assert kv_transfer_config(SETUP, PREFILL)["kv_role"] == "kv_both"
    assert kv_transfer_config(SETUP, DECODE)["kv_role"] == "kv_both"  # it saves the answer's blocks
    assert kv_transfer_config(SETUP, DIRECT) is None
    extra = kv_transfer_config(SETUP, DECODE)["kv_connector_extra_config"]
    assert extra["redis_url"] == "redis://r:1/0"


def test_gpu_profile_is_bf16_and_compiled():
    args = engine_args(SETUP, PROFILES["gpu"], DIRECT)
    assert args["dtype"] == "bfloat16" and args["enforce_eager"] is False
    assert "gpu_memory_utilization" in args


async def test_fake_engine_continues_from_prompt_plus_first_token():
    engine = FakeEngine()
    prompt = engine.render_chat([ChatMessage("user", "abc")])
    whole = [c async for c in engine.generate("a", prompt, SamplingSpec(max_tokens=50), 50)]
    first = whole[0].token_ids[0]
    rest = [c async for c in engine.generate("b", prompt + [first], SamplingSpec(max_tokens=50), 49)]
    join = lambda chunks: "".join(c.text for c in chunks)  # noqa: E731
    assert join(whole) == whole[0].text + join(rest)


def test_aggregated_engines_save_and_load_kv_and_speculate_only_when_asked():
    cpu = PROFILES["cpu"]
    assert speculative_config(spec_with(spec_method="ngram"), cpu, AGGREGATED)["method"] == "custom_class"
    assert speculative_config(S.spec, PROFILES["gpu"], AGGREGATED)["method"] == "ngram"  # vLLM's own
    assert kv_transfer_config(SETUP, AGGREGATED)["kv_role"] == "kv_both"


def test_short_prompts_go_to_decode_only_where_the_engines_share_cores_unless_told():
    from inference.config import SHARED_CORES_DECODE_PREFILL_TOKENS, EngineConfig
    assert EngineConfig().prompts_in_decode_up_to == 0  # engines of their own: every prompt to prefill
    shared = EngineConfig(engine_step_lock="/tmp/x.lock")
    assert shared.prompts_in_decode_up_to == SHARED_CORES_DECODE_PREFILL_TOKENS > 0
    assert shared.replace(decode_prefill_max_tokens=0).prompts_in_decode_up_to == 0
    assert EngineConfig(decode_prefill_max_tokens=100).prompts_in_decode_up_to == 100


# -- vLLM engine arguments from the settings (inference/profiles.py, engine_args) ----------------
# These parse with vLLM's own parser (built once, about 4 s) and start no engine.

GPU = PROFILES["gpu"]


def gpu_args(pool, **settings):
    return engine_args(engine_setup(S.replace(**settings)), GPU, pool)


def vllm_config(tmp_path, name, **args):
    """A file in the format of vLLM's --config: its argument names as keys."""
    path = tmp_path / name
    path.write_text(yaml.safe_dump({key.replace("_", "-"): value for key, value in args.items()}))
    return str(path)


def test_engine_arguments_layer_profile_settings_file_flags_then_the_role_s_file_and_flags(tmp_path):
    shared = vllm_config(tmp_path, "shared.yaml", max_num_batched_tokens=1000, max_cudagraph_capture_size=8, seed=1)
    role = vllm_config(tmp_path, "decode.yaml", max_num_batched_tokens=3000, seed=3)
    args = gpu_args(DECODE, gpu_memory_utilization=0.5, engine_config=shared,
                    engine_args="--max-num-batched-tokens 2000 --gpu-memory-utilization 0.7 --dtype float16 --seed 2",
                    decode_engine_config=role, decode_engine_args="--max-num-batched-tokens 4000")
    assert args["max_num_batched_tokens"] == 4000  # the role's flags over everything
    assert args["seed"] == 3  # the role's file over the shared flags
    assert args["gpu_memory_utilization"] == 0.7  # shared flags over the stack's setting (0.5)
    assert args["dtype"] == "float16"  # over the profile's bfloat16
    assert args["max_cudagraph_capture_size"] == 8  # the shared file, where nothing overrides it
    assert args["enforce_eager"] is False  # the profile's, where nothing overrides it
    prefill = gpu_args(PREFILL, engine_config=shared, engine_args="--seed 2")
    assert (prefill["max_num_batched_tokens"], prefill["seed"]) == (1000, 2)  # shared flags over shared file
    from vllm.engine.arg_utils import AsyncEngineArgs
    assert AsyncEngineArgs(**args).max_num_batched_tokens == 4000  # vLLM takes the result (no engine started)


def test_the_role_s_settings_reach_only_that_role():
    for role in ENGINE_ARG_ROLES:
        settings = {f"{role}_engine_args": "--max-num-batched-tokens 1234"}
        reached = {pool.name for pool in (PREFILL, DECODE, AGGREGATED, DIRECT)
                   if gpu_args(pool, **settings).get("max_num_batched_tokens") == 1234}
        assert reached == {role}
    shared = {pool.name for pool in (PREFILL, DECODE, AGGREGATED, DIRECT)
              if gpu_args(pool, engine_args="--max-num-batched-tokens 99").get("max_num_batched_tokens") == 99}
    assert shared == {"prefill", "decode", "aggregated", "direct"}


def test_without_engine_argument_settings_vllm_is_not_asked():
    from inference.profiles import vllm_arg_parser
    vllm_arg_parser.cache_clear()
    engine_args(SETUP, GPU, DECODE)
    assert vllm_arg_parser.cache_info().currsize == 0


def test_grokstack_flags_carry_engine_arguments(monkeypatch):
    from services.cli import build_parser, settings_from
    for var in ENV.values():
        monkeypatch.delenv(var, raising=False)
    args = build_parser().parse_args(["decode", "--decode-engine-args=--max-num-batched-tokens 512",
                                      "--engine-args", "--enable-chunked-prefill --max-logprobs 7"])
    built = engine_args(engine_setup(settings_from(args)), GPU, DECODE)
    assert (built["max_num_batched_tokens"], built["enable_chunked_prefill"], built["max_logprobs"]) == (512, True, 7)


def test_an_unknown_vllm_argument_fails_naming_it_and_its_setting(tmp_path):
    with pytest.raises(EngineArgsError,
                       match=r"GROKSTACK_PREFILL_ENGINE_ARGS .*unrecognized arguments: --max-num-batch-tokenz"):
        gpu_args(PREFILL, prefill_engine_args="--max-num-batch-tokenz 8192")
    with pytest.raises(EngineArgsError, match=r"GROKSTACK_ENGINE_ARGS .*--chat-template.*OpenAI server"):
        gpu_args(DECODE, engine_args="--chat-template ./t.jinja")
    with pytest.raises(EngineArgsError, match=r"GROKSTACK_ENGINE_ARGS .*--max-num-seqs: invalid int value: 'many'"):
        gpu_args(DECODE, engine_args="--max-num-seqs many")
    bad = vllm_config(tmp_path, "bad.yaml", no_such_knob=1)
    with pytest.raises(EngineArgsError, match=rf"GROKSTACK_DECODE_ENGINE_CONFIG .*{bad}.*--no-such-knob"):
        gpu_args(DECODE, decode_engine_config=bad)
    with pytest.raises(EngineArgsError, match=r"GROKSTACK_ENGINE_CONFIG .*missing.yaml.*FileNotFoundError"):
        gpu_args(DECODE, engine_config=str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("pool, given, instead", [
    (DECODE, "--max-model-len 4096", "GROKSTACK_MAX_MODEL_LEN"),
    (DECODE, "--model /elsewhere", "GROKSTACK_MODEL"),
    (DECODE, "--served-model-name other", "GROKSTACK_SERVED_MODEL_NAME"),
    (PREFILL, "--max-num-seqs 3", "GROKSTACK_PREFILL_SLOTS"),
    (DECODE, "--max-num-seqs 3", "GROKSTACK_DECODE_SLOTS"),
    (DECODE, "--block-size 64", "GROKSTACK_BLOCK_SIZE"),
    (DECODE, "--enable-prefix-caching", "Redis is the one prefix cache"),
    (DECODE, "--kv-transfer-config '{\"kv_connector\": \"NixlConnector\", \"kv_role\": \"kv_both\"}'",
     "GROKSTACK_KV_TTL_S"),
    (DECODE, "--speculative-config.method ngram --speculative-config.num_speculative_tokens 3",
     "GROKSTACK_SPEC_METHOD"),
    (PREFILL, "--speculative-config '{\"method\": \"ngram\", \"num_speculative_tokens\": 3}'",
     "GROKSTACK_SPEC_METHOD"),
    (DECODE, "--additional-config '{\"grokstack_lookup_drafter\": {\"k\": 2}}'", "GROKSTACK_SPEC_TOKENS"),
])
def test_an_argument_the_stack_owns_is_refused_with_the_setting_to_use(pool, given, instead):
    with pytest.raises(EngineArgsError, match=rf"GROKSTACK_ENGINE_ARGS .*stack's.*{instead}"):
        engine_args(engine_setup(S.replace(engine_args=given, spec_method="ngram")), PROFILES["cpu"], pool)


def test_an_owned_argument_repeating_the_stack_s_value_is_accepted(tmp_path):
    copied = vllm_config(tmp_path, "copied.yaml", enable_prefix_caching=False, max_model_len=S.served.max_model_len,
                         served_model_name=S.served.model_id, disable_log_stats=True)
    args = gpu_args(DECODE, engine_config=copied, engine_args=f"--max-num-seqs {S.engine.decode_slots}")
    assert args["enable_prefix_caching"] is False and args["max_num_seqs"] == S.engine.decode_slots


def test_what_a_kv_block_holds_is_set_for_every_role_or_not_at_all():
    with pytest.raises(EngineArgsError, match=r"GROKSTACK_DECODE_ENGINE_ARGS .*--kv-cache-dtype must be the same in "
                                              r"every role.*GROKSTACK_ENGINE_ARGS"):
        gpu_args(DECODE, decode_engine_args="--kv-cache-dtype fp8")
    assert gpu_args(DECODE, engine_args="--kv-cache-dtype fp8")["kv_cache_dtype"] == "fp8"


def test_more_than_one_rank_is_refused_where_the_redis_connector_runs():
    with pytest.raises(EngineArgsError, match=r"GROKSTACK_ENGINE_ARGS .*--tensor-parallel-size 2.*one rank"):
        gpu_args(DECODE, engine_args="-tp 2")
    assert gpu_args(DIRECT, engine_args="-tp 2")["tensor_parallel_size"] == 2  # no connector there


def test_additional_config_merges_the_operator_s_keys_with_the_drafter_s():
    args = engine_args(engine_setup(S.replace(spec_method="ngram", engine_args="--additional-config.plugin.x 1")),
                       PROFILES["cpu"], DECODE)
    assert args["additional_config"]["plugin"] == {"x": 1}
    assert args["additional_config"]["grokstack_lookup_drafter"]["k"] == 8


@pytest.mark.parametrize("var, value, says", [
    ("GROKSTACK_ENGINE_ARGS", "--chat-template 'unclosed", "No closing quotation"),
    ("GROKSTACK_DECODE_ENGINE_ARGS", "max-num-seqs 8", "start with an option"),
    ("GROKSTACK_PREFILL_ENGINE_CONFIG", "/etc/engine.json", ".yaml or .yml"),
])
def test_engine_argument_settings_are_checked_at_load_without_vllm(var, value, says):
    with pytest.raises(SettingsError, match=rf"{var} .*{says}"):
        from_env({var: value})


def test_the_settings_named_in_errors_are_the_real_ones():
    named = {"engine_args", "engine_config"} | {f"{role}_engine_{kind}" for role in ENGINE_ARG_ROLES
                                                 for kind in ("args", "config")}
    named |= {field for _, instead in OWNED.values() for field in instead}
    for field in named:
        assert field in SECTION_OF and setting_name(field).startswith(ENV[field] + " ")


# -- the Kubernetes pods' engines (infra/k8s: config.yaml and the worker manifests) ---------------

def k8s_settings(role):
    k8s = Path(__file__).resolve().parents[2] / "infra" / "k8s"
    env = dict(yaml.safe_load((k8s / "config.yaml").read_text())["data"])
    [container] = yaml.safe_load((k8s / f"{role}.yaml").read_text())["spec"]["template"]["spec"]["containers"]
    env.update({var["name"]: var["value"] for var in container["env"] if "value" in var})
    env["REDIS_URL"] = "rediss://u:p@redis:6380/0"
    return from_env(env)


def test_the_kubernetes_engines_are_sized_for_an_8b_model_on_one_h100():
    prefill = engine_args(engine_setup(k8s_settings("prefill")), GPU, PREFILL)
    decode = engine_args(engine_setup(k8s_settings("decode")), GPU, DECODE)
    for args in (prefill, decode):
        assert args["max_model_len"] >= 32768 and args["gpu_memory_utilization"] == 0.90
        assert args["model"].endswith("Llama-3.1-8B-Instruct")
    assert (prefill["max_num_seqs"], prefill["max_num_batched_tokens"]) == (64, 16384)
    assert (decode["max_num_seqs"], decode["max_num_batched_tokens"]) == (256, 2048)
    # a prefill worker keeps pulling while it holds at most one longest prompt (inference/budget.py)
    assert k8s_settings("prefill").worker.prefill_token_budget >= 2 * prefill["max_model_len"]
