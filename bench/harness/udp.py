"""
UDP datagrams per second, with loss: a counting receiver (a thread in the
harness) and a sender in its own process, so the two do not share a GIL.

Each run tags its datagrams with a run number in the first 8 bytes, so late
datagrams of one run never count for the next.  The sender sends as fast as
it can for the given seconds (UDP has no flow control: what the path cannot
carry is lost), then the receiver waits for stragglers; the figure is the
datagrams received per second of sending.  Loss, the share of sent
datagrams that never arrived, is measured at a paced offered rate
(L{PACED_RATE}), where it says whether the path keeps up, rather than at
full blast, where every path but the fastest loses most of what it is sent.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter as _Counter

__all__ = ["Receiver", "blast", "measure"]

SIZE = 512


class Receiver:
    """
    Counts datagrams by run number on a loopback UDP port.
    """

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.counts: _Counter[int] = _Counter()
        self.last = time.monotonic()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        buf = bytearray(65536)
        while not self._stop:
            try:
                n = self.sock.recv_into(buf)
            except TimeoutError:
                continue
            except OSError:
                return
            if n >= 8:
                self.counts[struct.unpack_from("!Q", buf)[0]] += 1
                self.last = time.monotonic()

    def settle(self, quiet: float = 0.5, limit: float = 5.0) -> None:
        """
        Wait until nothing has arrived for C{quiet} seconds (or C{limit}).
        """
        end = time.monotonic() + limit
        while time.monotonic() < end and time.monotonic() - self.last < quiet:
            time.sleep(0.05)

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        self._thread.join(2)


def blast(port: int, seconds: float, run: int, rate: float = 0, size: int = SIZE) -> int:
    """
    Send C{size}-byte datagrams tagged C{run} to 127.0.0.1:C{port} for
    C{seconds}, as fast as possible or, with C{rate}, paced to that many
    per second; return how many were sent.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(("127.0.0.1", port))
    payload = bytearray(size)
    sent = 0
    start = time.monotonic()
    end = start + seconds
    while time.monotonic() < end:
        if rate:
            ahead = start + (sent + 256) / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        for i in range(256):
            struct.pack_into("!QQ", payload, 0, run, sent + i)
            try:
                sock.send(payload)
            except (BlockingIOError, ConnectionRefusedError):
                continue
        sent += 256
    return sent


_SENDER = (
    "import sys; from harness.udp import blast; "
    "print(blast(int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])))"
)

#: The offered rate at which loss is measured: about what a game server or
#: a busy DNS or metrics (statsd) endpoint sends.
PACED_RATE = 20_000


def measure(receiver: Receiver, port: int, seconds: float, run: int, cwd: str, rate: float = 0) -> dict[str, float]:
    """
    One run through the path whose public UDP port is C{port}, unpaced or
    at C{rate} datagrams per second.
    """
    out = subprocess.run(
        [sys.executable, "-c", _SENDER, str(port), str(seconds), str(run), str(rate)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    )
    if out.returncode != 0:
        from .measure import MeasureError

        raise MeasureError(f"udp sender failed: {out.stderr.strip()[-300:]}")
    sent = int(out.stdout.strip())
    receiver.settle()
    got = receiver.counts.pop(run, 0)
    return {"dgps": got / seconds, "loss_pct": 100.0 * (1 - got / sent) if sent else 100.0, "sent": sent}
