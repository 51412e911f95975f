"""The security drill tells a refused attack from one that got through: the same attack reads
REFUSED against the stack as configured and NOT REFUSED (exit 1) when its guard is off, here the
websocket Origin allow-list opened to every origin. The drill runs its own stack (simulated
engines, real nats-server and Redis-compatible server, separate processes), so this takes
a stack start per run; the attacks themselves are the pipeline suite's business."""

from __future__ import annotations

import argparse
import re

import pytest

from services.lab.security_drill import run_security_drill
from services.settings import Settings

ORIGIN = "websocket from a foreign Origin"


def drill(settings: Settings, capsys: pytest.CaptureFixture, *only: str) -> tuple[int, dict[str, str]]:
    code = run_security_drill(settings, argparse.Namespace(only=list(only), workdir=None))
    lines = capsys.readouterr().out.splitlines()
    verdicts = [re.match(r"^(.*?) +((?:NOT )?REFUSED .*)$", line) for line in lines if "| others served:" in line]
    return code, {m[1]: m[2] for m in verdicts if m} | {
        "summary": next(line for line in lines if line.startswith("attacks refused"))}


def test_origin_check_refused_and_not(tmp_path, capsys):
    settings = Settings(data_dir=tmp_path)
    code, lines = drill(settings, capsys, "origin", "public")
    assert lines[ORIGIN].split()[0] == "REFUSED", lines[ORIGIN]
    assert "foreign origin: 403" in lines[ORIGIN]
    assert lines["GET /metrics on the API port"].split()[0] == "REFUSED"
    assert "others served: yes" in lines[ORIGIN]
    assert lines["summary"].startswith("attacks refused 3/3; others served throughout: yes"), lines["summary"]
    assert code == 0

    # The guard off: every origin allowed. The drill must see the hole, and fail.
    code, lines = drill(settings.replace(allowed_origins="*"), capsys, "origin")
    assert lines[ORIGIN].split()[:2] == ["NOT", "REFUSED"], lines[ORIGIN]
    assert "foreign origin: opened" in lines[ORIGIN]
    assert lines["summary"].startswith("attacks refused 0/1"), lines["summary"]
    assert code == 1
