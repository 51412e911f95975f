"""The KV store's settings: where Redis is, and how KV blocks are named and kept there."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from bus.section import Section


class KvConfig(Section):
    # redis://user:password@host:6379/0, rediss:// for TLS (rediss://user:password@host:6380/0?
    # ssl_ca_certs=ca.pem); "" means: `grokstack up` starts an embedded server
    redis_url: str = ""
    kv_ttl_s: Annotated[int, Field(ge=1)] = 3600  # a block's lifetime since it was last written or read
    # The first part of every key (`<prefix>:blk:...`); a Redis ACL can confine the stack to it.
    kv_key_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")] = "gskv"
    # Besides full blocks, the block being filled is saved each time this many more of its tokens
    # are computed (as a whole block: a partial save costs a full block's bytes), so a decode job,
    # a migrated one or a conversation's next turn recomputes fewer than this many tokens of its
    # last block instead of up to a whole block; 0 saves full blocks only.
    kv_partial_step: Annotated[int, Field(ge=0)] = 16
