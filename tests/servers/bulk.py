"""
A small streaming HTTP/1.1 origin for big-transfer tests, on h11 and asyncio
so that it shares nothing with the code under test.

    GET /big?n=BYTES   streams BYTES bytes (Content-Length set)
    PUT|POST /sink     reads the whole body without keeping it; answers with
                       its length and sha256

Usage: python bulk.py PORT   (prints "listening PORT" when ready)
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
from urllib.parse import parse_qs, urlsplit

import h11

BLOCK = bytes(range(256)) * 256  # 64 KiB


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(256 * 1024)
                conn.receive_data(data)
                continue
            if isinstance(event, (h11.ConnectionClosed,)) or event is h11.PAUSED and conn.our_state is h11.MUST_CLOSE:
                break
            if isinstance(event, h11.Request):
                url = urlsplit(event.target.decode())
                if url.path == "/big":
                    n = int(parse_qs(url.query).get("n", ["1048576"])[0])
                    await drainBody(conn, reader)
                    writer.write(
                        conn.send(
                            h11.Response(
                                status_code=200,
                                headers=[("Content-Length", str(n)), ("Content-Type", "application/octet-stream")],
                            )
                        )
                    )
                    sent = 0
                    while sent < n:
                        chunk = BLOCK[: min(len(BLOCK), n - sent)]
                        writer.write(conn.send(h11.Data(data=chunk)))
                        sent += len(chunk)
                        await writer.drain()
                    writer.write(conn.send(h11.EndOfMessage()))
                else:
                    digest = hashlib.sha256()
                    count = await drainBody(conn, reader, digest)
                    body = f"{count} {digest.hexdigest()}\n".encode()
                    writer.write(conn.send(h11.Response(status_code=200, headers=[("Content-Length", str(len(body)))])))
                    writer.write(conn.send(h11.Data(data=body)))
                    writer.write(conn.send(h11.EndOfMessage()))
                await writer.drain()
                if conn.our_state is h11.MUST_CLOSE:
                    break
                conn.start_next_cycle()
    except (ConnectionError, h11.RemoteProtocolError):
        pass
    finally:
        writer.close()


async def drainBody(conn: h11.Connection, reader: asyncio.StreamReader, digest: object = None) -> int:
    count = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(256 * 1024))
            continue
        if isinstance(event, h11.Data):
            count += len(event.data)
            if digest is not None:
                digest.update(event.data)  # type: ignore[attr-defined]
            continue
        if isinstance(event, h11.EndOfMessage):
            return count
        raise h11.RemoteProtocolError("unexpected event", 400)


async def main(port: int) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
