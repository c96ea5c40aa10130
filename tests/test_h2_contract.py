"""
HTTP/2 and gRPC through C{twistd} relay and agent processes: a grpcio
server in its own process, a grpcio client, and curl over prior-knowledge
h2c to an HTTP/1.1 server behind C{--http}.

The gRPC server is behind a plain C{--http} tunnel: the relay picks the
gRPC forwarder per request (C{application/grpc}), so this is what a user
gets from C{txtunnel http PORT} in front of a gRPC service, in clear text
(h2c prior knowledge) and on the relay's C{--https} listener (ALPN h2).
"""

from __future__ import annotations

import queue
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.test_contract import (
    STOPPED_BY_SIGTERM,
    Proc,
    curl,
    env,
    freePort,
    procs,
    startAgent,
    startRelay,
    webRoot,
)

__all__ = ["env", "procs", "webRoot"]

pytestmark = pytest.mark.contract

SERVER = """
import grpc, sys
from concurrent import futures
def unary(request, context):
    meta = dict(context.invocation_metadata())
    context.set_trailing_metadata([("x-trailing", "contract"), ("x-echo", meta.get("x-client", "-"))])
    return b"echo:" + request
def fail(request, context):
    context.abort(grpc.StatusCode.NOT_FOUND, "nothing here")
def stream(request, context):
    for i in range(int(request)):
        yield b"%d" % i
def collect(requests, context):
    return b"+".join(requests)
def chat(requests, context):
    for r in requests:
        yield b"re:" + r
same = lambda b: b
handler = grpc.method_handlers_generic_handler("c.S", {
    "Unary": grpc.unary_unary_rpc_method_handler(unary, same, same),
    "Fail": grpc.unary_unary_rpc_method_handler(fail, same, same),
    "Stream": grpc.unary_stream_rpc_method_handler(stream, same, same),
    "Collect": grpc.stream_unary_rpc_method_handler(collect, same, same),
    "Chat": grpc.stream_stream_rpc_method_handler(chat, same, same),
})
server = grpc.server(futures.ThreadPoolExecutor(8))
server.add_generic_rpc_handlers((handler,))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print("listening", port, flush=True)
server.wait_for_termination()
"""


def _same(data: bytes) -> bytes:
    return data


def _requests(outbox: queue.Queue[bytes | None]) -> Iterator[bytes]:
    """
    The messages put in C{outbox} until C{None}: a request iterator the
    test feeds one message at a time.
    """
    while True:
        item = outbox.get(timeout=20)
        if item is None:
            return
        yield item


def allFourModes(channel: grpc.Channel) -> None:
    """
    Unary (with metadata both ways and trailers), a failing unary (status
    and details), server-streaming, client-streaming, and bidirectional
    streaming interleaved: each reply is read before the next request is
    sent, so nothing on the way may wait for more of the stream.
    """
    reply, call = channel.unary_unary("/c.S/Unary", _same, _same).with_call(
        b"hi", timeout=20, metadata=[("x-client", "visitor")]
    )
    assert reply == b"echo:hi"
    trailers = dict(call.trailing_metadata())
    assert trailers["x-trailing"] == "contract" and trailers["x-echo"] == "visitor"
    with pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary("/c.S/Fail", _same, _same)(b"", timeout=20)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == "nothing here"

    assert list(channel.unary_stream("/c.S/Stream", _same, _same)(b"50", timeout=20)) == [b"%d" % i for i in range(50)]
    parts = [b"a", b"b" * 100_000, b"c"]
    assert channel.stream_unary("/c.S/Collect", _same, _same)(iter(parts), timeout=20) == b"+".join(parts)

    outbox: queue.Queue[bytes | None] = queue.Queue()
    replies = channel.stream_stream("/c.S/Chat", _same, _same)(_requests(outbox), timeout=30)
    for i in range(5):
        outbox.put(b"m%d" % i)
        assert next(replies) == b"re:m%d" % i
    outbox.put(None)
    assert list(replies) == []
    assert replies.code() == grpc.StatusCode.OK


def test_twistd_grpc_and_h2(tmp_path: Path, procs: list[Proc], env: dict[str, str], webRoot: int) -> None:
    """
    All four gRPC modes through a twistd relay and a twistd agent's plain
    C{--http} tunnel, the client speaking h2c with prior knowledge; and
    curl's prior-knowledge h2c to an HTTP/1.1 page through another.
    """
    server = Proc([sys.executable, "-c", SERVER], env)
    procs.append(server)
    grpcPort = int(server.waitFor(r"listening (\d+)").group(1))
    relay, port = startRelay(procs, env, tmp_path / "state")
    grpcAgent = startAgent(procs, env, port, "--http", str(grpcPort), "--subdomain", "rpc")
    grpcAgent.waitFor(re.escape(f"tunnel ready: http://rpc.localhost:{port}/ -> 127.0.0.1:{grpcPort}"))
    webAgent = startAgent(procs, env, port, "--http", str(webRoot), "--subdomain", "web")
    webAgent.waitFor(re.escape(f"tunnel ready: http://web.localhost:{port}/"))

    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.default_authority", f"rpc.localhost:{port}")])
    try:
        allFourModes(channel)
    finally:
        channel.close()

    result = curl(
        "--http2-prior-knowledge",
        "-w",
        "%{http_version}",
        "--resolve",
        f"web.localhost:{port}:127.0.0.1",
        f"http://web.localhost:{port}/index.html",
    )
    assert result.stdout == b"hello through twistd\n2", result.stderr

    for p in (grpcAgent, webAgent, relay):
        assert p.stop() in STOPPED_BY_SIGTERM
    assert "Traceback" not in relay.output + grpcAgent.output + webAgent.output


def test_twistd_grpc_over_https(tmp_path: Path, procs: list[Proc], env: dict[str, str]) -> None:
    """
    All four gRPC modes on the twistd relay's C{--https} listener: grpcio
    negotiates h2 by ALPN, checks the certificate the relay serves for the
    tunnel's name against the relay's development CA, and reaches the
    gRPC server behind a plain C{--http} tunnel.
    """
    server = Proc([sys.executable, "-c", SERVER], env)
    procs.append(server)
    grpcPort = int(server.waitFor(r"listening (\d+)").group(1))
    httpsPort = freePort()
    relay, port = startRelay(procs, env, tmp_path / "state", "--https", f"tcp:{httpsPort}:interface=127.0.0.1")
    caFile = relay.waitFor(r"development CA (\S+\.pem)").group(1)
    agent = startAgent(procs, env, port, "--http", str(grpcPort), "--subdomain", "rpc")
    agent.waitFor(re.escape(f"tunnel ready: http://rpc.localhost:{port}/"))

    credentials = grpc.ssl_channel_credentials(root_certificates=Path(caFile).read_bytes())
    channel = grpc.secure_channel(
        f"127.0.0.1:{httpsPort}",
        credentials,
        options=[
            ("grpc.ssl_target_name_override", "rpc.localhost"),
            ("grpc.default_authority", f"rpc.localhost:{httpsPort}"),
        ],
    )
    try:
        allFourModes(channel)
    finally:
        channel.close()

    for p in (agent, relay):
        assert p.stop() in STOPPED_BY_SIGTERM
    assert "Traceback" not in relay.output + agent.output
