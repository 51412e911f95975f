"""Processes that cannot reach NATS or Redis at start say so, with the URL, and exit non-zero."""

import subprocess
import sys

from services.embedded import free_port


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True,
                          text=True, timeout=60)


def test_edge_without_nats_exits_naming_the_url():
    url = f"nats://127.0.0.1:{free_port()}"
    result = run_cli("edge", "--nats-url", url)
    assert result.returncode != 0
    assert f"cannot connect to NATS at {url}" in result.stderr


def test_worker_without_redis_exits_naming_the_url(nats_url, nats_credentials):
    url = f"redis://127.0.0.1:{free_port()}/0"
    result = run_cli("prefill", "--nats-url", nats_url, "--nats-credentials", nats_credentials,
                     "--redis-url", url)
    assert result.returncode != 0
    assert f"cannot connect to Redis at {url}" in result.stderr


def test_worker_without_any_nats_url_explains_how_to_get_one():
    result = subprocess.run([sys.executable, "-m", "services.cli", "decode"], capture_output=True,
                            text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode != 0 and "NATS_URL is not set" in result.stderr


def test_a_region_that_would_break_subject_names_is_refused(nats_url):
    result = run_cli("edge", "--nats-url", nats_url, "--region", "eu.west")
    assert result.returncode == 2 and "GROKSTACK_REGION (--region)" in result.stderr and "'eu.west'" in result.stderr
