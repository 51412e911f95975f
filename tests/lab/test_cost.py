"""`grokstack cost`: the $/1M tokens math on worked examples computed by hand, speculative
decoding's edge cases, the metrics parser, and bad input as a message with exit code 2."""

import http.server
import threading
import time

import pytest

from services.cli import main
from services.lab.cost import (CostModel, Speculation, alpha_from_rate, blended_price, draft_acceptance_rate,
                           input_price, num, output_price, tokens_per_step)
from services.lab.cost_metrics import Scrape, computed_prompt_tokens, difference, parse_metrics, report_lines, total, \
    totals_scrape, window_scrapes
from services.settings import Settings

# Worked by hand: $3/h x 1 GPU = 3/3600 = 1/1200 $/s.
#   input:  10,000 tok/s x 0.5 = 5,000 tok/s;  (1/1200) / 5,000 x 1e6 = 1e6 / 6e6 = 1/6 $
#   output: k=3, alpha=0.5: (1 - 0.5^4) / 0.5 = 1.875 tokens per step; / 1.25 overhead = x1.5;
#           2,000 x 1.5 = 3,000 tok/s x 0.5 = 1,500;  (1/1200) / 1,500 x 1e6 = 1e6 / 1.8e6 = 5/9 $
#   blend 3:1: (3 x 1/6 + 5/9) / 4 = (1/2 + 5/9) / 4 = 19/72 $
WORKED = ["--gpu-price-per-hour", "3", "--gpus-per-worker", "1", "--prefill-tok-s", "10000",
          "--decode-tok-s", "2000", "--batch", "16", "--utilization", "0.5", "--spec-acceptance", "0.5",
          "--spec-tokens", "3", "--spec-overhead", "1.25", "--io-ratio", "3:1"]


def test_worked_example_by_hand():
    model = CostModel(3.0, 1.0, 10_000, 2_000, 0.5, 0.5, 16, Speculation(0.5, 3, 1.25), (3, 1))
    assert input_price(model) == pytest.approx(1 / 6)
    assert output_price(model) == pytest.approx(5 / 9)
    assert blended_price(1 / 6, 5 / 9, (3, 1)) == pytest.approx(19 / 72)


def test_the_command_prints_every_step_of_the_worked_example(capsys):
    assert main(["cost", *WORKED]) == 0
    out = capsys.readouterr().out
    assert "$3.00 per GPU-hour x 1 GPU / 3600 s = $0.0008333 per second" in out
    assert "10,000 prompt tok/s x utilization 0.5 = 5,000 tok/s" in out
    assert "$/1M input  = $0.0008333 / 5,000 x 1e6 = $0.1667" in out
    assert "2,000 output tok/s in total over a batch of 16 (125 tok/s per sequence)" in out
    assert "(1 - 0.5^4) / (1 - 0.5) = 1.875" in out and "x1.5" in out
    assert "$/1M output = $0.0008333 / 1,500 x 1e6 = $0.5556" in out
    assert "(3 x $0.1667 + 1 x $0.5556) / 4 = $0.2639 per 1M tokens" in out  # 19/72


def test_more_gpus_per_replica_cost_proportionally_more(capsys):
    assert main(["cost", "--decode-tok-s", "1000", "--gpus", "2", "--utilization", "1"]) == 0
    # $3 x 2 / 3600 = 1/600 $/s over 1,000 tok/s: 1e6 / 600,000 = $1.67 per 1M
    assert "= $1.67" in capsys.readouterr().out


@pytest.mark.parametrize("k", [1, 3, 5, 8])
def test_speculation_edge_cases(k):
    assert tokens_per_step(0.0, k) == 1.0  # nothing accepted: the target's own token only
    assert tokens_per_step(1.0, k) == k + 1  # everything accepted, plus the target's token
    assert tokens_per_step(1 - 1e-9, k) == pytest.approx(k + 1, rel=1e-6)  # the limit is continuous
    assert draft_acceptance_rate(0.0, k) == 0.0 and draft_acceptance_rate(1.0, k) == 1.0


