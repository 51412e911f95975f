"""The failover-aware client (edge/client.py: RegionalClient) on the real pipeline: its edge crashes
mid-answer and the client finishes the request on another edge, resuming it by request id; when the
other edge does not know the request, the client sends the chat again there and the text is still whole."""

from __future__ import annotations

from edge.client import RegionalClient, collect
from services.lab.fake_engine import FakeEngine
from tests.conftest import unique_prefix
from tests.pipeline.harness import another_edge, crash, running_stack
from tests.pipeline.test_chat_flow import expected


def slow_engines() -> tuple[FakeEngine, FakeEngine]:
    return FakeEngine("prefill"), FakeEngine("decode", token_delay_s=0.03)


async def frames_crashing_after(edges: RegionalClient, question: str, doomed, tokens: int) -> list[dict]:
    """The frames of one chat through `edges`; the edge `doomed` crashes after `tokens` tokens."""
    frames: list[dict] = []
    async for frame in edges.stream([{"role": "user", "content": question}], max_tokens=200, temperature=0.0):
        frames.append(frame)
        if sum(f["type"] == "token" for f in frames) == tokens and frame["type"] == "token":
            await crash(doomed)
    return frames


def tokens_of(frames: list[dict]) -> list[dict]:
    return [f for f in frames if f["type"] == "token"]


async def test_the_client_finishes_on_another_edge_when_its_edge_dies(settings):
    question = "finish me somewhere else " * 2
    async with running_stack(settings, *slow_engines()) as stack, another_edge(settings) as doomed:
        async with RegionalClient([doomed.url, stack.url], give_up_s=10) as edges:
            assert edges.url == doomed.url
            frames = await frames_crashing_after(edges, question, doomed, tokens=5)
            assert edges.url == stack.url
        assert stack.decode.worker.counters.cancelled == 0
    kinds = [f["type"] for f in frames]
    assert kinds.count("reconnected") == 1 and "resubmitted" not in kinds
    resumed = frames[kinds.index("reconnected") + 1]
    assert resumed["type"] == "accepted" and resumed["resumed"] is True
    assert resumed["request_id"] == frames[0]["request_id"]
    assert [f["seq"] for f in tokens_of(frames)] == list(range(len(tokens_of(frames))))
    result = await collect(_replay(frames))
    assert result.text == expected(question) and result.done["finish_reason"] == "stop"
    assert (result.region, result.route, result.resubmitted) == ("local", "home", False)


async def test_the_client_sends_the_chat_again_where_no_edge_knows_it(settings):
    """The second edge belongs to a stack with its own subjects (as a region that never received a
    mirror of the request): it answers the resume with unknown_request, and the client asks again."""
    question = "nobody over there has heard of me " * 2
    elsewhere = settings.replace(subject_prefix=(prefix := unique_prefix()), kv_key_prefix=f"gskv:{prefix}",
                                 worker_id=f"w-{prefix}")
    async with running_stack(settings, *slow_engines()), another_edge(settings) as doomed, \
            running_stack(elsewhere, *slow_engines()) as other:
        async with RegionalClient([doomed.url, other.url], give_up_s=10) as edges:
            frames = await frames_crashing_after(edges, question, doomed, tokens=5)
        assert frames[[f["type"] for f in frames].index("reconnected")]["url"] == other.url
        assert other.decode.worker.counters.cancelled == 0
    kinds = [f["type"] for f in frames]
    assert kinds.count("reconnected") == 1 and kinds.count("resubmitted") == 1
    first, again = [f for f in frames if f["type"] == "accepted"]
    assert again["request_id"] != first["request_id"] and again["resumed"] is False
    seqs = [f["seq"] for f in tokens_of(frames)]
    assert seqs == list(range(len(seqs)))  # the new answer's tokens 0..4 were shown already: dropped
    result = await collect(_replay(frames))
    assert result.text == expected(question) and result.done["finish_reason"] == "stop"
    assert result.resubmitted and result.request_id == again["request_id"]


async def _replay(frames: list[dict]):
    for frame in frames:
        yield frame
