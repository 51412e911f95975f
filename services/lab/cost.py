"""`grokstack cost`: the $/1M tokens model, with the math shown.

    grokstack cost --prefill-tok-s 65086 --decode-tok-s 22714 --batch 256
    grokstack cost --metrics http://127.0.0.1:8000/metrics --metrics http://127.0.0.1:9400/metrics

A replica (one worker's engine on `gpus_per_worker` accelerators) costs
    $/s = price per GPU-hour x GPUs / 3600.
It turns that into tokens at its throughput, but only for the share of paid time it does useful
work (utilization), so
    $/1M input  = $/s / (prefill tok/s x utilization) x 1e6
    $/1M output = $/s / (decode tok/s x utilization) x 1e6,
where the decode rate is the aggregate over the batch and, with speculative decoding, is multiplied
by the expected tokens per verification step (Leviathan et al. 2023) over the verification
overhead. Throughput is given by flags, or measured from a running stack's Prometheus metrics
(services/lab/cost_metrics.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


# Share of paid accelerator time spent at the benchmarked throughput, when not measured. Serving
# is sized for peaks, not averages: traffic is diurnal and bursty (the 10x news spike), the
# interactive queue budget needs idle headroom, and the autoscaler keeps a floor of replicas and
# sheds them slowly (infra/k8s). 0.6 is an assumption to replace with the measured value
# (`--metrics`), not a measurement.
DEFAULT_UTILIZATION = 0.6


class CostError(ValueError):
    """Bad input: reported as one line and exit code 2, never a traceback."""


@dataclass(frozen=True)
class Speculation:
    acceptance: float  # alpha: the chance each draft token is accepted
    tokens: int  # k: draft tokens proposed per verification step
    overhead: float = 1.0  # cost of one verification step (k drafts) relative to a plain step
    # The share of drafted tokens accepted, when alpha was derived from it (shown in the math).
    rate: float | None = None


@dataclass(frozen=True)
class CostModel:
    price_per_hour: float
    gpus: float
    prefill_tok_s: float | None = None  # prompt tokens one replica computes per second
    decode_tok_s: float | None = None  # output tokens per second of one replica, over its batch
    prefill_utilization: float = DEFAULT_UTILIZATION
    decode_utilization: float = DEFAULT_UTILIZATION
    batch: int | None = None  # the batch the decode rate was measured at (shown, not used)
    speculation: Speculation | None = None
    io_ratio: tuple[float, float] = (3.0, 1.0)  # input tokens : output tokens, for the blend


# ---------------------------------------------------------------------------------- the math

def tokens_per_step(acceptance: float, k: int) -> float:
    """Expected tokens per verification step with k drafts, each accepted with probability
    alpha: (1 - alpha^(k+1)) / (1 - alpha) (Leviathan et al. 2023, eq. 1). alpha = 1 is the
    limit, k + 1: every draft accepted plus the target model's own token."""
    if acceptance >= 1.0:
        return float(k + 1)
    return (1.0 - acceptance ** (k + 1)) / (1.0 - acceptance)


def draft_acceptance_rate(acceptance: float, k: int) -> float:
    """The share of drafted tokens accepted, what vLLM and the stack's metrics count: lower than
    alpha, because the drafts after the first rejected one are never accepted.
    E[accepted] = alpha (1 - alpha^k) / (1 - alpha), over k drafted."""
    if acceptance >= 1.0:
        return 1.0
    return (acceptance - acceptance ** (k + 1)) / (k * (1.0 - acceptance))


def alpha_from_rate(rate: float, k: int) -> float:
    """Inverts `draft_acceptance_rate` (increasing in alpha) by bisection."""
    if not 0 <= rate <= 1:
        raise CostError(f"a draft acceptance rate must be in [0, 1], not {rate}")
    low, high = 0.0, 1.0
    for _ in range(60):  # 2^-60: far below the 4 digits printed
        mid = (low + high) / 2
        low, high = (mid, high) if draft_acceptance_rate(mid, k) < rate else (low, mid)
    return (low + high) / 2


