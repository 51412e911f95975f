"""The metrics module: what each observation adds, exemplars in OpenMetrics, the edge's per-request
observations, vLLM's scheduler stats, and the Grafana dashboard naming only metrics that exist."""

from __future__ import annotations

import json
import re
import urllib.request
import uuid
from pathlib import Path

import pytest
from prometheus_client.metrics import MetricWrapperBase

from bus.messages import (ChatMessage, ChatRequest, Cost, ErrorEvent, FinalEvent, KvTransfer, PrefillStats,
                          SamplingSpec, Timings, TokenEvent, Usage)
from edge.live import LiveRequest
from bus import metrics as bus_metrics
from edge import metrics as edge_metrics
from inference import metrics as worker_metrics
from services import telemetry
from services.telemetry import REGISTRY

DASHBOARD = Path(__file__).resolve().parents[2] / "infra" / "grafana" / "grokstack.json"


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Delta:
    """Samples before and after a block: `d = Delta(); ...; d("name", label=...)`."""

    def __init__(self) -> None:
        self._before = {(s.name, tuple(sorted(s.labels.items()))): s.value
                        for m in REGISTRY.collect() for s in m.samples}

    def __call__(self, name: str, **labels: str) -> float:
        return value(name, **labels) - self._before.get((name, tuple(sorted(labels.items()))), 0.0)


def region() -> str:
    return "r" + uuid.uuid4().hex[:8]  # a label value of this test's own


def test_a_frame_of_n_tokens_after_a_gap_counts_n_gaps_of_a_nth():
    r, d = region(), Delta()
    edge_metrics.observe_token_gap(r, "standard", 0.3, 3, "req-1")
    edge_metrics.observe_token_gap(r, "standard", 0.05, 0, "req-1")  # a frame without token ids: one gap
    name = "grokstack_inter_token_latency_seconds"
    assert d(f"{name}_count", region=r, priority="standard") == 4
    assert d(f"{name}_sum", region=r, priority="standard") == pytest.approx(0.35)
    assert d(f"{name}_bucket", region=r, priority="standard", le="0.1") == 4  # each 0.1 s, not 0.3 s


def test_histograms_carry_the_request_id_as_an_exemplar_in_openmetrics_only():
    r = region()
    edge_metrics.observe_first_token(r, "interactive", 0.42, "req-exemplar-1")
    body, content_type = telemetry.exposition("application/openmetrics-text; version=1.0.0; charset=utf-8")
    assert content_type.startswith("application/openmetrics-text")
    lines = [line for line in body.decode().splitlines() if f'region="{r}"' in line and "_bucket" in line]
    assert any('# {request_id="req-exemplar-1"} 0.42' in line and 'le="0.5"' in line for line in lines), lines
    classic, classic_type = telemetry.exposition("text/plain")
    assert classic_type.startswith("text/plain") and b"req-exemplar-1" not in classic
    assert telemetry.exposition("")[1].startswith("text/plain")  # no Accept header: the classic format


