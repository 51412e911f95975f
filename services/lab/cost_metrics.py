"""`grokstack cost --metrics URL ...`: the $/1M tokens model from a running stack's metrics.

Reads every process's Prometheus /metrics (the edge and each worker) and sums them:
  grokstack_gpu_seconds_total{role}          accelerator-seconds attributed to requests
  grokstack_worker_busy_seconds_total{role}  wall time with at least one job running
  grokstack_prompt_tokens_total{role}        prompt tokens seen
  grokstack_kv_cache_hit_tokens_total{stage} stage "prefill": prompt tokens found in cached KV
  grokstack_generation_tokens_total{role}    output tokens
  grokstack_spec_decode_drafts_total, _{draft,accepted}_tokens_total
  grokstack_cost_usd_total{role}             dollars attributed to requests
and derives
  prefill tok/s per replica = computed prompt tokens / prefill GPU-seconds x GPUs per replica
  decode tok/s per replica  = generated tokens / decode GPU-seconds x GPUs per replica
  utilization               = GPU-seconds attributed / (GPUs x wall seconds the workers were up)
The wall time is the window (`--window-s`: two scrapes, their difference) or each worker's uptime
(`process_start_time_seconds`); a worker without it counts only its busy time, which hides idle
time and so overstates utilization (the printout says which was used).
"""

from __future__ import annotations

import argparse
import math
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from services.lab.cost import (CostError, CostModel, alpha_from_rate, dollars_per_second, draft_acceptance_rate,
                           num, parse_ratio, render, tokens_per_step, usd, validate, with_utilization)
from services.settings import Settings

Key = tuple[str, frozenset[tuple[str, str]]]  # sample name, labels

GPU_S = "grokstack_gpu_seconds_total"
BUSY_S = "grokstack_worker_busy_seconds_total"
PROMPT = "grokstack_prompt_tokens_total"
KV_HIT = "grokstack_kv_cache_hit_tokens_total"
GENERATED = "grokstack_generation_tokens_total"
DRAFTS = "grokstack_spec_decode_drafts_total"
DRAFT = "grokstack_spec_decode_draft_tokens_total"
ACCEPTED = "grokstack_spec_decode_accepted_tokens_total"
COST = "grokstack_cost_usd_total"
START = "process_start_time_seconds"


class ScrapeError(RuntimeError):
    """A /metrics URL that cannot be read: exit code 1, like an unreachable bus."""


@dataclass(frozen=True)
class Scrape:
    url: str
    samples: dict[Key, float]
    wall_s: float | None  # how long the process was up for these counts; None: unknown


def parse_metrics(text: str) -> dict[Key, float]:
    """Prometheus text format -> {(sample name, labels): value}."""
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError as exc:
        raise ScrapeError(f"not Prometheus text format: {exc}") from None
    return {(s.name, frozenset(s.labels.items())): float(s.value) for f in families for s in f.samples}


def fetch(url: str, timeout_s: float = 5.0) -> tuple[dict[Key, float], float]:
    try:
        # the classic text format: OpenMetrics (exemplars) is for Prometheus, not this parser
        request = urllib.request.Request(url, headers={"Accept": "text/plain; version=0.0.4"})
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            text = response.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ScrapeError(f"cannot read {url}: {exc}") from None
    return parse_metrics(text), time.time()


def totals_scrape(url: str) -> Scrape:
    samples, taken_at = fetch(url)
    start = total([Scrape(url, samples, None)], START)
    return Scrape(url, samples, taken_at - start if start > 0 else None)


def difference(before: dict[Key, float], after: dict[Key, float]) -> dict[Key, float]:
    """Counter increase; a counter that went down restarted in between, so it counts from 0."""
    return {key: value - before.get(key, 0.0) if value >= before.get(key, 0.0) else value
            for key, value in after.items()}


def window_scrapes(urls: list[str], window_s: float) -> list[Scrape]:
    first = {url: fetch(url) for url in urls}
    time.sleep(window_s)
    scrapes = []
    for url in urls:
        samples, taken_at = fetch(url)
        before, taken_before = first[url]
        scrapes.append(Scrape(url, difference(before, samples), taken_at - taken_before))
    return scrapes


