"""The Redis ACL rule of the stack's user (kv_store/acl.py): what it allows follows what kv_store
sends, and the production example ships the same rule. (tests/pipeline/test_redis_acl.py runs
it on a real server.)"""

from __future__ import annotations

import re

import pytest

from kv_store.acl import STACK_COMMANDS, acl_rule
from tests.conftest import REPO


def test_the_rule_confines_keys_channels_and_commands():
    rule = acl_rule("gskv")
    assert rule.startswith("resetkeys ~gskv:* resetchannels -@all ")
    assert "&" not in rule and "@all" not in rule.replace("-@all", "")  # no channel, no category granted
    for forbidden in ("eval", "function", "script", "publish", "subscribe", "keys", "scan", "flushall", "config"):
        assert f"+{forbidden}" not in rule.split()


@pytest.mark.parametrize("prefix", ["", "a*", "a b", "x?", "[ab]", "a" * 65])
def test_a_prefix_that_would_be_a_pattern_is_refused(prefix):
    with pytest.raises(ValueError, match="kv key prefix"):
        acl_rule(prefix)


def test_every_redis_command_kv_store_sends_is_allowed():
    """A command added to kv_store without adding it to the rule would be refused in production
    (NOPERM) while it may pass in a test against an open server: catch it here."""
    sent = set()
    for path in (REPO / "kv_store").glob("*.py"):
        sent |= set(re.findall(r"(?:pipe|self\._redis)\.(\w+)\(", path.read_text()))
    sent -= {"pipeline", "execute", "aclose", "close"}  # client methods, not commands
    assert sent and sent <= set(STACK_COMMANDS), sent - set(STACK_COMMANDS)


def test_the_production_acl_file_ships_the_same_rule():
    lines = (REPO / "infra/redis/users.acl").read_text().splitlines()
    users = [line for line in lines if line.startswith("user ")]
    assert "user default off" in users
    [stack] = [u for u in users if u.startswith("user grokstack ")]
    assert stack == f"user grokstack on >CHANGE-ME-to-a-long-random-password {acl_rule('gskv')}"
    assert "aclfile /etc/redis/users.acl" in (REPO / "infra/redis/valkey.conf").read_text().splitlines()
