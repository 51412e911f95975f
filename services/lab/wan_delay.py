"""Distance between regions on one machine: a TCP proxy that holds every chunk for a fixed time
in each direction before passing it on, in order. Placed in front of a region's gateway (the
peers' gateway URLs and the region's `advertise` point at it), it delays everything that enters
the region by `delay_ms`: one way `delay_ms`, a round trip twice that. Throughput is not limited,
only latency added.

    python -m services.lab.wan_delay --listen 17001 --to 17000 --delay-ms 20
"""

from __future__ import annotations

import argparse
import asyncio
import time

CHUNK = 64 * 1024


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def hold() -> None:
        while data := await reader.read(CHUNK):
            held.put_nowait((time.monotonic() + delay_s, data))
        held.put_nowait((0.0, b""))

    async def release() -> None:
        while True:
            due, data = await held.get()
            if not data:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()

    try:
        await asyncio.gather(hold(), release())
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def serve(listen_port: int, target_port: int, delay_s: float, host: str = "127.0.0.1") -> asyncio.Server:
    async def connected(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(host, target_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(_pipe(client_reader, server_writer, delay_s),
                             _pipe(server_reader, client_writer, delay_s), return_exceptions=True)

    return await asyncio.start_server(connected, host, listen_port)


async def _main(args: argparse.Namespace) -> None:
    server = await serve(args.listen, args.to, args.delay_ms / 1000)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=int, required=True, help="port to listen on (127.0.0.1)")
    parser.add_argument("--to", type=int, required=True, help="port to forward to (127.0.0.1)")
    parser.add_argument("--delay-ms", type=float, required=True, help="added one-way delay")
    try:
        asyncio.run(_main(parser.parse_args(argv)))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
