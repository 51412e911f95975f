"""`grokstack bench --spike --engine sim` end to end at a tiny scale: its own embedded servers, an
edge and simulated workers as processes, a few seconds per phase. Asserts the report's shape and
that nothing accepted was lost, not timings (this machine is shared and noisy)."""

from __future__ import annotations

import json

import psutil

from services.cli import build_parser, settings_from
from services.lab.spike_bench import run_spike
from bus.priorities import PRIORITIES
from services.supervisor import KEEPER


def running_children() -> set[psutil.Process]:
    """This process's descendants still running, but the supervisor's keeper (it lives as long as
    this process, and kills nothing unless this process dies without stopping its children)."""
    running = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and KEEPER not in p.cmdline():
                running.add(p)
        except psutil.NoSuchProcess:
            pass
    return running


CELL_KEYS = {"offered", "served", "refused", "retry_after_p50_s", "degraded", "lost", "retried",
             "ttft_p50_s", "ttft_p99_s"}


async def test_the_sim_spike_bench_reports_every_priority_and_phase_and_loses_nothing(tmp_path, capsys):
    report = tmp_path / "spike.json"
    args = build_parser().parse_args([
        "bench", "--spike", "--engine", "sim", "--steady-s", "2", "--spike-s", "2", "--rate", "2",
        "--spike-x", "5", "--prefill-workers", "2", "--decode-workers", "3", "--drain-s", "60",
        "--interactive-tokens", "8", "--standard-tokens", "16", "--batch-tokens", "24",
        "--json", str(report), "--log-level", "warning"])
    before = running_children()
    code = await run_spike(settings_from(args), args)
    out = capsys.readouterr().out
    # its servers, edge and worker hosts are stopped (a process of it would be a child of this one)
    assert running_children() <= before, [p.cmdline() for p in running_children() - before]

    assert code == 0, out
    assert "engine sim: SIMULATED fleet of 2 prefill + 3 decode workers" in out
    assert "calibration:" in out and "load: Poisson arrivals" in out and "goal: interactive p99 TTFT" in out
    assert "edge's estimated queue wait (admission's input), peak" in out  # read from the edge's /metrics
    assert "admission: estimated vs measured queue wait" in out and "refusal precision:" in out
    data = json.loads(report.read_text())
    assert data["engine"] == "sim" and data["lost"] == 0
    assert set(data["admission"]) == set(PRIORITIES)
    assert all(set(p) == {"refused", "judged", "over_any", "over_median", "audited", "audited_over"}
               for p in data["admission"].values())
    cells = data["cells"]
    assert set(cells) == set(PRIORITIES)
    for row in cells.values():
        assert set(row) == {"before", "during", "after", "all"}
        for c in row.values():
            assert set(c) == CELL_KEYS
            assert c["offered"] == c["served"] + c["refused"] + c["lost"]
            assert c["lost"] == 0
    offered = sum(cells[p]["all"]["offered"] for p in PRIORITIES)
    assert offered == sum(cells[p][ph]["offered"] for p in PRIORITIES for ph in ("before", "during", "after"))
    assert offered > 0 and sum(cells[p]["all"]["served"] for p in PRIORITIES) > 0
    assert set(data["goal"]) >= {"met", "steady_p99_s", "spike_p99_s", "ratio", "refused_during", "text"}
