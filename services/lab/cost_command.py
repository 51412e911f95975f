"""`grokstack cost`: the $/1M tokens model (services/lab/cost.py) from throughput given on the
command line, or measured from a running stack's metrics (services/lab/cost_metrics.py)."""

from __future__ import annotations

import argparse
import sys

from services.lab.cost import (DEFAULT_UTILIZATION, CostError, CostModel, Speculation, check_fraction, alpha_from_rate,
                               parse_ratio, render, validate)
from services.lab.cost_metrics import ScrapeError, measured_report
from services.settings import Settings


def add_cost_arguments(parser: argparse.ArgumentParser) -> None:
    given = parser.add_argument_group("throughput given")
    given.add_argument("--prefill-tok-s", type=float, help="prompt tokens one replica prefills per second")
    given.add_argument("--decode-tok-s", type=float,
                       help="output tokens per second of one replica, in total over its batch")
    given.add_argument("--batch", type=int, help="the batch size --decode-tok-s was measured at (shown)")
    given.add_argument("--utilization", type=float, default=None,
                       help=f"share of paid time at that throughput (default {DEFAULT_UTILIZATION}; "
                            "measured with --metrics)")
    given.add_argument("--spec-acceptance", type=float, help="speculative decoding: alpha, the chance "
                                                             "each draft token is accepted")
    given.add_argument("--spec-acceptance-rate", type=float,
                       help="speculative decoding: instead of alpha, the share of drafted tokens "
                            "accepted (what vLLM reports); alpha is derived from it")
    given.add_argument("--spec-tokens", type=int, default=None,
                       help="speculative decoding: k, draft tokens per step (default GROKSTACK_SPEC_TOKENS)")
    given.add_argument("--spec-overhead", type=float, default=1.0,
                       help="cost of verifying k drafts (and drafting them) relative to a plain decode "
                            "step (default 1.0, the ideal)")
    parser.add_argument("--io-ratio", default="3:1", help="input:output tokens of the traffic, for the "
                                                          "blended price (default 3:1)")
    measured = parser.add_argument_group("throughput measured from a running stack")
    measured.add_argument("--metrics", action="append", default=[], metavar="URL",
                          help="a process's /metrics URL (repeat for the edge and every worker)")
    measured.add_argument("--window-s", type=float, default=0.0,
                          help="scrape twice this many seconds apart and use the difference (a live "
                               "rate); default: totals since each process started")


def given_model(settings: Settings, args: argparse.Namespace) -> CostModel:
    util = DEFAULT_UTILIZATION if args.utilization is None else args.utilization
    check_fraction(util, "--utilization")
    spec = None
    k = settings.spec.spec_tokens if args.spec_tokens is None else args.spec_tokens
    if args.spec_acceptance is not None and args.spec_acceptance_rate is not None:
        raise CostError("give --spec-acceptance (alpha) or --spec-acceptance-rate, not both")
    if args.spec_acceptance is not None:
        spec = Speculation(args.spec_acceptance, k, args.spec_overhead)
    elif args.spec_acceptance_rate is not None:
        if k < 1:
            raise CostError(f"--spec-tokens must be at least 1, not {k}")
        rate = args.spec_acceptance_rate
        spec = Speculation(alpha_from_rate(rate, k), k, args.spec_overhead, rate)
    return CostModel(settings.worker.gpu_price_per_hour, settings.worker.gpus_per_worker, args.prefill_tok_s,
                     args.decode_tok_s, util, util, args.batch, spec, parse_ratio(args.io_ratio))


def run_cost(settings: Settings, args: argparse.Namespace) -> int:
    try:
        if args.metrics:
            lines = measured_report(settings, args)
        else:
            lines = render(validate(given_model(settings, args)), "$/1M tokens from the given throughput")
    except CostError as exc:
        print(f"grokstack cost: {exc}", file=sys.stderr)
        return 2
    except ScrapeError as exc:
        print(f"grokstack cost: {exc}", file=sys.stderr)
        return 1
    try:
        print("\n".join(lines))
    except BrokenPipeError:  # `grokstack cost | head`: the reader has what it wanted
        sys.stderr.close()
    return 0
