"""A sampling field the client leaves unset takes the model's default, as vLLM's own server gives
it (the model's generation config; here set with vLLM's --override-generation-config), and a value
the client sets wins over it. With the real engine."""

from __future__ import annotations

import pytest

from bus.messages import SamplingSpec
from tests.integration.conftest import MAX_TOKENS, in_process

pytestmark = pytest.mark.engine


async def test_unset_sampling_fields_take_the_models_generation_config(engine_settings, reference):
    from inference.pools import DIRECT
    from services.processes import vllm_engine

    settings = in_process(engine_settings).replace(
        engine_args="""--override-generation-config '{"top_k": 1}'""")
    engine = vllm_engine(settings, DIRECT)
    await engine.start()
    try:
        assert engine.sampling_defaults == {"top_k": 1}
        prompt = reference["api"].prompt_token_ids

        async def answer(name: str, **fields) -> str:
            spec = SamplingSpec(max_tokens=MAX_TOKENS, temperature=1.0, seed=5, **fields)
            return "".join([c.text async for c in engine.generate(name, prompt, spec, MAX_TOKENS)])

        # top_k 1, the model's, at temperature 1: the greedy answer
        assert await answer("unset") == reference["api"].text
        # the client's own top_k (0: off) wins: sampled, another answer
        assert await answer("set", top_k=0) != reference["api"].text
    finally:
        await engine.shutdown()
