from bus.messages import ChatMessage, SamplingSpec
from services.lab.fake_engine import FakeEngine
from inference.profiles import PROFILES, engine_args, kv_transfer_config, speculative_config
from services.settings import Settings

S = Settings(redis_url="redis://r:1/0")


def test_cpu_profile_is_float32_eager_and_speculates_on_decode_only_when_asked():
    cpu = PROFILES["cpu"]
    assert (cpu.dtype, cpu.enforce_eager) == ("float32", True)
    assert speculative_config(S, cpu, "decode") is None  # auto: off on CPU (see profiles.py)
    decode = speculative_config(S.replace(spec_method="ngram"), cpu, "decode")
    assert decode["method"] == "ngram" and decode["num_speculative_tokens"] == 5
    # speculation stops above spec_max_batch sequences
    assert decode["num_speculative_tokens_per_batch_size"] == [[1, 1, 5], [2, 4096, 0]]
    assert speculative_config(S, cpu, "prefill") is None
    assert speculative_config(S.replace(spec_method="off"), cpu, "decode") is None


def test_draft_model_mode_is_selectable():
    spec = speculative_config(S.replace(spec_method="draft", spec_draft_model="/d"), PROFILES["cpu"], "decode")
    assert spec["method"] == "draft_model" and spec["model"] == "/d"


def test_roles_get_their_kv_connector_role():
    assert kv_transfer_config(S, "prefill")["kv_role"] == "kv_both"
    assert kv_transfer_config(S, "decode")["kv_role"] == "kv_consumer"
    assert kv_transfer_config(S, "direct") is None
    extra = kv_transfer_config(S, "decode")["kv_connector_extra_config"]
    assert extra["redis_url"] == "redis://r:1/0"


def test_gpu_profile_is_bf16_and_compiled():
    args = engine_args(S, PROFILES["gpu"], "direct")
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
    assert speculative_config(S.replace(spec_method="ngram"), cpu, "aggregated")["method"] == "ngram"
    assert speculative_config(S, PROFILES["gpu"], "aggregated")["method"] == "ngram"
    assert kv_transfer_config(S, "aggregated")["kv_role"] == "kv_both"
