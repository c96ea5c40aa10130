"""
HTTP/2 and gRPC through C{twistd} relay and agent processes: a grpcio
server in its own process behind C{--grpc}, a grpcio client, and curl over
prior-knowledge h2c to an HTTP/1.1 server behind C{--http}.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import grpc
import pytest

from tests.test_contract import STOPPED_BY_SIGTERM, Proc, curl, env, procs, startAgent, startRelay, webRoot

__all__ = ["env", "procs", "webRoot"]

pytestmark = pytest.mark.contract

SERVER = """
import grpc, sys
from concurrent import futures
def unary(request, context):
    context.set_trailing_metadata([("x-trailing", "contract")])
    return b"echo:" + request
def fail(request, context):
    context.abort(grpc.StatusCode.NOT_FOUND, "nothing here")
def stream(request, context):
    for i in range(int(request)):
        yield b"%d" % i
same = lambda b: b
handler = grpc.method_handlers_generic_handler("c.S", {
    "Unary": grpc.unary_unary_rpc_method_handler(unary, same, same),
    "Fail": grpc.unary_unary_rpc_method_handler(fail, same, same),
    "Stream": grpc.unary_stream_rpc_method_handler(stream, same, same),
})
server = grpc.server(futures.ThreadPoolExecutor(4))
server.add_generic_rpc_handlers((handler,))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print("listening", port, flush=True)
server.wait_for_termination()
"""


def _same(data: bytes) -> bytes:
    return data


def test_twistd_grpc_and_h2(tmp_path: Path, procs: list[Proc], env: dict[str, str], webRoot: int) -> None:
    server = Proc([sys.executable, "-c", SERVER], env)
    procs.append(server)
    grpcPort = int(server.waitFor(r"listening (\d+)").group(1))
    relay, port = startRelay(procs, env, tmp_path / "state")
    grpcAgent = startAgent(procs, env, port, "--grpc", str(grpcPort), "--subdomain", "rpc")
    grpcAgent.waitFor(re.escape(f"tunnel ready: http://rpc.localhost:{port}/ -> 127.0.0.1:{grpcPort}"))
    webAgent = startAgent(procs, env, port, "--http", str(webRoot), "--subdomain", "web")
    webAgent.waitFor(re.escape(f"tunnel ready: http://web.localhost:{port}/"))

    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.default_authority", f"rpc.localhost:{port}")])
    try:
        reply, call = channel.unary_unary("/c.S/Unary", _same, _same).with_call(b"hi", timeout=20)
        assert reply == b"echo:hi"
        assert dict(call.trailing_metadata())["x-trailing"] == "contract"
        assert list(channel.unary_stream("/c.S/Stream", _same, _same)(b"3", timeout=20)) == [b"0", b"1", b"2"]
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary("/c.S/Fail", _same, _same)(b"", timeout=20)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert caught.value.details() == "nothing here"
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