def test_a_worker_metrics_server_negotiates_the_format():
    port = telemetry.serve_metrics("127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        plain = urllib.request.urlopen(url, timeout=5)
        assert plain.headers["Content-Type"].startswith("text/plain")
        assert b"grokstack_jobs_total" in plain.read()
        om = urllib.request.urlopen(urllib.request.Request(
            url, headers={"Accept": "application/openmetrics-text; version=1.0.0"}), timeout=5)
        assert om.headers["Content-Type"].startswith("application/openmetrics-text")
        assert om.read().rstrip().endswith(b"# EOF")
    finally:
        telemetry.stop_serving(port)


def stats(**kw) -> PrefillStats:
    base = dict(worker_id="w", queue_ms=30.0, prefill_ms=200.0, cached_tokens=64, done_at=0.0,
                kv_bytes_written=4096, kv_write_ms=5.0, gpu_s=0.2)
    return PrefillStats(**{**base, **kw})


def final(**kw) -> FinalEvent:
    base = dict(request_id="req-f", seq=9, finish_reason="stop",
                usage=Usage(prompt_tokens=100, cached_prompt_tokens=64, completion_tokens=8),
                timings=Timings(queue_ms=30.0, prefill_ms=200.0, decode_queue_ms=12.0, decode_ms=800.0),
                kv=KvTransfer(bytes_written=4096, write_ms=5.0, bytes_read=4096, read_ms=3.0, loaded_tokens=96),
                cost=Cost(prefill_gpu_s=0.2, decode_gpu_s=0.6, usd=0.0008))
    return FinalEvent(**{**base, **kw})


def test_prefill_books_its_stage():
    d = Delta()
    worker_metrics.observe_prefill("batch", "req-p", stats(), 100, usd=0.0002)
    assert d("grokstack_request_queue_time_seconds_count", stage="prefill", priority="batch") == 1
    assert d("grokstack_request_queue_time_seconds_sum", stage="prefill", priority="batch") == pytest.approx(0.03)
    assert d("grokstack_request_prefill_time_seconds_sum", priority="batch") == pytest.approx(0.2)
    assert d("grokstack_kv_transfer_bytes_total", direction="write") == 4096
    assert d("grokstack_kv_transfer_seconds_count", direction="write") == 1
    assert d("grokstack_kv_cache_query_tokens_total", stage="prefill") == 100
    assert d("grokstack_kv_cache_hit_tokens_total", stage="prefill") == 64
    assert d("grokstack_prompt_tokens_total", role="prefill") == 100
    assert d("grokstack_gpu_seconds_total", role="prefill") == pytest.approx(0.2)
    assert d("grokstack_cost_usd_total", role="prefill") == pytest.approx(0.0002)


def test_decode_books_only_its_own_stage_and_share_of_the_cost():
    d = Delta()
    worker_metrics.observe_final("decode", "batch", final())
    assert d("grokstack_request_queue_time_seconds_sum", stage="decode", priority="batch") == pytest.approx(0.012)
    assert d("grokstack_request_queue_time_seconds_count", stage="prefill", priority="batch") == 0
    assert d("grokstack_generation_tokens_total", role="decode") == 8
    assert d("grokstack_prompt_tokens_total", role="decode") == 0  # prefill counted the prompt
    assert d("grokstack_kv_transfer_bytes_total", direction="read") == 4096
    assert d("grokstack_kv_transfer_bytes_total", direction="write") == 0  # prefill's, not counted again
    assert d("grokstack_kv_cache_query_tokens_total", stage="decode") == 96
    assert d("grokstack_kv_cache_hit_tokens_total", stage="decode") == 96
    assert d("grokstack_kv_recomputes_total") == 0
    assert d("grokstack_gpu_seconds_total", role="decode") == pytest.approx(0.6)
    assert d("grokstack_cost_usd_total", role="decode") == pytest.approx(0.0006)  # 3/4 of the price


def test_a_decode_recompute_counts_the_handle_as_missed():
    d = Delta()
    worker_metrics.observe_final("decode", "standard", final(kv=KvTransfer(recomputed=True, reason="evicted")),
                          handle_tokens=96)
    assert d("grokstack_kv_recomputes_total") == 1
    assert d("grokstack_kv_cache_query_tokens_total", stage="decode") == 96
    assert d("grokstack_kv_cache_hit_tokens_total", stage="decode") == 0


def test_an_aggregated_worker_books_both_stages():
    d = Delta()
    worker_metrics.observe_final("aggregated", "interactive", final(kv=KvTransfer(bytes_written=2048, write_ms=1.0)))
    assert d("grokstack_request_queue_time_seconds_count", stage="prefill", priority="interactive") == 1
    assert d("grokstack_request_queue_time_seconds_count", stage="decode", priority="interactive") == 0
    assert d("grokstack_request_prefill_time_seconds_count", priority="interactive") == 1
    assert d("grokstack_prompt_tokens_total", role="aggregated") == 100
    assert d("grokstack_generation_tokens_total", role="aggregated") == 8
    assert d("grokstack_kv_cache_hit_tokens_total", stage="prefill") == 64
    assert d("grokstack_kv_transfer_bytes_total", direction="write") == 2048
    assert d("grokstack_gpu_seconds_total", role="aggregated") == pytest.approx(0.8)
    assert d("grokstack_cost_usd_total", role="aggregated") == pytest.approx(0.0008)


def test_worker_gauges_and_counters():
    d = Delta()
    worker_metrics.observe_job("decode", "served")
    worker_metrics.add_busy_seconds("decode", 1.5)
    worker_metrics.set_worker_budget("decode", 8192, 1000)
    bus_metrics.count_dead_letter("req")
    edge_metrics.observe_refused("overloaded", "batch")
    assert d("grokstack_jobs_total", role="decode", outcome="served") == 1
    assert d("grokstack_worker_busy_seconds_total", role="decode") == 1.5
    assert value("grokstack_worker_budget_tokens", role="decode") == 8192
    assert value("grokstack_worker_reserved_tokens", role="decode") == 1000
    assert d("grokstack_dead_letters_total", kind="req") == 1
    assert d("grokstack_requests_refused_total", priority="batch", reason="overloaded") == 1
    r = region()
    edge_metrics.set_queue_depth("req", r, "batch", 7)
    edge_metrics.set_queue_wait(r, "batch", 2.5)
    assert value("grokstack_queue_depth", kind="req", region=r, priority="batch") == 7
    assert value("grokstack_queue_wait_estimate_seconds", region=r, priority="batch") == 2.5


# ---------------------------------------------------------------------------- the edge

class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def chat(r: str) -> ChatRequest:
    return ChatRequest(request_id="req-live", region=r, priority="interactive",
                       messages=[ChatMessage(role="user", content="hi")], sampling=SamplingSpec(max_tokens=8),
                       reply_to="gs.evt.e.req-live")


def tok(seq: int, n: int = 1) -> TokenEvent:
    return TokenEvent(request_id="req-live", seq=seq, text="x" * n, token_ids=list(range(n)))


def test_a_live_request_observes_ttft_itl_e2e_and_tokens(monkeypatch):
    clock, r, d = Clock(), region(), Delta()
    monkeypatch.setattr("edge.live.time.monotonic", clock)
    live = LiveRequest(chat(r), "public", started=clock.now)
    labels = {"region": r, "priority": "interactive"}
    for step, event in ((0.25, tok(0)), (0.1, tok(1)), (0.3, tok(2, 3)),
                        (0.05, final(request_id="req-live", seq=3, finish_reason="length"))):
        clock.now += step
        live.append(event)
    assert d("grokstack_time_to_first_token_seconds_count", **labels) == 1
    assert d("grokstack_time_to_first_token_seconds_sum", **labels) == pytest.approx(0.25)
    assert d("grokstack_inter_token_latency_seconds_count", **labels) == 4  # 1 + 3
    assert d("grokstack_inter_token_latency_seconds_sum", **labels) == pytest.approx(0.4)
    assert d("grokstack_e2e_request_latency_seconds_sum", **labels, outcome="length") == pytest.approx(0.7)
    assert d("grokstack_edge_prompt_tokens_total", **labels) == 100
    assert d("grokstack_edge_generation_tokens_total", **labels) == 8
    live.append(tok(4))  # after the end: ignored
    assert d("grokstack_inter_token_latency_seconds_count", **labels) == 4


def test_an_error_ends_with_its_code_and_an_adopted_request_is_not_timed(monkeypatch):
    clock, r, d = Clock(), region(), Delta()
    monkeypatch.setattr("edge.live.time.monotonic", clock)
    live = LiveRequest(chat(r), "public", started=clock.now - 5, timed=False)  # adopted: replayed burst
    live.append(tok(0))
    live.append(tok(1))
    live.end("cancelled", "cancelled by the client")
    labels = {"region": r, "priority": "interactive"}
    assert d("grokstack_time_to_first_token_seconds_count", **labels) == 0
    assert d("grokstack_inter_token_latency_seconds_count", **labels) == 0
    assert d("grokstack_e2e_request_latency_seconds_sum", **labels, outcome="cancelled") == pytest.approx(5)
    assert isinstance(live.events[-1], ErrorEvent)


# ---------------------------------------------------------------------------- vLLM

def test_vllm_scheduler_stats_feed_spec_decoding_and_kv_usage():
    pytest.importorskip("vllm")
    from vllm.v1.metrics.stats import SchedulerStats
    from vllm.v1.spec_decode.metrics import SpecDecodingStats

    from inference.vllm_stats import stat_loggers

    logger = stat_loggers("decode")[0](None, 0)  # as vLLM calls a per-engine factory
    spec = SpecDecodingStats.new(5)
    spec.observe_draft(num_draft_tokens=5, num_accepted_tokens=3)
    spec.observe_draft(num_draft_tokens=5, num_accepted_tokens=5)
    d = Delta()
    logger.record(SchedulerStats(kv_cache_usage=0.25, spec_decoding_stats=spec), None)
    logger.record(SchedulerStats(kv_cache_usage=0.5), None)  # a step without drafts
    logger.record(None, None)
    assert d("grokstack_spec_decode_drafts_total", role="decode") == 2
    assert d("grokstack_spec_decode_draft_tokens_total", role="decode") == 10
    assert d("grokstack_spec_decode_accepted_tokens_total", role="decode") == 8
    assert value("grokstack_kv_cache_usage_ratio", role="decode") == 0.5


# ---------------------------------------------------------------------------- the dashboard

SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def defined_samples() -> set[str]:
    """Every sample name the metrics the packages declare expose."""
    names: set[str] = set()
    for attr in [a for module in (bus_metrics, edge_metrics, worker_metrics) for a in vars(module).values()]:
        if isinstance(attr, MetricWrapperBase):
            for family in attr.describe():
                names |= {family.name + suffix for suffix in SUFFIXES[family.type]}
    return names


def dashboard_queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in board["panels"] for t in panel.get("targets", [])]
    exprs += [v["definition"] for v in board["templating"]["list"]]
    return exprs


