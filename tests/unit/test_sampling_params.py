"""vLLM's SamplingParams of a request (inference/vllm_engine.py): a field the client left unset
takes the model's default (its generation config), else vLLM's neutral value; one it set wins."""

from __future__ import annotations

import msgspec

from bus.messages import MODEL_DEFAULTED, SamplingSpec
from inference.vllm_engine import sampling_params


def test_unset_fields_take_the_models_defaults_and_set_ones_win():
    spec = SamplingSpec(max_tokens=8, temperature=0.3, top_k=0)
    params = sampling_params(spec, 8, None, {"temperature": 0.6, "top_p": 0.9, "top_k": 20})
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (0.3, 0.9, 0, 1.0)


def test_without_model_defaults_an_unset_field_is_vllms_neutral_value():
    params = sampling_params(SamplingSpec(max_tokens=8), 8, None)
    assert {name: getattr(params, name) for name in MODEL_DEFAULTED} == MODEL_DEFAULTED


def test_an_unset_field_stays_off_the_wire_and_a_set_one_is_carried():
    """Off the wire, a reader of an earlier build takes its own default (vLLM's neutral one)."""
    assert msgspec.json.decode(msgspec.json.encode(SamplingSpec(max_tokens=8))) == {"max_tokens": 8}
    carried = msgspec.json.decode(msgspec.json.encode(SamplingSpec(max_tokens=8, temperature=1.0, top_k=0)))
    assert carried == {"max_tokens": 8, "temperature": 1.0, "top_k": 0}