def test_the_acceptance_rate_converts_to_alpha_and_back():
    # alpha = 0.5, k = 3: accepted 0.5 + 0.25 + 0.125 = 0.875 of 3 drafts -> rate 0.2917
    assert draft_acceptance_rate(0.5, 3) == pytest.approx(0.875 / 3)
    assert alpha_from_rate(0.875 / 3, 3) == pytest.approx(0.5)
    # tokens per step is 1 + k x rate whatever alpha is: 1 + 5 x 0.69 = 4.45
    assert tokens_per_step(alpha_from_rate(0.69, 5), 5) == pytest.approx(4.45)


def test_numbers_read_like_a_worked_example():
    assert [num(65086.0), num(0.6), num(1 / 1200), num(4.0), num(2.0 / 3)] == \
        ["65,086", "0.6", "0.0008333", "4", "0.6667"]


@pytest.mark.parametrize("argv, message", [
    (["--prefill-tok-s", "-5"], "prefill throughput (tok/s) must be a positive number"),
    (["--decode-tok-s", "0"], "decode throughput (tok/s) must be a positive number"),
    ([], "give --prefill-tok-s and/or --decode-tok-s"),
    (["--decode-tok-s", "10", "--utilization", "1.5"], "--utilization must be in (0, 1]"),
    (["--decode-tok-s", "10", "--gpu-price-per-hour", "-3"], "GROKSTACK_GPU_PRICE_PER_HOUR (--gpu-price-per-hour)"),
    (["--decode-tok-s", "10", "--io-ratio", "3-1"], "--io-ratio takes INPUT:OUTPUT"),
    (["--decode-tok-s", "10", "--spec-acceptance", "1.2"], "--spec-acceptance must be in [0, 1]"),
    (["--decode-tok-s", "10", "--spec-acceptance", "0.5", "--spec-tokens", "0"],
     "GROKSTACK_SPEC_TOKENS (--spec-tokens)"),
    (["--decode-tok-s", "10", "--batch", "0"], "batch size must be at least 1"),
])
def test_bad_input_is_a_message_and_exit_code_2(capsys, argv, message):
    assert main(["cost", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("grokstack cost: ") and message in err and "Traceback" not in err


# ------------------------------------------------------------------------ measured from metrics

PREFILL_WORKER = """\
# HELP grokstack_gpu_seconds_total Accelerator-seconds attributed to requests.
# TYPE grokstack_gpu_seconds_total counter
grokstack_gpu_seconds_total{role="prefill"} 50.0
grokstack_gpu_seconds_created{role="prefill"} 1.7e9
# TYPE grokstack_worker_busy_seconds_total counter
grokstack_worker_busy_seconds_total{role="prefill"} 60.0
# TYPE grokstack_prompt_tokens_total counter
grokstack_prompt_tokens_total{role="prefill"} 600000.0
# TYPE grokstack_kv_cache_hit_tokens_total counter
grokstack_kv_cache_hit_tokens_total{stage="prefill"} 100000.0
# TYPE grokstack_generation_tokens_total counter
grokstack_generation_tokens_total{role="prefill"} 1000.0
# TYPE grokstack_cost_usd_total counter
grokstack_cost_usd_total{role="prefill"} 0.05
"""
DECODE_WORKER = """\
# TYPE grokstack_gpu_seconds_total counter
grokstack_gpu_seconds_total{role="decode"} 400.0
# TYPE grokstack_worker_busy_seconds_total counter
grokstack_worker_busy_seconds_total{role="decode"} 500.0
# TYPE grokstack_generation_tokens_total counter
grokstack_generation_tokens_total{role="decode"} 800000.0
# TYPE grokstack_spec_decode_draft_tokens_total counter
grokstack_spec_decode_draft_tokens_total 1000.0
# TYPE grokstack_spec_decode_accepted_tokens_total counter
grokstack_spec_decode_accepted_tokens_total 690.0
# TYPE grokstack_cost_usd_total counter
grokstack_cost_usd_total{role="decode"} 0.3
"""


def test_the_parser_reads_prometheus_text_by_sample_name_and_labels():
    samples = parse_metrics(PREFILL_WORKER)
    assert samples[("grokstack_gpu_seconds_total", frozenset({("role", "prefill")}))] == 50.0
    scrape = Scrape("u", samples, None)
    assert total([scrape], "grokstack_kv_cache_hit_tokens_total", stage="prefill") == 100_000
    assert total([scrape], "grokstack_gpu_seconds_total", role="decode") == 0.0
    assert total([scrape, Scrape("v", parse_metrics(DECODE_WORKER), None)], "grokstack_cost_usd_total") == \
        pytest.approx(0.35)


def test_measured_figures_by_hand():
    # Each worker up 1,000 s at $3/h x 1 GPU = $0.8333 of GPU time.
    #   prefill: 600,000 - 100,000 cached = 500,000 computed in 50 GPU-s = 10,000 tok/s;
    #            utilization 50 / 1,000 = 0.05; $/1M input = 0.8333 / 500,000 x 1e6 = $1.67
    #   decode:  800,000 in 400 GPU-s = 2,000 tok/s; utilization 0.4; 0.8333 / 800,000 x 1e6 = $1.04
    #   blend 3:1: (3 x 5/3 + 25/24) / 4 = $1.51
    #   spent: $0.35 / (600,000 + 801,000 tokens) x 1e6 = $0.2498
    scrapes = [Scrape("p", parse_metrics(PREFILL_WORKER), 1000.0), Scrape("d", parse_metrics(DECODE_WORKER), 1000.0)]
    out = "\n".join(report_lines(Settings(spec_tokens=5), scrapes, (3, 1), None, "since each process started"))
    assert "500,000 / 50 GPU-s x 1 GPU per replica = 10,000 tok/s per replica" in out
    assert "utilization = 50 / (1 x 1,000) = 0.05" in out
    assert "800,000 / 400 GPU-s x 1 GPU per replica = 2,000 tok/s per replica" in out
    assert "utilization = 400 / (1 x 1,000) = 0.4" in out
    assert "$/1M input  = $0.0008333 / 500 x 1e6 = $1.67" in out
    assert "$/1M output = $0.0008333 / 800 x 1e6 = $1.04" in out
    assert "= $1.51 per 1M tokens" in out
    # no drafts counter in the sample: k is the setting; 1 + 5 x 0.69 = 4.45 tokens per step
    assert "690 of 1,000 drafted tokens accepted = 0.69; k = 5 (GROKSTACK_SPEC_TOKENS), so alpha = 0.8788; " \
           "tokens per verification step = 4.45" in out
    assert "$0.35 / (600,000 prompt + 801,000 generated tokens) x 1e6 = $0.2498 per 1M tokens" in out
    assert "prefill: $0.05 / 600,000 prompt tokens x 1e6 = $0.08333 per 1M" in out
    assert "decode: $0.3 / 800,000 generated tokens x 1e6 = $0.375 per 1M" in out


def test_without_uptime_utilization_counts_busy_time_and_says_so():
    out = "\n".join(report_lines(Settings(), [Scrape("d", parse_metrics(DECODE_WORKER), None)], (3, 1), None, "x"))
    assert "500 s busy (uptime unknown: idle time not counted)" in out
    assert "utilization = 400 / (1 x 500) = 0.8" in out


def test_metrics_without_grokstack_counters_are_a_clear_error(capsys):
    with pytest.raises(ValueError, match="no grokstack_gpu_seconds_total"):
        report_lines(Settings(), [Scrape("e", parse_metrics("# TYPE x gauge\nx 1\n"), None)], (3, 1), None, "x")


def test_a_counter_that_went_down_restarted_and_counts_from_zero():
    key = ("c_total", frozenset())
    assert difference({key: 10.0}, {key: 15.0}) == {key: 5.0}
    assert difference({key: 10.0}, {key: 3.0}) == {key: 3.0}


class _Metrics(http.server.BaseHTTPRequestHandler):
    bodies: list[str] = []

    def do_GET(self):  # noqa: N802 (the stdlib's name)
        body = (self.bodies.pop(0) if len(self.bodies) > 1 else self.bodies[0]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def metrics_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    server.shutdown()
    server.server_close()


def test_totals_use_the_process_uptime(metrics_server):
    _Metrics.bodies = [DECODE_WORKER + f"# TYPE process_start_time_seconds gauge\n"
                                       f"process_start_time_seconds {time.time() - 100}\n"]
    scrape = totals_scrape(metrics_server)
    assert scrape.wall_s == pytest.approx(100, abs=5)


def test_a_window_uses_the_difference_of_two_scrapes(metrics_server):
    later = DECODE_WORKER.replace("} 400.0", "} 410.0").replace("} 800000.0", "} 820000.0")
    _Metrics.bodies = [DECODE_WORKER, later]
    [scrape] = window_scrapes([metrics_server], 0.05)
    assert total([scrape], "grokstack_gpu_seconds_total", role="decode") == pytest.approx(10)
    assert total([scrape], "grokstack_generation_tokens_total", role="decode") == pytest.approx(20_000)
    assert scrape.wall_s == pytest.approx(0.05, abs=0.5)


def test_an_unreachable_metrics_url_is_exit_code_1(capsys):
    assert main(["cost", "--metrics", "http://127.0.0.1:9/metrics"]) == 1
    assert "cannot read http://127.0.0.1:9/metrics" in capsys.readouterr().err


def test_cache_hits_of_a_process_running_prefill_and_aggregated_workers_are_shared():
    # Both roles count their hits as stage "prefill": 300 hits over 600 + 300 prompt tokens
    # -> 200 belong to prefill (600 - 200 = 400 computed), 100 to aggregated (300 - 100 = 200).
    text = ('grokstack_prompt_tokens_total{role="prefill"} 600\n'
            'grokstack_prompt_tokens_total{role="aggregated"} 300\n'
            'grokstack_kv_cache_hit_tokens_total{stage="prefill"} 300\n')
    scrapes = [Scrape("both", parse_metrics(text), None)]
    assert computed_prompt_tokens(scrapes, "prefill") == pytest.approx(400)
    assert computed_prompt_tokens(scrapes, "aggregated") == pytest.approx(200)


def test_tokens_per_step_come_from_the_drafts_counter_when_there_is_one():
    # 200 drafts of 4 tokens, 600 of 800 accepted: 1 + 600 / 200 = 4 tokens per step
    text = DECODE_WORKER.replace("_total 1000.0", "_total 800.0").replace("_total 690.0", "_total 600.0") + \
        '# TYPE grokstack_spec_decode_drafts_total counter\ngrokstack_spec_decode_drafts_total{role="decode"} 200\n'
    out = "\n".join(report_lines(Settings(), [Scrape("d", parse_metrics(text), 100.0)], (3, 1), None, "x"))
    assert "600 of 800 drafted tokens accepted = 0.75; k = 4 (drafted per step)" in out
    assert "tokens per verification step = 1 + 600 / 200 drafts = 4" in out


def test_the_metric_names_read_are_the_ones_the_stack_exports():
    """The contract with the metrics the packages declare: renaming a metric there breaks this."""
    from services.telemetry import REGISTRY

    import services.lab.cost_metrics as cm
    exported = {s.name for family in REGISTRY.collect() for s in family.samples} | \
        {family.name + "_total" for family in REGISTRY.collect() if family.type == "counter"}
    read = [cm.GPU_S, cm.BUSY_S, cm.PROMPT, cm.KV_HIT, cm.GENERATED, cm.DRAFTS, cm.DRAFT, cm.ACCEPTED, cm.COST]
    assert [name for name in read if name not in exported] == []


def test_an_idle_worker_counts_its_wall_time():
    # Two decode workers up 1,000 s each, one of them idle: utilization 400 / (1 x 2,000) = 0.2
    idle = '# TYPE grokstack_worker_budget_tokens gauge\ngrokstack_worker_budget_tokens{role="decode"} 4096\n'
    scrapes = [Scrape("d1", parse_metrics(DECODE_WORKER), 1000.0), Scrape("d2", parse_metrics(idle), 1000.0)]
    out = "\n".join(report_lines(Settings(), scrapes, (3, 1), None, "x"))
    assert "2 worker(s), 2,000 s up" in out and "utilization = 400 / (1 x 2,000) = 0.2" in out
