"""
One measurement each: wrk (req/s, latency), curl (download/upload MB/s),
iperf3 (TCP MB/s).  MB is 10^6 bytes throughout.
"""

from __future__ import annotations

import json
import re
import subprocess
import time

__all__ = ["MeasureError", "curl_download", "curl_upload", "iperf3", "wrk"]


class MeasureError(Exception):
    pass


def _run(argv: list[str], timeout: float) -> str:
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise MeasureError(f"{argv[0]} took longer than {timeout:.0f}s") from None
    if done.returncode != 0:
        raise MeasureError(f"{argv[0]} exited {done.returncode}: {(done.stderr or done.stdout).strip()[-300:]}")
    return done.stdout


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise MeasureError(f"cannot read wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def wrk(wrk_bin: str, url: str, host: str | None, connections: int, threads: int, duration: float) -> dict[str, float]:
    """
    wrk --latency on C{url}; req/s, p50 and p99 in ms.  Socket errors and
    non-2xx answers are counted; more than 1% of them fail the measurement.
    """
    argv = [wrk_bin, f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--timeout", "5s", "--latency"]
    if host:
        argv += ["-H", f"Host: {host}"]
    out = _run(argv + [url], timeout=duration + 30)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    total = re.search(r"(\d+) requests in", out)
    if not (rps and p50 and p99 and total):
        raise MeasureError(f"cannot read wrk output: {out[-300:]}")
    errors = 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock:
        errors += sum(int(x) for x in sock.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        errors += int(non2xx.group(1))
    requests = int(total.group(1))
    if requests == 0 or errors > 0.01 * requests:
        raise MeasureError(f"wrk: {errors} errors in {requests} requests: {out.strip()[-300:]}")
    return {
        "rps": float(rps.group(1)),
        "p50_ms": _ms(p50.group(1)),
        "p99_ms": _ms(p99.group(1)),
        "requests": requests,
        "errors": errors,
    }


_CURL_OUT = "%{http_code} %{size_download} %{size_upload} %{time_total}"


def _curl(argv: list[str], timeout: float) -> tuple[int, int, int, float]:
    out = _run(argv + ["--max-time", f"{timeout:.0f}", "-w", _CURL_OUT], timeout=timeout + 15).split()
    if len(out) != 4:
        raise MeasureError(f"cannot read curl output {out!r}")
    return int(out[0]), int(float(out[1])), int(float(out[2])), float(out[3])


def curl_download(curl: str, url: str, host: str | None, size: int, timeout: float) -> dict[str, float]:
    """
    GET C{url} to /dev/null; MB/s over curl's total time.
    """
    argv = [curl, "-s", "-S", "-o", "/dev/null"]
    if host:
        argv += ["-H", f"Host: {host}"]
    start = time.monotonic()
    code, down, _, total = _curl(argv + [url], timeout)
    if code != 200 or down != size:
        raise MeasureError(f"download: HTTP {code}, {down} of {size} bytes")
    return {"mbps": size / total / 1e6, "seconds": total, "wall": time.monotonic() - start}


def curl_upload(curl: str, url: str, host: str | None, path: str, size: int, timeout: float) -> dict[str, float]:
    """
    PUT the file at C{path} (C{curl -T}) to the sink, which reads it all
    before it answers 204; MB/s over curl's total time.  ``Expect:`` is
    sent empty so no path waits for ``100 Continue``.
    """
    argv = [curl, "-s", "-S", "-o", "/dev/null", "-T", path, "-H", "Expect:"]
    if host:
        argv += ["-H", f"Host: {host}"]
    start = time.monotonic()
    code, _, up, total = _curl(argv + [url], timeout)
    if code != 204 or up != size:
        raise MeasureError(f"upload: HTTP {code}, {up} of {size} bytes sent")
    return {"mbps": size / total / 1e6, "seconds": total, "wall": time.monotonic() - start}


def iperf3(iperf3_bin: str, port: int, seconds: float, reverse: bool) -> dict[str, float]:
    """
    One TCP stream for C{seconds}; MB/s the receiver got.  C{reverse}: the
    server (behind the tunnel) sends.
    """
    argv = [iperf3_bin, "-c", "127.0.0.1", "-p", str(port), "-t", f"{seconds:g}", "-J", "--connect-timeout", "5000"]
    if reverse:
        argv.append("-R")
    last: MeasureError | None = None
    for _attempt in range(3):
        try:
            out = _run(argv, timeout=seconds + 30)
        except MeasureError as e:
            last = e
            if "busy" in str(e):
                time.sleep(1.0)
                continue
            raise
        data = json.loads(out)
        if "error" in data:
            last = MeasureError(f"iperf3: {data['error']}")
            time.sleep(1.0)
            continue
        received = data["end"]["sum_received"]
        return {"mbps": received["bits_per_second"] / 8 / 1e6, "bytes": received["bytes"]}
    raise last or MeasureError("iperf3 failed")
