"""`grokstack bench --conversation`: a long conversation, turn by turn, warm against cold.

One chat about a long document (--history-tokens of it in the system message) goes on for
--turns turns; each turn's answer is sent back as the assistant message of the next, as a chat
client does. Every turn is asked twice through the same stack, one right after the other:

- warm: the conversation as it is, so the stack may load every earlier turn's KV from Redis
  (the prompt blocks prefill wrote, and the answer blocks decode wrote as it generated);
- cold: the same messages with the document's first words changed, so that no block of it
  matches anything stored and the whole prompt is computed again.

Per turn it prints the prompt, how many of its tokens were served from cached KV, that share of
the previous turn's prompt + answer (the history this turn repeats), the most that could be
cached (whole blocks and the partial blocks saved every GROKSTACK_KV_PARTIAL_STEP tokens, never
a prompt's last token nor the answer's, whose KV is never computed), and TTFT warm and cold side
by side. The history is lost past the last such mark of the previous answer; a larger loss means
the next prompt tokenized the previous answer differently from the ids the engine generated.
"""

from __future__ import annotations

import argparse
import statistics
import uuid
from dataclasses import dataclass

from edge.client import ChatResult, EdgeClient
from services.lab.common import log_file, start_stack
from services.settings import Settings
from services.supervisor import Supervisor

FACTS = [
    "The harbour at Lenwick was dredged in {n} to let container ships reach the inner quay.",
    "Its lighthouse, rebuilt after storm number {n}, now runs on solar panels and a spare battery.",
    "The ferry to the islands leaves {n} times a week in summer and twice a week in winter.",
    "Fishing boats land cod, hake and mackerel; the auction opens at {n} minutes past five.",
    "The town council meets on the first Monday of each month in room {n} of the old customs house.",
    "A railway line reached Lenwick in 18{n}, and the station still has its original clock.",
    "The museum keeps {n} ship models, a whale skeleton and the logbooks of three captains.",
    "Local schools teach sailing from the age of {n}, on dinghies the boatyard lends for free.",
]
QUESTIONS = [
    "Summarize what the document says about the harbour and the ferry.",
    "Which facts mention a number of years or a date? List them.",
    "Write a short paragraph for a tourist leaflet based on the document.",
    "What does the document say about schools and the museum?",
    "Give three questions a visitor might ask, with answers from the document.",
    "Rewrite your first answer in simpler words.",
]
CHARS_PER_TOKEN = 3.4  # measured: this text is about 3.4 characters per token of the bundled model


def add_conversation_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("conversation benchmark (--conversation)")
    g.add_argument("--conversation", action="store_true",
                   help="one long conversation turn by turn, warm (earlier turns' KV from Redis) against cold")
    g.add_argument("--turns", type=int, default=4)
    g.add_argument("--history-tokens", type=int, default=1200, help="about how long the document is, in tokens")
    g.add_argument("--answer-tokens", type=int, default=96, help="max_tokens of each answer")


def document(tokens: int) -> str:
    lines, n = [], 0
    while sum(len(line) + 1 for line in lines) < tokens * CHARS_PER_TOKEN:
        lines.append(f"{n + 1}. " + FACTS[n % len(FACTS)].format(n=10 + 7 * n))
        n += 1
    return "Answer questions about this document.\n" + "\n".join(lines)


@dataclass
class Turn:
    number: int
    prompt_tokens: int
    cached_tokens: int
    history_tokens: int  # the previous turn's prompt + answer: what this prompt repeats
    loadable_tokens: int  # of those, what whole and partial blocks could hold (the last tokens never)
    completion_tokens: int
    warm_ttft_s: float
    cold_ttft_s: float
    cold_cached_tokens: int
    warm_queue_ms: float  # where the warm TTFT went: waiting for prefill, and prefill's engine
    warm_prefill_ms: float


def ttft(result: ChatResult) -> float:
    return result.token_times[0][0] - result.started if result.token_times else float("nan")


async def ask(client: EdgeClient, messages: list[dict[str, str]], max_tokens: int) -> ChatResult:
    result = await client.complete(messages, max_tokens=max_tokens, temperature=0.0, priority="interactive")
    if result.error or not result.done:
        raise SystemExit(f"a turn failed: {result.error}")
    return result