def test_every_metric_the_dashboard_queries_is_defined():
    defined = defined_samples()
    assert "grokstack_time_to_first_token_seconds_bucket" in defined and "grokstack_jobs_total" in defined
    exprs = dashboard_queries()
    used = {name for expr in exprs for name in re.findall(r"\bgrokstack_[a-z0-9_]+", expr)}
    assert len(used) >= 25, used
    assert used <= defined, sorted(used - defined)


def test_the_dashboard_is_importable_grafana_json():
    board = json.loads(DASHBOARD.read_text())
    assert board["__inputs"][0]["name"] == "DS_PROMETHEUS"
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert all(p["datasource"]["uid"] == "${DS_PROMETHEUS}" for p in panels)
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    for expr in dashboard_queries():  # no promtool here: at least brackets balance
        for open_, close in ("()", "{}", "[]"):
            assert expr.count(open_) == expr.count(close), expr
    titles = " ".join(p["title"] for p in panels).lower()
    for topic in ("time to first token", "inter-token", "end-to-end", "queue depth", "queue wait", "refused",
                  "tokens in / out", "kv bytes", "kv transfer", "hits / misses", "recomputes", "acceptance",
                  "active streams", "dead letters", "gpu-seconds", "per 1m tokens", "by status and error type",
                  "answer length", "migrations", "vllm requests running"):
        assert topic in titles, topic


