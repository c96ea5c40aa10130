"""
An HTTP upload sink for the benchmarks: reads each request body to the end,
throws it away and answers ``204 No Content``.

nginx can answer ``return 204`` without reading the body (it discards it
after answering, so the client's clock stops early), and its
``echo_read_request_body`` / DAV ``PUT`` spool the body to a temp file, which
caps a loopback upload near 0.5 GB/s.  This sink reads into one reused 1 MiB
buffer with ``recv_into`` on a thread per connection, so it is not what limits
the direct path.  It understands ``Content-Length`` and ``chunked`` bodies,
``Expect: 100-continue`` and keep-alive.

Run: ``python sink.py HOST PORT``; it prints ``listening`` once bound.
"""

from __future__ import annotations

import socket
import sys
import threading

BUF = 1 << 20


class _Conn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray(BUF)
        self.view = memoryview(self.buf)
        self.pending = b""

    def _fill(self) -> bool:
        n = self.sock.recv_into(self.buf)
        if not n:
            return False
        self.pending += bytes(self.view[:n])
        return True

    def readline(self, limit: int = 65536) -> bytes | None:
        while b"\r\n" not in self.pending:
            if len(self.pending) > limit or not self._fill():
                return None
        line, _, self.pending = self.pending.partition(b"\r\n")
        return line

    def discard(self, n: int) -> bool:
        take = min(n, len(self.pending))
        self.pending = self.pending[take:]
        n -= take
        while n > 0:
            got = self.sock.recv_into(self.view[: min(n, BUF)])
            if not got:
                return False
            n -= got
        return True

    def serve(self) -> None:
        try:
            while self.serveOne():
                pass
        except OSError:
            pass
        finally:
            self.sock.close()

    def serveOne(self) -> bool:
        request = self.readline()
        if not request:
            return False
        headers: dict[bytes, bytes] = {}
        while True:
            line = self.readline()
            if line is None:
                return False
            if not line:
                break
            key, _, value = line.partition(b":")
            headers[key.strip().lower()] = value.strip()
        if headers.get(b"expect", b"").lower() == b"100-continue":
            self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            while True:
                size = self.readline()
                if size is None:
                    return False
                n = int(size.split(b";")[0], 16)
                if not self.discard(n + 2 if n else 0):
                    return False
                if n == 0:
                    while True:  # trailers up to the empty line
                        line = self.readline()
                        if line is None:
                            return False
                        if not line:
                            break
                    break
        else:
            if not self.discard(int(headers.get(b"content-length", b"0") or 0)):
                return False
        close = headers.get(b"connection", b"").lower() == b"close"
        self.sock.sendall(
            b"HTTP/1.1 204 No Content\r\nServer: bench-sink\r\n"
            + (b"Connection: close\r\n" if close else b"")
            + b"\r\n"
        )
        return not close


def main(argv: list[str]) -> None:
    host, port = argv[1], int(argv[2])
    server = socket.create_server((host, port), backlog=1024)
    print("listening", flush=True)
    while True:
        sock, _ = server.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_Conn(sock).serve, daemon=True).start()


if __name__ == "__main__":
    main(sys.argv)
