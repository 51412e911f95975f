"""The stack's n-gram drafter (inference/lookup_drafter.py), driven as vLLM drives a custom
proposer: after each step, the tokens each running request got, its token count and its tokens."""

from types import SimpleNamespace

import numpy as np

from inference.lookup_drafter import CONFIG_KEY, LookupDrafter, find_draft

TEXT = np.array([5, 6, 7, 8, 9, 10, 11, 12, 40, 41, 5, 6, 7], dtype=np.int32)
PERIOD = [1, 2, 3, 4, 5, 6, 7]
REPEATING = PERIOD * 4  # whatever comes next, its suffix occurred before: a draft is always found


def following(row: list[int], n: int) -> list[int]:
    """The next n tokens of a row that repeats PERIOD."""
    start = PERIOD.index(row[-1]) + 1
    return [PERIOD[(start + i) % len(PERIOD)] for i in range(n)]


def drafter(**config) -> LookupDrafter:
    vllm_config = SimpleNamespace(additional_config={CONFIG_KEY: config},
                                  speculative_config=SimpleNamespace(num_speculative_tokens=5))
    return LookupDrafter(vllm_config)


class Batch:
    """Rows of token ids as vLLM's input batch keeps them."""

    def __init__(self, *rows: list[int]) -> None:
        self.rows = [list(r) for r in rows]

    def step(self, d: LookupDrafter, sampled: list[list[int]]) -> list[list[int]]:
        for row, got in zip(self.rows, sampled, strict=True):
            row.extend(got)
        width = max(len(r) for r in self.rows)
        ids = np.zeros((len(self.rows), width), dtype=np.int32)
        for i, row in enumerate(self.rows):
            ids[i, :len(row)] = row
        return d.propose(sampled, np.array([len(r) for r in self.rows]), ids)


def test_a_draft_is_what_followed_the_latest_earlier_occurrence_of_the_longest_suffix():
    assert find_draft(TEXT, 2, 4, 3).tolist() == [8, 9, 10]
    assert find_draft(TEXT, 2, 4, 10).tolist() == [8, 9, 10, 11, 12, 40, 41, 5, 6, 7]
    assert find_draft(np.array([1, 2, 3, 4], dtype=np.int32), 2, 4, 3).tolist() == []
    assert find_draft(np.array([7, 7], dtype=np.int32), 2, 4, 3).tolist() == []  # no earlier occurrence


def test_nothing_is_drafted_while_more_requests_run_than_max_batch():
    d = drafter(max_batch=1)
    assert Batch(REPEATING).step(d, [[1]])[0] == [2, 3]  # a new request's drafts start short
    assert Batch(REPEATING, REPEATING).step(d, [[1], [1]]) == [[], []]
    assert Batch(REPEATING, REPEATING).step(drafter(max_batch=2), [[1], [1]])[1] != []


def test_a_request_whose_drafts_are_rejected_stops_drafting_and_probes_now_and_then():
    d = drafter(min_acceptance=0.4, probe_every=4, short_k=2)
    batch = Batch(REPEATING)
    drafted = []
    for _ in range(24):  # the model takes no draft: one token of its own per step
        drafts = batch.step(d, [following(batch.rows[0], 1)])
        drafted.append(bool(drafts[0]))
    assert drafted[0] and not any(drafted[1:4])
    later = drafted[4:]
    assert 0 < sum(later) <= len(later) // 4 + 1, drafted  # only the probes


def test_a_request_whose_drafts_are_accepted_keeps_drafting_and_its_drafts_grow():
    d = drafter(min_acceptance=0.4, k=5, short_k=2)
    batch = Batch(REPEATING)
    drafts = batch.step(d, [following(batch.rows[0], 1)])
    lengths = []
    for _ in range(10):
        assert drafts[0], "an accepted request stopped drafting"
        lengths.append(len(drafts[0]))
        # every draft taken, then the model's own token
        drafts = batch.step(d, [following(batch.rows[0], len(drafts[0]) + 1)])
    assert lengths[0] == 2 and lengths[-1] == 5  # short_k, then k


def test_a_new_request_in_a_row_starts_afresh():
    d = drafter(min_acceptance=0.4, probe_every=100)
    batch = Batch(REPEATING)
    for _ in range(8):
        drafts = batch.step(d, [following(batch.rows[0], 1)])
    assert drafts == [[]]  # given up on
    fresh = Batch(REPEATING[:-3])  # another request took the row: its count did not follow on
    assert fresh.step(d, [following(fresh.rows[0], 1)])[0] != []


def test_the_copy_share_counts_the_answer_tokens_a_perfect_lookup_would_draft():
    from services.lab.spec_bench import copy_share
    prompt = list(range(100, 140))
    # An answer that copies the prompt: every token after its second (a draft needs 2 tokens of
    # context that occurred before, and the prompt's last token and the answer's first did not).
    assert copy_share(prompt, prompt[:20]) == 18 / 19
    assert copy_share(prompt, list(range(500, 520))) == 0.0  # nothing of it occurs before
    half = [*prompt[:11], *range(600, 610)]  # 9 of its 20 later tokens are drafted right
    assert copy_share(prompt, half) == 9 / 20
    assert copy_share(prompt, [7]) == 0.0


def test_a_request_that_copies_short_runs_keeps_long_drafts():
    """The model takes the first 2 tokens of every draft and then says a word of its own: 2 of 3
    draft tokens tried were taken. Judged by the share of drafted tokens taken (2 of 5) it would
    fall to short drafts, then (2 of 2) rise again, and flip-flop."""
    d = drafter(min_acceptance=0.4, k=5, short_k=2)
    batch = Batch(REPEATING)
    drafts = batch.step(d, [following(batch.rows[0], 1)])
    lengths = []
    for _ in range(12):
        lengths.append(len(drafts[0]))
        drafts = batch.step(d, [following(batch.rows[0], min(2, len(drafts[0])) + 1)])
    assert lengths[0] == 2 and set(lengths[3:]) == {5}, lengths
