"""Prompt-lookup (n-gram) drafts for vLLM's speculative decoding, proposed only where they pay.

vLLM loads this class by qualname (`speculative_config = {"method": "custom_class", "model":
"inference.lookup_drafter.LookupDrafter"}`, inference/profiles.py) and calls `propose` after every
step with the tokens each running request just got. A draft is the k tokens that followed the
latest earlier occurrence of the request's last n tokens (n from `max_n` down to `min_n`): when an
answer copies from its prompt (rewrite this code, extract these lines) most drafts are accepted and
one step yields several tokens; the target model verifies every draft, so the text is unchanged.

Measured on 2 CPU cores (`grokstack bench --speculation`), vLLM's own n-gram proposer costs even
when it drafts nothing: at 4 streams 0.70x of speculation off, with no draft proposed. Its numba
kernel runs with numba's OpenMP threads, which spin against torch's on the same cores, every step.
This drafter is plain numpy on the calling thread, and it drafts for a request only while that pays.
Verifying a draft token is not free on a CPU (measured: each costs about a fifth of a step), so:
- nothing is drafted while more than `max_batch` requests run (verifying drafts then costs the
  batch more than it gains on a compute-bound CPU);
- each request's acceptance is tracked: the chance that the model takes a draft token, given it
  took the ones before it (taken tokens over taken ones plus the draft's first rejected one).
  While it is high its drafts are long (`k`), while middling short (`short_k`), and below
  `min_acceptance` (a generic chat answer) it drafts only a `short_k` probe every `probe_every`
  steps, to notice when its answer starts copying. Not the share of drafted tokens taken: an
  answer that copies runs of about 5 tokens between words of its own has 4 of 8 taken (middling,
  so short drafts), then 2 of 2 (high, so long ones), and flip-flops at about 2.5x where long
  drafts give more.

Requests are told apart by their row in the batch (what vLLM hands a custom proposer); a row whose
token count did not advance by what it was just given is a new request there, and starts afresh. A
mistaken guess only costs a draft, never a wrong token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

# what inference/profiles.py puts in vLLM's `additional_config` for this drafter
CONFIG_KEY = "grokstack_lookup_drafter"


@dataclass(frozen=True)
class DrafterConfig:
    k: int = 8  # draft tokens per step at most (a request whose drafts are mostly accepted)
    min_n: int = 2
    max_n: int = 8
    max_batch: int = 1  # draft only while at most this many requests run
    min_acceptance: float = 0.4  # below this chance of a draft token taken, a request stops drafting
    short_k: int = 2  # draft tokens of a probe, and of a request whose acceptance is middling
    long_above: float = 0.5  # acceptance above which drafts are `k` long
    probe_every: int = 8  # steps between probes of a request that stopped drafting
    prior: float = 0.5  # a new request's acceptance, before any of its drafts was verified


@dataclass
class _Row:
    num_tokens: int = 0  # the request's tokens after the last step, to recognise it next step
    drafted: int = 0  # draft tokens proposed last step
    taken: float = 0.5  # draft tokens taken, decayed over its steps
    tried: float = 1.0  # ...and those plus the first rejected one of each draft
    idle_steps: int = 0  # steps since it last drafted

    @property
    def acceptance(self) -> float:
        """The chance the model takes a draft token, given it took the ones before it."""
        return self.taken / self.tried if self.tried else 0.0


def find_draft(context: np.ndarray, min_n: int, max_n: int, k: int) -> np.ndarray:
    """The k tokens after the latest earlier occurrence of the longest suffix of `context` of
    min_n..max_n tokens; empty when none occurs."""
    size = len(context)
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        windows = sliding_window_view(context[:-1], n)  # every n-gram that has a token after it
        hits = np.flatnonzero((windows == context[-n:]).all(axis=1))
        if len(hits):
            start = hits[-1] + n
            return context[start:start + k]
    return context[:0]


class LookupDrafter:
    def __init__(self, vllm_config: Any) -> None:
        extra = dict(getattr(vllm_config, "additional_config", None) or {}).get(CONFIG_KEY, {})
        self.config = DrafterConfig(**extra)
        self.k = min(self.config.k, vllm_config.speculative_config.num_speculative_tokens)
        self._rows: dict[int, _Row] = {}
        self.alpha = 0.3

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        return  # nothing to load: drafts come from the request's own tokens

    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec: np.ndarray,
                token_ids_cpu: np.ndarray, **kwargs: Any) -> list[list[int]]:
        batch = len(sampled_token_ids)
        drafts: list[list[int]] = [[] for _ in range(batch)]
        busy = sum(1 for s in sampled_token_ids if s) > self.config.max_batch
        for i, sampled in enumerate(sampled_token_ids):
            num_tokens = int(num_tokens_no_spec[i])
            row = self._track(i, sampled, num_tokens)
            k = 0 if busy or not sampled else self._draft_length(row)
            if not k:
                row.drafted = 0
                row.idle_steps += 1
                continue
            draft = find_draft(token_ids_cpu[i, :num_tokens], self.config.min_n, self.config.max_n, k)
            drafts[i] = draft.tolist()
            row.drafted, row.idle_steps = len(drafts[i]), 0
        for gone in [r for r in self._rows if r >= batch]:
            del self._rows[gone]
        return drafts

    def _track(self, i: int, sampled: list[int], num_tokens: int) -> _Row:
        row = self._rows.get(i)
        if row is None or num_tokens != row.num_tokens + len(sampled):
            row = self._rows[i] = _Row(taken=self.config.prior)
        elif row.drafted:  # one of the sampled tokens is the model's own; the rest were drafts it accepted
            taken = min(row.drafted, max(0, len(sampled) - 1))
            keep = 1 - self.alpha
            row.taken = keep * row.taken + taken
            row.tried = keep * row.tried + taken + (taken < row.drafted)
        row.num_tokens = num_tokens
        return row

    def _draft_length(self, row: _Row) -> int:
        """How many tokens to draft for this request now (0: none)."""
        c = self.config
        if row.acceptance > c.long_above:
            return self.k
        if row.acceptance >= c.min_acceptance or row.idle_steps >= c.probe_every:
            return min(self.k, c.short_k)
        return 0
