# -*- test-case-name: tests.test_policy -*-
"""
Response header rules, applied by the agent to what its local service
answers (C{--add-response-header}, C{--remove-response-header}).

A sans-IO L{ResponseHeadRewriter} follows the requests going in (for
their methods) and the responses coming out (for where each head starts
and ends) and rewrites every final response head; bodies pass through
unchanged and unbuffered.  Anything it cannot follow (a protocol switch,
a malformed response, a head too big) is passed on unchanged from there.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from txtunnel.http1 import HTTPError, RequestFramer, RequestHead
from txtunnel.responses import MAX_RESPONSE_HEAD, ResponseFramer

__all__ = ["ResponseHeadRewriter", "rewriteHead"]


def rewriteHead(head: bytes, add: Sequence[tuple[bytes, bytes]], drop: Collection[bytes]) -> bytes:
    """
    C{head} (ending with the blank line) without the headers named
    (lower-case) in C{drop} or C{add}, and with C{add} appended.
    """
    replaced = {*drop, *(name.lower() for name, _ in add)}
    lines = head[:-4].split(b"\r\n")
    kept = [lines[0]]
    for line in lines[1:]:
        if line.split(b":", 1)[0].strip().lower() not in replaced:
            kept.append(line)
    kept.extend(name + b": " + value for name, value in add)
    return b"\r\n".join(kept) + b"\r\n\r\n"


class ResponseHeadRewriter:
    """
    Rewrites the response heads of one HTTP/1.1 connection.
    """

    def __init__(self, add: Sequence[tuple[bytes, bytes]], drop: Collection[bytes]) -> None:
        self.add = list(add)
        self.drop = {d.lower() for d in drop}
        self._requests = RequestFramer()
        self._responses = ResponseFramer()
        self._head = bytearray()
        #: Following has stopped: bytes pass unchanged.
        self.passthrough = False

    def requestData(self, data: bytes) -> None:
        if self.passthrough or self._requests is None:
            return
        try:
            events = self._requests.feed(data)
        except HTTPError:
            self._requests = None  # type: ignore[assignment]
            return
        for event in events:
            if isinstance(event, RequestHead):
                self._responses.expect(event.method)

    def responseData(self, data: bytes) -> bytes:
        """
        The bytes to send on for C{data} from the local service.
        """
        out: list[bytes] = []
        responses = self._responses
        while data and not self.passthrough:
            framing = responses.framing
            if framing in ("raw", "opaque", "close"):
                self.passthrough = True
                break
            if framing != "head":
                taken = responses.feedBody(data)
                out.append(data[:taken])
                data = data[taken:]
                continue
            if not responses.outstanding:
                self.passthrough = True
                break
            self._head += data
            data = b""
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > MAX_RESPONSE_HEAD:
                    data, self._head = bytes(self._head), bytearray()
                    self.passthrough = True
                break
            head, data = bytes(self._head[: end + 4]), bytes(self._head[end + 4 :])
            self._head = bytearray()
            responses.feed(head)
            interim = head[9:10] == b"1"
            out.append(head if interim else rewriteHead(head, self.add, self.drop))
        if data:
            out.append(data)
        return b"".join(out)
