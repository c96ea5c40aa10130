# -*- test-case-name: tests.test_streaming,tests.test_relay_agent -*-
"""
Server-sent events: C{text/event-stream} responses at C{NAME.<domain>}.

An C{http} tunnel hands every request that asks for an event stream
(C{Accept: text/event-stream}, which every C{EventSource} sends) to this
forwarder; an C{sse} tunnel, asked for by name, serves all its requests
this way.  It is the HTTP forwarder's splice -- each write of the local
server forwarded at once, nothing buffered -- with the
L{txtunnel.sse.SSEHeartbeat} on: a comment line after C{sse-heartbeat}
idle seconds (default 15, 0 for none), only ever between events.

The C{http} forwarder keeps the same heartbeat for an event stream it
meets on a request that did not say it wanted one, so a plain C{fetch}
of an event stream is kept alive too.
"""

from __future__ import annotations

from zope.interface import implementer

from txtunnel.forwarders.http import SSE_HEARTBEAT, HTTPForwarder
from txtunnel.http1 import RequestHead
from txtunnel.interfaces import IAgentTunnel, IForwarder
from txtunnel.link import Stream
from txtunnel.sse import DEFAULT_INTERVAL

__all__ = ["SSEForwarder", "asksForEventStream"]


def asksForEventStream(head: RequestHead) -> bool:
    """
    Whether C{head} asks for an event stream: an C{Accept} header that
    names C{text/event-stream} (with a q-value above 0).
    """
    for name, value in head.headers:
        if name.lower() != b"accept":
            continue
        for item in value.split(b","):
            media, *params = (p.strip() for p in item.split(b";"))
            if media.lower() != b"text/event-stream":
                continue
            refused = any(p.replace(b" ", b"").lower() in (b"q=0", b"q=0.0", b"q=0.00", b"q=0.000") for p in params)
            if not refused:
                return True
    return False


@implementer(IForwarder)
class SSEForwarder(HTTPForwarder):
    """
    Event streams from a local server, claimed from C{http} tunnels or
    served by an C{sse} tunnel of their own, with the SSE heartbeat.
    """

    name = "sse"
    description = "server-sent events (text/event-stream) at NAME.<domain>, with a heartbeat between events"
    settings = (SSE_HEARTBEAT,)

    def handlesRequest(self, head: RequestHead) -> bool:
        return head.method in (b"GET", b"POST") and asksForEventStream(head)

    def connect(self, tunnel: IAgentTunnel, stream: Stream) -> None:
        self.serve(tunnel, stream, float(tunnel.options.get("sse-heartbeat", DEFAULT_INTERVAL)))
