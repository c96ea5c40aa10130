"""
Target of the idle-streams benchmark: accept connections and hold them
open, echo whatever arrives, and keep the number of open connections in a
status file (rewritten at most every 0.05 s).

Run: ``python holder.py HOST PORT STATUSFILE``; prints ``listening`` once bound.
"""

from __future__ import annotations

import asyncio
import os
import resource
import sys


class Holder(asyncio.Protocol):
    open = 0
    total = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        Holder.open += 1
        Holder.total += 1
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        Holder.open -= 1


async def main(host: str, port: int, status: str) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Holder, host, port, backlog=4096)
    print("listening", flush=True)
    last = None
    async with server:
        while True:
            now = (Holder.open, Holder.total)
            if now != last:
                tmp = status + ".tmp"
                with open(tmp, "w") as f:
                    f.write(f"{now[0]} {now[1]}\n")
                os.replace(tmp, status)
                last = now
            await asyncio.sleep(0.05)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
