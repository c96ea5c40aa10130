"""
Memory at rest: a relay with many idle tunnels, and one agent link with
many open idle streams.  Each uses its own relay and agents, so the figures
are not mixed with what the throughput runs left behind.
"""

from __future__ import annotations

import random
import select
import socket
import statistics
import time
from typing import Any

from .procs import Procs, free_range, rss_kb
from .tunnels import TunnelSpec, start_agent, start_relay, wait_ready

__all__ = ["idle_streams", "idle_tunnels"]

PER_AGENT = 50  # the relay's limit of tunnels per agent link
BATCH = 40  # idle-stream connections opened before waiting for them to arrive


def _mb(pid: int) -> float | None:
    kb = rss_kb(pid)
    return round(kb / 1024, 1) if kb is not None else None


def idle_tunnels(
    procs: Procs, tmp: str, env: dict[str, str], count: int, target: int, timeout: float
) -> dict[str, Any]:
    """
    C{count} TCP tunnels (agents of 50 each, all started at once) on a fresh
    relay whose port range has room for them; RSS of the relay before and
    once every tunnel is ready, and of the agents.
    """
    agents_n = (count + PER_AGENT - 1) // PER_AGENT
    ports = free_range(count + count // 10)
    relay = start_relay(procs, "idle-relay", tmp, env, ports)
    started = time.monotonic()
    agents = []
    try:
        time.sleep(1.0)
        before = _mb(relay.proc.pid)
        for i in range(agents_n):
            n = min(PER_AGENT, count - i * PER_AGENT)
            specs = [TunnelSpec(f"t{i}x{j}", "tcp", target) for j in range(n)]
            agents.append((start_agent(procs, f"idle-agent-{i:02d}", tmp, env, relay, specs, wait=False), n))
        deadline = time.monotonic() + timeout
        for agent, n in agents:
            wait_ready(procs, agent, n, max(1.0, deadline - time.monotonic()))
        ready_s = time.monotonic() - started
        time.sleep(2.0)
        after = _mb(relay.proc.pid)
        agent_rss = [m for m in (_mb(a.proc.pid) for a, _ in agents) if m is not None]
        opened = sum(len(a.ready) for a, _ in agents)
        return {
            "tunnels": opened,
            "agents": agents_n,
            "kind": "tcp",
            "relay_rss_before_mb": before,
            "relay_rss_mb": after,
            "relay_kb_per_tunnel": round((after - before) * 1024 / opened, 1) if after and before else None,
            "agent_rss_median_mb": round(statistics.median(agent_rss), 1) if agent_rss else None,
            "agent_rss_max_mb": max(agent_rss) if agent_rss else None,
            "seconds_to_ready": round(ready_s, 1),
        }
    finally:
        for agent, _ in agents:
            procs.stop(agent.proc)
        procs.stop(relay.proc)


def _count(status: str) -> tuple[int, int]:
    try:
        with open(status) as f:
            a, b = f.read().split()
        return int(a), int(b)
    except (OSError, ValueError):
        return 0, 0


def _wait_count(status: str, want: int, timeout: float, poll: float = 0.2) -> tuple[bool, int]:
    deadline = time.monotonic() + timeout
    n = _count(status)[0]
    while time.monotonic() < deadline:
        n = _count(status)[0]
        if n == want:
            return True, n
        time.sleep(poll)
    return False, n


def idle_streams(
    procs: Procs, tmp: str, env: dict[str, str], count: int, holder: tuple[int, str], timeout: float
) -> dict[str, Any]:
    """
    C{count} TCP connections held open through one TCP tunnel (one stream
    each on one agent link) to an echo server that holds them.  Checks that
    all arrive, that a sample of them still carries bytes both ways, and
    that all go away when closed; RSS of relay and agent before and while
    holding them.
    """
    holder_port, status = holder
    ports = free_range(4)
    relay = start_relay(procs, "streams-relay", tmp, env, ports)
    agent = None
    socks: list[socket.socket] = []
    errors: list[str] = []
    try:
        agent = start_agent(procs, "streams-agent", tmp, env, relay, [TunnelSpec("hold", "tcp", holder_port, ports[0])])
        time.sleep(1.0)
        before = (_mb(relay.proc.pid), _mb(agent.proc.pid))
        started = time.monotonic()
        deadline = started + timeout
        failed = 0
        for i in range(count):
            if time.monotonic() > deadline:
                errors.append(f"only {i} of {count} connections opened within {timeout:.0f}s")
                break
            try:
                s = socket.create_connection(("127.0.0.1", ports[0]), timeout=10)
                s.setblocking(False)
                socks.append(s)
            except OSError as e:
                failed += 1
                if failed > 20:
                    errors.append(f"connect failed {failed} times; last: {e}")
                    break
            if i % BATCH == BATCH - 1:
                # Paced: the tunnel port listens with a backlog of 50, and a
                # faster burst only measures SYN retransmits (1 s each).
                _wait_count(status, len(socks), 10, poll=0.01)
        ok, held = _wait_count(status, len(socks), max(5.0, deadline - time.monotonic()))
        open_s = time.monotonic() - started
        if not ok:
            errors.append(f"the target holds {held} of {len(socks)} connections")
        time.sleep(2.0)
        during = (_mb(relay.proc.pid), _mb(agent.proc.pid))
        # Do the held streams still work?  Echo through a sample of them.
        sample = random.sample(socks, min(200, len(socks)))
        for s in sample:
            try:
                s.send(b"ping\n")
            except OSError as e:
                errors.append(f"send: {e}")
        pending = {s.fileno(): s for s in sample}
        poller = select.poll()
        for fd in pending:
            poller.register(fd, select.POLLIN)
        echo_deadline = time.monotonic() + 20
        while pending and time.monotonic() < echo_deadline:
            for fd, _event in poller.poll(1000):
                s = pending.pop(fd, None)
                if s is None:
                    continue
                poller.unregister(fd)
                try:
                    data = s.recv(64)
                except OSError as e:
                    errors.append(f"recv: {e}")
                    continue
                if data != b"ping\n":
                    errors.append(f"echo came back as {data!r}")
        if pending:
            errors.append(f"{len(pending)} of {len(sample)} sampled streams did not echo within 20s")
        # Streams closed by the relay or agent while idle show as readable (EOF).
        sampled = set(sample)
        poller = select.poll()
        for s in socks:
            if s not in sampled:
                poller.register(s.fileno(), select.POLLIN)
        closed = len(poller.poll(0))
        if closed:
            errors.append(f"{closed} idle connections were closed or got data while idle")
        close_start = time.monotonic()
        for s in socks:
            s.close()
        socks.clear()
        gone, left = _wait_count(status, 0, 60)
        if not gone:
            errors.append(f"{left} connections still open at the target 60s after the visitors closed theirs")
        return {
            "streams": held,
            "wanted": count,
            "seconds_to_open": round(open_s, 1),
            "seconds_to_close": round(time.monotonic() - close_start, 1),
            "relay_rss_before_mb": before[0],
            "agent_rss_before_mb": before[1],
            "relay_rss_mb": during[0],
            "agent_rss_mb": during[1],
            "relay_kb_per_stream": round((during[0] - before[0]) * 1024 / held, 1)
            if held and during[0] and before[0]
            else None,
            "agent_kb_per_stream": round((during[1] - before[1]) * 1024 / held, 1)
            if held and during[1] and before[1]
            else None,
            "echo_sample": len(sample),
            "errors": errors,
        }
    finally:
        for s in socks:
            s.close()
        if agent is not None:
            procs.stop(agent.proc)
        procs.stop(relay.proc)
