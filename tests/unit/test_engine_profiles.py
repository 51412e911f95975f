from bus.messages import ChatMessage, SamplingSpec
from services.lab.fake_engine import FakeEngine
from inference.pools import DIRECT, pool_named
from inference.profiles import PROFILES, engine_args, kv_transfer_config, speculative_config
from services.processes import engine_setup
from services.settings import Settings

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