def speculative_speedup(spec: Speculation) -> float:
    return tokens_per_step(spec.acceptance, spec.tokens) / spec.overhead


def dollars_per_second(price_per_hour: float, gpus: float) -> float:
    return price_per_hour * gpus / 3600.0


def dollars_per_million(usd_per_s: float, tok_s: float, utilization: float) -> float:
    return usd_per_s / (tok_s * utilization) * 1e6


def effective_decode_tok_s(model: CostModel) -> float | None:
    if model.decode_tok_s is None:
        return None
    if model.speculation is None:
        return model.decode_tok_s
    return model.decode_tok_s * speculative_speedup(model.speculation)


def input_price(model: CostModel) -> float | None:
    if model.prefill_tok_s is None:
        return None
    usd_s = dollars_per_second(model.price_per_hour, model.gpus)
    return dollars_per_million(usd_s, model.prefill_tok_s, model.prefill_utilization)


def output_price(model: CostModel) -> float | None:
    rate = effective_decode_tok_s(model)
    if rate is None:
        return None
    usd_s = dollars_per_second(model.price_per_hour, model.gpus)
    return dollars_per_million(usd_s, rate, model.decode_utilization)


def blended_price(usd_in: float, usd_out: float, ratio: tuple[float, float]) -> float:
    """$/1M tokens of a traffic mix with `ratio` input tokens to output tokens."""
    n_in, n_out = ratio
    return (n_in * usd_in + n_out * usd_out) / (n_in + n_out)


# ------------------------------------------------------------------------------ validation

def _positive(value: float | None, what: str) -> None:
    if value is not None and not (value > 0 and math.isfinite(value)):
        raise CostError(f"{what} must be a positive number, not {value}")


def check_fraction(value: float, what: str) -> None:
    if not 0 < value <= 1:
        raise CostError(f"{what} must be in (0, 1], not {value}")


def validate(model: CostModel) -> CostModel:
    _positive(model.price_per_hour, "the GPU price per hour")
    _positive(model.gpus, "GPUs per replica")
    _positive(model.prefill_tok_s, "prefill throughput (tok/s)")
    _positive(model.decode_tok_s, "decode throughput (tok/s)")
    check_fraction(model.prefill_utilization, "prefill utilization")
    check_fraction(model.decode_utilization, "decode utilization")
    if model.batch is not None and model.batch < 1:
        raise CostError(f"the batch size must be at least 1, not {model.batch}")
    if model.prefill_tok_s is None and model.decode_tok_s is None:
        raise CostError("give --prefill-tok-s and/or --decode-tok-s, or --metrics URL of a running stack")
    _positive(model.io_ratio[0], "the input side of --io-ratio")
    _positive(model.io_ratio[1], "the output side of --io-ratio")
    if model.speculation is not None:
        spec = model.speculation
        if not 0 <= spec.acceptance <= 1:
            raise CostError(f"--spec-acceptance must be in [0, 1], not {spec.acceptance}")
        if spec.tokens < 1:
            raise CostError(f"--spec-tokens must be at least 1, not {spec.tokens}")
        _positive(spec.overhead, "--spec-overhead")
    return model


def parse_ratio(text: str) -> tuple[float, float]:
    """'3:1' -> (3.0, 1.0)."""
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        return float(parts[0]), float(parts[1])
    except ValueError:
        raise CostError(f"--io-ratio takes INPUT:OUTPUT, e.g. 3:1, not {text!r}") from None


# ---------------------------------------------------------------------------- the printout

