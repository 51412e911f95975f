"""The Redis ACL rule of the stack's user: the keys under its prefix, the commands it sends.

The stack's Redis holds nothing but KV blocks and transfer records, written and read by
`block_store.py` and `transfers.py`; a leaked password should give no more than that. So the
user may touch only keys `<kv_key_prefix>:*`, may not use pub/sub (no channels), scripting
(EVAL, FUNCTION, SCRIPT) or any admin command, and may run only the commands below. The
embedded server (services/embedded.py) and the production example (infra/redis/users.acl) use
this rule; tests/pipeline/test_redis_acl.py checks both against a real server.

Adding a Redis command to kv_store means adding it here, or the server refuses it (NOPERM).
"""

from __future__ import annotations

import re

STACK_COMMANDS = (
    # block_store.py: lookups, loads, saves and transfer records
    "exists", "getex", "set", "hincrby", "hincrbyfloat", "expire",
    # transfers.py: the workers read transfer records, and check the server at start
    "hgetall", "ping",
    # redis-py on connecting (AUTH and HELLO need no rule): it names itself (CLIENT SETINFO)
    # and switches to the URL's database if that is not 0 (SELECT).
    "client|setinfo", "select",
)

# kv_store/config.py's pattern for the prefix: none of these characters means anything in an
# ACL key pattern, so `~<prefix>:*` matches the prefix literally.
_PREFIX = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


def acl_rule(key_prefix: str) -> str:
    """The permissions of the stack's user (after `user <name> on ><password>`)."""
    if not _PREFIX.match(key_prefix):
        raise ValueError(f"kv key prefix {key_prefix!r} must be 1-64 of A-Z a-z 0-9 _ . : -")
    return f"resetkeys ~{key_prefix}:* resetchannels -@all " + " ".join(f"+{c}" for c in STACK_COMMANDS)
