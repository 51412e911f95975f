"""Server-sent events as a client reads them: fields gathered until a blank line, in any order
(the edge writes `data:` first, then `id:`)."""

from __future__ import annotations

from typing import AsyncIterator

import aiohttp


async def sse(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[int | None, str]]:
    """(id, data) of each event, as it ends."""
    event_id: int | None = None
    data: list[str] = []
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if data:
                yield event_id, "\n".join(data)
            event_id, data = None, []
        elif line.startswith("id:"):
            event_id = int(line[3:].strip())
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        yield event_id, "\n".join(data)