def num(x: float) -> str:
    """Four significant digits (all the integer digits), thousands separated, no trailing zeros,
    never scientific notation: 65,086 / 0.6 / 0.0008333."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    decimals = max(0, 3 - math.floor(math.log10(abs(x))))
    text = f"{x:,.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def usd(x: float) -> str:
    return f"${x:,.2f}" if abs(x) >= 1 else f"${num(x)}"


def render(model: CostModel, title: str) -> list[str]:
    usd_s = dollars_per_second(model.price_per_hour, model.gpus)
    lines = [title,
             f"  a replica costs {usd(model.price_per_hour)} per GPU-hour x {num(model.gpus)} "
             f"GPU{'s' if model.gpus != 1 else ''} / 3600 s = {usd(usd_s)} per second"]
    if model.prefill_tok_s is not None:
        lines += _input_lines(model, usd_s)
    if model.decode_tok_s is not None:
        lines += _output_lines(model, usd_s)
    usd_in, usd_out = input_price(model), output_price(model)
    if usd_in is not None and usd_out is not None:
        n_in, n_out = model.io_ratio
        lines += [f"  blended, {num(n_in)}:{num(n_out)} input:output tokens",
                  f"    ({num(n_in)} x {usd(usd_in)} + {num(n_out)} x {usd(usd_out)}) / {num(n_in + n_out)}"
                  f" = {usd(blended_price(usd_in, usd_out, model.io_ratio))} per 1M tokens"]
    return lines


def _input_lines(model: CostModel, usd_s: float) -> list[str]:
    rate, util = model.prefill_tok_s, model.prefill_utilization
    assert rate is not None
    billed = rate * util
    return ["  input (prefill)",
            f"    {num(rate)} prompt tok/s x utilization {num(util)} = {num(billed)} tok/s paid for",
            f"    $/1M input  = {usd(usd_s)} / {num(billed)} x 1e6 = {usd(usd_s / billed * 1e6)}"]


def _output_lines(model: CostModel, usd_s: float) -> list[str]:
    rate, util = model.decode_tok_s, model.decode_utilization
    assert rate is not None
    batch = f"a batch of {model.batch} ({num(rate / model.batch)} tok/s per sequence)" if model.batch else "its batch"
    lines = ["  output (decode)", f"    {num(rate)} output tok/s in total over {batch}"]
    if model.speculation is not None:
        lines += _speculation_lines(model.speculation, rate)
    effective = effective_decode_tok_s(model)
    assert effective is not None
    billed = effective * util
    return lines + [
        f"    {num(effective)} tok/s x utilization {num(util)} = {num(billed)} tok/s paid for",
        f"    $/1M output = {usd(usd_s)} / {num(billed)} x 1e6 = {usd(usd_s / billed * 1e6)}"]


def _speculation_lines(spec: Speculation, rate: float) -> list[str]:
    a, k = spec.acceptance, spec.tokens
    per_step = tokens_per_step(a, k)
    formula = (f"k + 1 = {k + 1}" if a >= 1 else
               f"(1 - {num(a)}^{k + 1}) / (1 - {num(a)}) = {num(per_step)}")
    speedup = speculative_speedup(spec)
    alpha = (f"      per-token acceptance alpha = {num(a)}" if spec.rate is None else
             f"      {num(spec.rate)} of drafted tokens accepted -> alpha = {num(a)}, solving "
             f"rate = (alpha - alpha^{k + 1}) / ({k} (1 - alpha))")
    return [f"    speculative decoding, k = {k} draft tokens per step:", alpha,
            f"      tokens per verification step = {formula}",
            f"      / verification overhead {num(spec.overhead)} = x{num(speedup)}"
            + (" (overhead 1 is the ideal: set --spec-overhead)" if spec.overhead == 1 else ""),
            f"      {num(rate)} x {num(speedup)} = {num(rate * speedup)} tok/s"]


def with_utilization(model: CostModel, utilization: float | None) -> CostModel:
    """`--utilization` given with `--metrics` overrides the measured values."""
    if utilization is None:
        return model
    return replace(model, prefill_utilization=utilization, decode_utilization=utilization)