README = Path(__file__).resolve().parents[2] / "README.md"


def documented_families() -> dict[str, tuple[str, ...]]:
    """The README's metrics table: each family named in a row, with the row's labels."""
    section = README.read_text().split("## Metrics and dashboards", 1)[1].split("\n## ", 1)[0]
    out: dict[str, tuple[str, ...]] = {}
    for row in section.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`grokstack_"):
            continue
        labels = tuple(label.strip() for label in cells[2].split(",") if label.strip())
        for name in re.findall(r"`(grokstack_[a-z0-9_]+)`", cells[0]):
            out[name] = labels
    return out


def defined_families() -> dict[str, tuple[str, ...]]:
    out = {}
    for module in (bus_metrics, edge_metrics, worker_metrics):
        for metric in vars(module).values():
            if isinstance(metric, MetricWrapperBase):
                suffix = "_total" if metric._type == "counter" else ""
                out[metric._name + suffix] = tuple(metric._labelnames)
    return out


def test_every_documented_family_exists_with_its_labels_and_every_family_is_documented():
    documented, defined = documented_families(), defined_families()
    assert len(documented) >= 45, documented
    assert documented == defined, {name: (documented.get(name), defined.get(name))
                                   for name in documented.keys() | defined.keys()
                                   if documented.get(name) != defined.get(name)}


def test_a_scrape_names_the_served_model_on_every_sample_and_vllms_metrics_are_served_apart():
    import prometheus_client

    telemetry.set_model_name("Some-Model-8B")
    edge_metrics.observe_request("openai", 400, "invalid_request")
    name = f"vllm:test_requests_waiting_{uuid.uuid4().hex[:8]}"
    waiting = prometheus_client.Gauge(name, "a stand-in for one of vLLM's", ["model_name"])
    waiting.labels("Some-Model-8B").set(3)
    port = telemetry.serve_metrics("127.0.0.1", 0)
    try:
        ours = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        samples = [line for line in ours.splitlines() if line and not line.startswith("#")]
        assert samples and all('model_name="Some-Model-8B"' in line for line in samples), \
            [line for line in samples if "model_name" not in line][:3]
        counted = [dict(re.findall(r'(\w+)="([^"]*)"', line)) for line in samples
                   if line.startswith("grokstack_requests_total{")]
        assert {"api": "openai", "status": "400", "error_type": "invalid_request",
                "model_name": "Some-Model-8B"} in counted, counted
        assert "vllm:" not in ours
        vllm = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics/vllm", timeout=5)
        text = vllm.read().decode()
        assert vllm.headers["Content-Type"].startswith("text/plain")
        assert f'{name}{{model_name="Some-Model-8B"}} 3.0' in text
        assert all(line.startswith(("# HELP vllm:", "# TYPE vllm:", "vllm:")) for line in text.splitlines() if line)
    finally:
        telemetry.stop_serving(port)
        prometheus_client.REGISTRY.unregister(waiting)
        telemetry.set_model_name("")
