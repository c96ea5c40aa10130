"""
The agent's traffic follower and ring (sans-IO), body display, and replay
request building.
"""

from __future__ import annotations

import gzip
import json
import zlib
from typing import Any

import pytest
from twisted.internet.task import Clock

from txtunnel.inspector import ReplayError, buildReplay
from txtunnel.traffic import Capture, Traffic, describeBody


def traffic(**kwargs: Any) -> tuple[Traffic, list[tuple[str, Capture]], Clock]:
    clock = Clock()
    t = Traffic(clock, **kwargs)
    t.keep = True
    events: list[tuple[str, Capture]] = []
    t.listeners.append(lambda event, capture: events.append((event, capture)))
    return t, events, clock


def test_disabled_costs_nothing() -> None:
    t = Traffic(Clock())
    assert not t.enabled and t.follow("web") is None


def test_request_and_response() -> None:
    t, events, clock = traffic()
    f = t.follow("web")
    assert f is not None
    f.requestData(b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 1.2.3.4, 10.0.0.9\r\n\r\n")
    clock.advance(0.25)
    f.responseData(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 9\r\n\r\n{"a": 1}')
    assert [e for e, _ in events] == ["start"]
    f.responseData(b"\n")
    assert [e for e, _ in events] == ["start", "done"]
    capture = events[-1][1]
    assert (capture.method, capture.target, capture.status, capture.clientIP) == ("GET", "/a?b=1", 200, "10.0.0.9")
    assert capture.duration == 0.25 and capture.done
    detail = capture.detail()
    assert detail["response"]["body"]["kind"] == "json"
    assert detail["response"]["body"]["text"] == '{\n  "a": 1\n}'
    assert ("content-type", "application/json") in detail["response"]["headers"]
    assert t.get(capture.id) is capture


def test_chunked_both_ways_and_pipelining() -> None:
    t, events, _ = traffic()
    f = t.follow("web")
    assert f is not None
    f.requestData(
        b"POST /form HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\na=1&b\r\n3\r\n=%3\r\n0\r\n\r\n"
        b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    f.responseData(
        b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n"
        b"4\r\nmade\r\n0\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"
    )
    done = [c for e, c in events if e == "done"]
    assert [(c.method, c.status) for c in done] == [("POST", 201), ("HEAD", 204)]
    post = done[0].detail()
    assert post["request"]["body"]["kind"] == "form"
    assert [list(f) for f in post["request"]["body"]["fields"]] == [["a", "1"], ["b", "%3"]]
    assert post["response"]["body"]["text"] == "made"
    assert done[0].requestContent() == (b"a=1&b=%3", True)


def test_body_cap_and_ring_bound() -> None:
    t, events, _ = traffic(size=3, bodyCap=10)
    for i in range(5):
        f = t.follow("web")
        assert f is not None
        f.requestData(b"PUT /%d HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" % i + b"x" * 100)
        f.responseData(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n" + b"y" * 50)
    assert [c.target for c in t.captures] == ["/2", "/3", "/4"]
    capture = t.captures[-1]
    assert len(capture.requestBody) == 10 and capture.requestSize == 100
    assert len(capture.responseBody) == 10 and capture.responseSize == 50
    detail = capture.detail()
    assert detail["request"]["body"]["truncated"] and detail["response"]["body"]["truncated"]
    with pytest.raises(ReplayError, match="larger than the capture"):
        buildReplay(capture, {})
    assert buildReplay(capture, {"body": "new"}).endswith(b"Content-Length: 3\r\nConnection: close\r\n\r\nnew")


def test_upgrade_and_close_delimited() -> None:
    t, events, _ = traffic()
    f = t.follow("web")
    assert f is not None
    f.requestData(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
    f.responseData(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\x81\x01a")
    f.requestData(b"\x81\x81abcd\x00")
    f.connectionLost()
    assert [(e, c.status) for e, c in events] == [("start", 101), ("done", 101)]
    g = t.follow("web")
    assert g is not None
    g.requestData(b"GET /old HTTP/1.1\r\nHost: x\r\n\r\n")
    g.responseData(b"HTTP/1.0 200 OK\r\n\r\nuntil close")
    g.connectionLost()
    last = events[-1][1]
    assert last.status == 200 and bytes(last.responseBody) == b"until close" and last.done


def test_garbage_request_gives_up_quietly() -> None:
    t, events, _ = traffic()
    f = t.follow("web")
    assert f is not None
    f.requestData(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    f.requestData(b"\x00\x01 not http\r\n\r\n")
    f.responseData(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    f.connectionLost()
    assert [e for e, _ in events] == ["start", "done"]


@pytest.mark.parametrize(
    "body, headers, kind, text",
    [
        (
            gzip.compress(b'{"z": [1]}'),
            [("Content-Encoding", "gzip"), ("Content-Type", "application/json")],
            "json",
            '{\n  "z": [\n    1\n  ]\n}',
        ),
        (zlib.compress(b"plain words"), [("content-encoding", "deflate")], "text", "plain words"),
        (b"\x00\x01\x02hello", [("content-type", "application/octet-stream")], "hex", None),
        (b"not gzip", [("content-encoding", "gzip")], "hex", None),
        (b"{broken", [("content-type", "application/json")], "text", "{broken"),
        (b"", [], "empty", ""),
    ],
)
def test_describe_body(body: bytes, headers: list[tuple[str, str]], kind: str, text: str | None) -> None:
    info = describeBody(body, headers, True)
    assert info["kind"] == kind
    if text is not None:
        assert info["text"] == text
    if kind == "hex":
        assert info["text"].startswith("00000000  ")


def test_decompression_is_capped() -> None:
    bomb = gzip.compress(b"\x00" * (20 * 1024 * 1024))
    info = describeBody(bomb, [("content-encoding", "gzip")], True)
    assert info["captured"] == len(bomb) and len(info["text"]) < 6 * 1024 * 1024


@pytest.mark.parametrize("coding, module", [("br", "brotli"), ("zstd", "zstandard")])
def test_brotli_and_zstd_decoded_and_capped(coding: str, module: str) -> None:
    """
    With brotli or zstandard installed (the [decode] extra, in the test
    extras), br and zstd bodies are decoded like gzip: JSON pretty-printed,
    a bomb cut at the decode cap, garbage shown as hex.
    """
    from txtunnel.traffic import DECODED_CAP

    lib = pytest.importorskip(module)

    def compress(data: bytes) -> bytes:
        return bytes(lib.compress(data) if module == "brotli" else lib.ZstdCompressor().compress(data))

    headers = [("Content-Encoding", coding), ("Content-Type", "application/json")]
    info = describeBody(compress(b'{"z": [1]}'), headers, True)
    assert info["kind"] == "json" and info["decodedFrom"] == coding
    assert info["text"] == '{\n  "z": [\n    1\n  ]\n}'
    bomb = compress(b"a" * (20 * 1024 * 1024))
    info = describeBody(bomb, [("content-encoding", coding)], True)
    assert info["kind"] == "text" and info["captured"] == len(bomb) and len(info["text"]) == DECODED_CAP
    info = describeBody(b"not compressed at all", [("content-encoding", coding)], True)
    assert info["kind"] == "hex" and info["encoding"] == coding


def test_replay_edits_checked() -> None:
    t, events, _ = traffic()
    f = t.follow("web")
    assert f is not None
    f.requestData(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nhi")
    capture = events[0][1]
    again = buildReplay(capture, {})
    assert again == b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"
    edited = buildReplay(capture, {"method": "PUT", "target": "/q", "headers": [["X-A", "b"]], "body": "{}"})
    assert edited.startswith(b"PUT /q HTTP/1.1\r\nX-A: b\r\nContent-Length: 2\r\n")
    for edits, words in [
        ({"method": "GE T"}, "method"),
        ({"target": "no-slash"}, "target"),
        ({"target": "/a b"}, "target"),
        ({"headers": [["X", "a\r\nInjected: 1"]]}, "line break"),
        ({"headers": [["Bad Name", "v"]]}, "header name"),
        ({"headers": "nope"}, "pairs"),
        ({"body": 5}, "string"),
    ]:
        with pytest.raises(ReplayError, match=words):
            buildReplay(capture, edits)
    assert json.dumps(capture.summary())


def test_broken_listener_breaks_nothing() -> None:
    """
    A listener that raises is removed; the follower and the others go on.
    """
    t, events, _ = traffic()

    def broken(event: str, capture: Capture) -> None:
        raise RuntimeError("boom")

    t.listeners.insert(0, broken)
    f = t.follow("web")
    assert f is not None
    f.requestData(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    f.responseData(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert broken not in t.listeners
    assert [e for e, _ in events] == ["start", "done"]


def test_follower_bug_costs_only_the_capture() -> None:
    t, events, _ = traffic()
    f = t.follow("web")
    assert f is not None
    f._responses = None  # type: ignore[assignment]  # any internal failure
    f.requestData(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    f.responseData(b"HTTP/1.1 200 OK\r\n\r\n")
    f.connectionLost()
    assert f._lost