async def converse(url: str, args: argparse.Namespace, unit: int) -> list[Turn]:
    """`unit`: the tokens of a block, or of a partial block, the KV store keeps history in."""
    doc = document(args.history_tokens)
    history = [{"role": "system", "content": doc}]
    turns: list[Turn] = []
    previous = 0  # the previous turn's prompt + answer tokens
    async with await EdgeClient.connect(url) as client:
        for n in range(args.turns):
            messages = history + [{"role": "user", "content": QUESTIONS[n % len(QUESTIONS)]}]
            # same length, other first words: no stored block matches
            cold_messages = [{"role": "system", "content": f"[{uuid.uuid4().hex[:8]}]" + doc[10:]}] + messages[1:]
            cold = await ask(client, cold_messages, args.answer_tokens)
            warm = await ask(client, messages, args.answer_tokens)
            usage = warm.done["usage"]
            turns.append(Turn(
                n + 1, usage["prompt_tokens"], usage["cached_prompt_tokens"], previous,
                max(0, min(previous, usage["prompt_tokens"]) - 1) // unit * unit,
                usage["completion_tokens"], ttft(warm), ttft(cold), cold.done["usage"]["cached_prompt_tokens"],
                warm.done["timings"]["queue_ms"], warm.done["timings"]["prefill_ms"]))
            previous = usage["prompt_tokens"] + usage["completion_tokens"]
            history = messages + [{"role": "assistant", "content": warm.text}]
    return turns


def report(turns: list[Turn], args: argparse.Namespace, block_size: int, unit: int) -> str:
    out = [f"\none conversation, {args.turns} turns, a {args.history_tokens}-token document, answers of up to "
           f"{args.answer_tokens} tokens, temperature 0; KV blocks of {block_size} tokens",
           f"{'turn':>4}{'prompt':>8}{'cached':>8}{'history':>9}{'cached/history':>16}{'most cachable':>15}"
           f"{'TTFT warm ms':>14}{'TTFT cold ms':>14}{'cold/warm':>11}{'warm: queue + prefill ms':>26}"]
    for t in turns:
        share = f"{t.cached_tokens / t.history_tokens:.1%}" if t.history_tokens else "-"
        out.append(f"{t.number:>4}{t.prompt_tokens:>8}{t.cached_tokens:>8}{t.history_tokens:>9}{share:>16}"
                   f"{t.loadable_tokens:>15}{t.warm_ttft_s * 1000:>14.0f}{t.cold_ttft_s * 1000:>14.0f}"
                   f"{t.cold_ttft_s / t.warm_ttft_s:>10.1f}x{t.warm_queue_ms:>14.0f} + {t.warm_prefill_ms:<9.0f}")
    later = [t for t in turns if t.history_tokens]
    if later:
        worst = min(t.cached_tokens / t.history_tokens for t in later)
        lost = [t.history_tokens - t.cached_tokens for t in later]
        short = [t.loadable_tokens - t.cached_tokens for t in later]
        out += [f"\nturns 2-{turns[-1].number}: at least {worst:.1%} of the previous turn's prompt + answer served "
                f"from cached KV (target >= 90%) -> {'met' if worst >= 0.9 else 'MISSED'}",
                f"  history tokens recomputed per turn: {lost} (past the last multiple of {unit}: at most {unit - 1});"
                f" short of the most cachable: {short}"
                + ("" if not any(short) else " (the next prompt tokenized an answer differently)"),
                f"  TTFT cold/warm, median over turns 2-{turns[-1].number}: "
                f"{statistics.median(t.cold_ttft_s / t.warm_ttft_s for t in later):.1f}x",
                f"  cold runs found cached tokens: {[t.cold_cached_tokens for t in turns]} (should be 0)"]
    return "\n".join(out)


async def run_conversation(settings: Settings, args: argparse.Namespace) -> int:
    from inference.profiles import resolve_profile
    block_size = settings.engine.block_size or resolve_profile(settings.engine).block_size
    step = settings.kv.kv_partial_step
    unit = step if step and block_size % step == 0 else block_size
    with Supervisor() as supervisor:
        url = args.url or start_stack(supervisor, settings, log_file(settings, "conversation")).url
        turns = await converse(url, args, unit)
    print(report(turns, args, block_size, unit))
    return 0