def total(scrapes: list[Scrape], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(value for s in scrapes for (sample, have), value in s.samples.items()
               if sample == name and want <= have)


# ------------------------------------------------------------------------------ by role

@dataclass(frozen=True)
class RoleUse:
    role: str
    tokens: float  # computed prompt tokens (prefill), generated (decode), both (aggregated)
    gpu_s: float
    busy_s: float
    wall_s: float | None  # summed over the role's workers; None if any worker's is unknown
    workers: int

    def tok_s_per_replica(self, gpus: float) -> float | None:
        return self.tokens / self.gpu_s * gpus if self.gpu_s > 0 and self.tokens > 0 else None

    def utilization(self, gpus: float) -> float | None:
        basis = self.wall_s if self.wall_s else self.busy_s
        return min(1.0, self.gpu_s / (gpus * basis)) if basis > 0 and self.gpu_s > 0 else None


def runs(scrape: Scrape, role: str) -> bool:
    """A process runs a worker of `role` when any of its samples carries that role label: an idle
    worker's counters may not have moved, and its wall time must still count."""
    return any(("role", role) in labels for _name, labels in scrape.samples)


def role_use(scrapes: list[Scrape], role: str, tokens: float) -> RoleUse:
    mine = [s for s in scrapes if runs(s, role)]
    walls = [s.wall_s for s in mine]
    wall = None if not walls or any(w is None for w in walls) else sum(w for w in walls if w is not None)
    return RoleUse(role, tokens, total(scrapes, GPU_S, role=role), total(scrapes, BUSY_S, role=role), wall,
                   len(mine))


def computed_prompt_tokens(scrapes: list[Scrape], role: str) -> float:
    """Prompt tokens `role` computed: seen minus found in cached KV. Prefill and aggregated
    workers both count their cache hits as stage "prefill"; a process running both (tests do)
    has its hits shared in proportion to each role's prompt tokens."""
    computed = 0.0
    for s in scrapes:
        mine = total([s], PROMPT, role=role)
        both = mine + total([s], PROMPT, role="aggregated" if role == "prefill" else "prefill")
        if mine > 0:
            computed += max(0.0, mine - total([s], KV_HIT, stage="prefill") * mine / both)
    return computed


def uses(scrapes: list[Scrape]) -> dict[str, RoleUse]:
    aggregated = computed_prompt_tokens(scrapes, "aggregated") + total(scrapes, GENERATED, role="aggregated")
    return {"prefill": role_use(scrapes, "prefill", computed_prompt_tokens(scrapes, "prefill")),
            "decode": role_use(scrapes, "decode", total(scrapes, GENERATED, role="decode")),
            "aggregated": role_use(scrapes, "aggregated", aggregated)}


# ---------------------------------------------------------------------------- the printout

def measured_model(settings: Settings, by_role: dict[str, RoleUse], ratio: tuple[float, float]) -> CostModel:
    gpus = settings.worker.gpus_per_worker
    prefill, decode = by_role["prefill"], by_role["decode"]
    return CostModel(settings.worker.gpu_price_per_hour, gpus, prefill.tok_s_per_replica(gpus),
                     decode.tok_s_per_replica(gpus), prefill.utilization(gpus) or 1.0,
                     decode.utilization(gpus) or 1.0, io_ratio=ratio)


def use_lines(use: RoleUse, gpus: float, what: str) -> list[str]:
    if use.gpu_s <= 0:
        return []
    rate, util = use.tok_s_per_replica(gpus), use.utilization(gpus)
    basis = (f"{num(use.wall_s)} s up" if use.wall_s else
             f"{num(use.busy_s)} s busy (uptime unknown: idle time not counted)")
    lines = [f"  {use.role}: {num(use.tokens)} {what} in {num(use.gpu_s)} GPU-s attributed, "
             f"{use.workers} worker(s), {basis}"]
    if rate is not None:
        lines.append(f"    {num(use.tokens)} / {num(use.gpu_s)} GPU-s x {num(gpus)} GPU per replica "
                     f"= {num(rate)} tok/s per replica")
    if util is not None:
        base = use.wall_s if use.wall_s else use.busy_s
        lines.append(f"    utilization = {num(use.gpu_s)} / ({num(gpus)} x {num(base)}) = {num(util)}")
    return lines


def aggregated_lines(settings: Settings, use: RoleUse, override: float | None) -> list[str]:
    gpus = settings.worker.gpus_per_worker
    rate, util = use.tok_s_per_replica(gpus), override or use.utilization(gpus)
    if rate is None or util is None:
        return []
    usd_s = dollars_per_second(settings.worker.gpu_price_per_hour, gpus)
    billed = rate * util
    return ["  aggregated workers prefill and decode on one engine, so their GPU-seconds do not split:",
            f"    $/1M tokens (computed prompt + generated) = {usd(usd_s)} / ({num(rate)} x {num(util)}) x 1e6"
            f" = {usd(usd_s / billed * 1e6)}"]


def speculation_lines(scrapes: list[Scrape], k: int) -> list[str]:
    drafted, accepted, drafts = total(scrapes, DRAFT), total(scrapes, ACCEPTED), total(scrapes, DRAFTS)
    if drafted <= 0:
        return []
    rate = min(1.0, accepted / drafted)
    # The draft length actually proposed (ngram may propose fewer than k); else the setting.
    k, where = (max(1, round(drafted / drafts)), "drafted per step") if drafts > 0 else (k, "GROKSTACK_SPEC_TOKENS")
    alpha = alpha_from_rate(rate, k)
    assert math.isclose(draft_acceptance_rate(alpha, k), rate, abs_tol=1e-6)
    per_step = (f"1 + {num(accepted)} / {num(drafts)} drafts = {num(1 + accepted / drafts)}" if drafts > 0
                else num(tokens_per_step(alpha, k)))
    return ["  speculative decoding (already inside the measured decode rate):",
            f"    {num(accepted)} of {num(drafted)} drafted tokens accepted = {num(rate)}; k = {k} ({where}),"
            f" so alpha = {num(alpha)}; tokens per verification step = {per_step}"]


def spent_lines(scrapes: list[Scrape]) -> list[str]:
    spent = total(scrapes, COST)
    prompt = total(scrapes, PROMPT, role="prefill") + total(scrapes, PROMPT, role="aggregated")
    generated = total(scrapes, GENERATED)
    if spent <= 0 or prompt + generated <= 0:
        return []
    lines = ["  dollars spent / tokens served (attributed GPU time only, idle time excluded):",
             f"    {usd(spent)} / ({num(prompt)} prompt + {num(generated)} generated tokens) x 1e6"
             f" = {usd(spent / (prompt + generated) * 1e6)} per 1M tokens"]
    for role, tokens, what in (("prefill", total(scrapes, PROMPT, role="prefill"), "prompt"),
                               ("decode", total(scrapes, GENERATED, role="decode"), "generated")):
        cost = total(scrapes, COST, role=role)
        if cost > 0 and tokens > 0:
            lines.append(f"    {role}: {usd(cost)} / {num(tokens)} {what} tokens x 1e6 "
                         f"= {usd(cost / tokens * 1e6)} per 1M")
    return lines


def measured_report(settings: Settings, args: argparse.Namespace) -> list[str]:
    if not (args.window_s >= 0 and math.isfinite(args.window_s)):
        raise CostError(f"--window-s must be a number of seconds, not {args.window_s}")
    ratio = parse_ratio(args.io_ratio)
    if args.utilization is not None and not 0 < args.utilization <= 1:
        raise CostError(f"--utilization must be in (0, 1], not {args.utilization}")
    scrapes = window_scrapes(args.metrics, args.window_s) if args.window_s else [totals_scrape(u) for u in args.metrics]
    return report_lines(settings, scrapes, ratio, args.utilization,
                        f"over the last {num(args.window_s)} s" if args.window_s else "since each process started")


def report_lines(settings: Settings, scrapes: list[Scrape], ratio: tuple[float, float],
                 utilization: float | None, period: str) -> list[str]:
    by_role = uses(scrapes)
    if all(use.gpu_s <= 0 for use in by_role.values()):
        raise CostError(f"no {GPU_S} in the scraped metrics ({period}): give the workers' /metrics URLs, "
                        "and let them serve some requests first")
    gpus = settings.worker.gpus_per_worker
    lines = [f"measured from {len(scrapes)} process(es), {period}"]
    lines += use_lines(by_role["prefill"], gpus, "prompt tokens computed (cached ones excluded)")
    lines += use_lines(by_role["decode"], gpus, "tokens generated")
    lines += use_lines(by_role["aggregated"], gpus, "tokens computed and generated")
    lines += speculation_lines(scrapes, settings.spec.spec_tokens)
    model = with_utilization(measured_model(settings, by_role, ratio), utilization)
    if model.prefill_tok_s is not None or model.decode_tok_s is not None:
        lines += render(validate(model), "$/1M tokens from the measured throughput"
                        + (f" (utilization {num(utilization)} given)" if utilization else ""))
    lines += aggregated_lines(settings, by_role["aggregated"], utilization)
    return lines + spent_lines(scrapes)
