"""`grokstack bench --speculation`: speculative decoding on and off, side by side, in one run.

The same engine (model, profile, decode slots) is started once per speculation setting, all in this
process at once (no bus, no KV connector: only the engine's own speed is measured), and the settings
take turns on each cell, --spec-rounds times. Each runs the same requests (twice as many as streams)
at each concurrency of --spec-streams, on two prompt sets:

- grounded: answers that copy from their prompt (rewrite code with a name changed, copy a
  paragraph and add a sentence, extract matching lines): where n-gram drafts are accepted;
- generic: short chat questions, where drafts are mostly wrong.

It prints output tokens/s per cell for each setting and the ratio to speculation off, the draft
acceptance (accepted of proposed draft tokens, from vLLM's scheduler stats), the longest pause
between two tokens of one stream (a stalled step shows there), and whether every greedy answer
was identical to speculation off (speculation must be lossless).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field

import numpy as np

from bus.messages import ChatMessage, SamplingSpec
from inference.lookup_drafter import find_draft
from inference.pools import Pool
from services.settings import Settings

CODE = '''def total_price(items, tax_rate):
    subtotal = 0
    for item in items:
        subtotal += item.price * item.quantity
    discount = 0
    if subtotal > 100:
        discount = subtotal * 0.05
    taxed = (subtotal - discount) * (1 + tax_rate)
    return round(taxed, 2)'''
PARAGRAPH = ("The old lighthouse stood on the northern cliff for more than a century. Every night its keeper "
             "climbed the narrow stairs, trimmed the wick and polished the great lens until it shone. Ships "
             "passing in the fog trusted its beam to guide them safely past the rocks below.")
LOG = "\n".join(f"2026-11-30 10:{m:02d}:{s:02d} {'ERROR' if (m + s) % 3 == 0 else 'INFO'} worker-{m % 4} "
                f"{'connection reset by peer' if (m + s) % 3 == 0 else 'request served in 12 ms'}"
                for m, s in ((m, (m * 7) % 60) for m in range(12)))
GROUNDED = [
    f"Rewrite this Python function with the variable `subtotal` renamed to `base`. Output only the code.\n\n{CODE}",
    f"Copy this paragraph exactly, then add one sentence at the end.\n\n{PARAGRAPH}",
    f"From this log, copy every line that contains ERROR, unchanged, one per line.\n\n{LOG}",
    f"Repeat this function exactly, adding a docstring as its first line.\n\n{CODE}",
]
GENERIC = [
    "Give me three tips for better sleep.",
    "Explain what a black hole is in two sentences.",
    "Why is the sky blue?",
    "What is the difference between weather and climate?",
]
SETS = {"grounded": GROUNDED, "generic": GENERIC}
SPECULATING = Pool("direct", "", None, True, "decode_slots")  # an engine that decodes, alone


def add_speculation_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("speculative decoding benchmark (--speculation)")
    g.add_argument("--speculation", action="store_true",
                   help="the decoding engine with speculation off and on, side by side")
    g.add_argument("--spec-streams", default="1,4,16", help="concurrencies to run, comma-separated")
    g.add_argument("--spec-settings", default="off,ngram",
                   help="speculation settings to compare, the first is the baseline: spec_method values, "
                        "each optionally with @N for spec_max_batch (speculate while at most N sequences decode) "
                        "and /K for spec_tokens (draft tokens at most): off,ngram,ngram@4/10")
    g.add_argument("--spec-max-tokens", type=int, default=128)
    g.add_argument("--spec-rounds", type=int, default=2,
                   help="each cell runs this many times on each setting, the settings taking turns")


@dataclass
class Cell:
    tokens: int = 0
    wall_s: float = 0.0
    longest_gap_s: float = 0.0
    draft_tokens: float = 0.0
    accepted_tokens: float = 0.0
    texts: dict[int, str] = field(default_factory=dict)  # by request number
    answers: dict[int, list[int]] = field(default_factory=dict)  # token ids, by request number
    prompts: dict[int, list[int]] = field(default_factory=dict)  # token ids, by request number
    decode_s: dict[int, float] = field(default_factory=dict)  # first token to last, summed over rounds
    rounds: int = 1

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else float("nan")


def spec_counters() -> tuple[float, float]:
    from inference import metrics
    return (metrics.SPEC_DRAFT_TOKENS.labels(SPECULATING.name)._value.get(),
            metrics.SPEC_ACCEPTED_TOKENS.labels(SPECULATING.name)._value.get())


async def run_cell(engine, prompts: list[str], streams: int, max_tokens: int) -> Cell:
    cell = Cell()
    sampling = SamplingSpec(max_tokens=max_tokens, temperature=0.0)
    requests = [(n, prompts[n % len(prompts)]) for n in range(max(2 * streams, len(prompts)))]
    queue: asyncio.Queue = asyncio.Queue()
    for item in requests:
        queue.put_nowait(item)
    drafted0, accepted0 = spec_counters()

    async def lane() -> None:
        while not queue.empty():
            n, prompt = queue.get_nowait()
            ids = engine.render_chat([ChatMessage("user", prompt)])
            text, answer, last, first = "", [], time.monotonic(), None
            async for chunk in engine.generate(f"spec-{streams}-{n}-{time.monotonic_ns()}", ids, sampling, max_tokens):
                now = time.monotonic()
                if chunk.token_ids:
                    cell.longest_gap_s = max(cell.longest_gap_s, now - last)
                    cell.tokens += len(chunk.token_ids)
                    first, last = first or now, now
                    answer += chunk.token_ids
                text += chunk.text
            cell.texts[n], cell.answers[n], cell.prompts[n] = text, answer, ids
            cell.decode_s[n] = last - (first or last)

    t0 = time.monotonic()
    await asyncio.gather(*(lane() for _ in range(streams)))
    cell.wall_s = time.monotonic() - t0
    drafted1, accepted1 = spec_counters()
    cell.draft_tokens, cell.accepted_tokens = drafted1 - drafted0, accepted1 - accepted0
    return cell


def engine_for(settings: Settings, setting: str):
    """An engine with this speculation setting: a spec_method, optionally @N for spec_max_batch and
    /K for spec_tokens (ngram@4/10)."""
    from inference.vllm_engine import VllmEngine
    from services.processes import engine_setup
    rest, _, tokens = setting.partition("/")
    name, _, max_batch = rest.partition("@")
    changes = ({"spec_method": name} | ({"spec_max_batch": int(max_batch)} if max_batch else {})
               | ({"spec_tokens": int(tokens)} if tokens else {}))
    return VllmEngine(engine_setup(settings.replace(**changes)), SPECULATING)


def merge(into: Cell | None, cell: Cell) -> Cell:
    if into is None:
        return cell
    into.tokens += cell.tokens
    into.wall_s += cell.wall_s
    into.longest_gap_s = max(into.longest_gap_s, cell.longest_gap_s)
    into.draft_tokens += cell.draft_tokens
    into.accepted_tokens += cell.accepted_tokens
    for n, seconds in cell.decode_s.items():
        into.decode_s[n] = into.decode_s.get(n, 0.0) + seconds
    into.rounds += 1
    return into  # the texts of the first round stand for all: greedy answers repeat


async def run_all(settings: Settings, setups: list[str], streams: list[int], max_tokens: int,
                  rounds: int) -> dict[str, dict[tuple[str, int], Cell]]:
    """Every engine alive at once (about 4 GiB each), each cell run on each in turn, `rounds`
    times: whatever else the machine does in the meantime falls on all settings alike."""
    engines = {setup: engine_for(settings, setup) for setup in setups}
    results: dict[str, dict[tuple[str, int], Cell]] = {setup: {} for setup in setups}
    try:
        for engine in engines.values():
            await engine.start()
            await run_cell(engine, GENERIC[:1], 1, 8)  # warm-up
            await run_cell(engine, GENERIC[:2], 2, 8)  # and a first batched step
        for _ in range(rounds):
            for n in streams:
                for kind, prompts in SETS.items():
                    for setup, engine in engines.items():
                        cell = await run_cell(engine, prompts, n, max_tokens)
                        results[setup][(kind, n)] = merge(results[setup].get((kind, n)), cell)
    finally:
        for engine in engines.values():
            await engine.shutdown()
    return results


def report(results: dict[str, dict[tuple[str, int], Cell]], args: argparse.Namespace) -> str:
    names = list(results)
    base = names[0]
    out = [f"\nspeculation side by side, same engine and requests, temperature 0, max_tokens {args.spec_max_tokens}",
           f"{'prompts':<10}{'streams':>8}" + "".join(f"{f'{n} tok/s':>14}" for n in names)
           + "".join(f"{f'{n}/{base}':>12}{'accepted':>10}{'longest gap':>13}{'same text':>11}" for n in names[1:])]
    for (kind, streams), cell in results[base].items():
        row = f"{kind:<10}{streams:>8}" + "".join(f"{results[n][(kind, streams)].tokens_per_s:>14.1f}" for n in names)
        for n in names[1:]:
            other = results[n][(kind, streams)]
            same = sum(other.texts[i] == cell.texts[i] for i in cell.texts)
            accepted = f"{other.accepted_tokens / other.draft_tokens:.0%}" if other.draft_tokens else "-"
            row += (f"{other.tokens_per_s / cell.tokens_per_s:>11.2f}x{accepted:>10}"
                    f"{other.longest_gap_s * 1000:>10.0f} ms{f'{same}/{len(cell.texts)}':>11}")
        out.append(row)
    out.append(f"longest gap between two tokens of a stream with {base}: "
               + ", ".join(f"{k} x{s}: {c.longest_gap_s * 1000:.0f} ms" for (k, s), c in results[base].items()))
    if (singles := [kind for kind, streams in results[base] if streams == 1]):
        out += per_prompt(results, singles)
    return "\n".join(out)


def copy_share(prompt_ids: list[int], answer: list[int]) -> float:
    """The share of the answer's tokens (after its first) that a perfect lookup drafter would have
    drafted right: the token after the latest earlier occurrence of the longest suffix (2 to 8
    tokens) of everything before it. What any n-gram drafter can win on this answer is bounded by it."""
    if len(answer) < 2:
        return 0.0
    context = np.array([*prompt_ids, *answer], dtype=np.int64)
    start = len(prompt_ids)
    hits = sum(1 for j in range(start + 1, len(context))
               if len(d := find_draft(context[:j], 2, 8, 1)) and d[0] == context[j])
    return hits / (len(answer) - 1)


def per_prompt(results: dict[str, dict[tuple[str, int], Cell]], kinds: list[str]) -> list[str]:
    """One stream, each prompt on its own: decode tokens/s (first token to last, so the prompt's
    pass is left out) of each setting, and how much of the answer copies from what came before it."""
    names = list(results)
    base = names[0]
    out = ["\none stream, each prompt: decode tok/s (first token to last) and the answer's copy share "
           "(tokens a perfect lookup drafter gets right)",
           f"{'prompt':<34}{'copy share':>11}" + "".join(f"{f'{n} tok/s':>14}" for n in names)
           + "".join(f"{f'{n}/{base}':>12}" for n in names[1:])]
    for kind in kinds:
        cells = {n: results[n][(kind, 1)] for n in names}
        for i, prompt in enumerate(SETS[kind]):
            answer = cells[base].answers.get(i, [])
            rate = {n: (len(c.answers.get(i, [])) - 1) * c.rounds / c.decode_s[i]
                    if c.decode_s.get(i) else float("nan") for n, c in cells.items()}
            label = f"{kind}: {prompt.split(chr(10))[0][:24]}"
            out.append(f"{label:<34}{copy_share(cells[base].prompts.get(i, []), answer):>10.0%} "
                       + "".join(f"{rate[n]:>14.1f}" for n in names)
                       + "".join(f"{rate[n] / rate[base]:>11.2f}x" for n in names[1:]))
    return out


async def run_speculation(settings: Settings, args: argparse.Namespace) -> int:
    streams = [int(s) for s in args.spec_streams.split(",")]
    results = await run_all(settings, args.spec_settings.split(","), streams, args.spec_max_tokens,
                            args.spec_rounds)
    print(report(results, args))
    return 0
