"""
gRPC through a tunnel with a real grpcio client and server: the four call
kinds, metadata and trailers, status errors, deadlines, cancellation and a
local service that is down.  The server uses generic handlers (bytes in,
bytes out), so no generated code is needed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
import pytest_twisted

from tests.conftest import Relay, RunningAgent, closedPort, curl, inThread, startAgent

SERVICE = "txtunnel.test.Echo"


def _identity(data: bytes) -> bytes:
    return data


class EchoService:
    """
    What the local gRPC server does, and what it saw.
    """

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.slowStarted = threading.Event()
        self.seenDeadline: list[float | None] = []
        self.seenMetadata: list[tuple[str, Any]] = []

    def unary(self, request: bytes, context: Any) -> bytes:
        metadata = list(context.invocation_metadata())
        self.seenMetadata = metadata
        context.send_initial_metadata([("x-initial", "first")])
        context.set_trailing_metadata([("x-trailing", "last"), ("x-bin-bin", b"\x00\x01\xff")])
        return b"echo:" + request

    def serverStream(self, request: bytes, context: Any) -> Iterator[bytes]:
        count = int(request)
        for i in range(count):
            yield b"%d:" % i + b"x" * 1000

    def clientStream(self, requests: Iterator[bytes], context: Any) -> bytes:
        total = 0
        parts = 0
        for request in requests:
            total += len(request)
            parts += 1
        return b"%d/%d" % (parts, total)

    def bidi(self, requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        for request in requests:
            yield request.upper()

    def fail(self, request: bytes, context: Any) -> bytes:
        context.set_trailing_metadata([("x-why", "because")])
        context.abort(grpc.StatusCode.NOT_FOUND, "no thing called " + request.decode())
        raise AssertionError("unreachable")

    def slow(self, request: bytes, context: Any) -> bytes:
        self.seenDeadline.append(context.time_remaining())
        self.slowStarted.set()
        deadline = time.monotonic() + 20
        while context.is_active() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not context.is_active():
            self.cancelled.set()
        return b"late"

    def handler(self) -> Any:
        rpc = grpc
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Unary": rpc.unary_unary_rpc_method_handler(self.unary, _identity, _identity),
                "ServerStream": rpc.unary_stream_rpc_method_handler(self.serverStream, _identity, _identity),
                "ClientStream": rpc.stream_unary_rpc_method_handler(self.clientStream, _identity, _identity),
                "Bidi": rpc.stream_stream_rpc_method_handler(self.bidi, _identity, _identity),
                "Fail": rpc.unary_unary_rpc_method_handler(self.fail, _identity, _identity),
                "Slow": rpc.unary_unary_rpc_method_handler(self.slow, _identity, _identity),
            },
        )


@pytest.fixture
def grpcServer() -> Iterator[tuple[int, EchoService]]:
    service = EchoService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((service.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port, service
    server.stop(None)


class Client:
    """
    A grpcio channel to a tunnel through the relay's cleartext listener
    (prior-knowledge h2c, as grpcio always speaks on insecure channels).
    """

    def __init__(self, relay: Relay, name: str) -> None:
        self.channel = grpc.insecure_channel(
            f"127.0.0.1:{relay.port}",
            options=[("grpc.default_authority", f"{name}.localhost:{relay.port}"), ("grpc.enable_retries", 0)],
        )

    def method(self, kind: str, name: str) -> Any:
        factory = getattr(self.channel, kind)
        return factory(f"/{SERVICE}/{name}", request_serializer=_identity, response_deserializer=_identity)

    def close(self) -> None:
        self.channel.close()


async def _tunnel(relay: Relay, agents: list[RunningAgent], port: int, kind: str = "http") -> Client:
    await startAgent(agents, relay, f"--{kind}", str(port), "--subdomain", "calls")
    return Client(relay, "calls")


@pytest_twisted.ensureDeferred
async def test_four_call_kinds_with_metadata(
    relay: Relay, agents: list[RunningAgent], grpcServer: tuple[int, EchoService]
) -> None:
    """
    Unary, server-streaming, client-streaming and bidirectional calls
    through an http tunnel; request metadata reaches the server, initial
    and trailing metadata (binary too) reach the client.
    """
    port, service = grpcServer
    client = await _tunnel(relay, agents, port)

    def calls() -> dict[str, Any]:
        unary = client.method("unary_unary", "Unary")
        reply, call = unary.with_call(b"hi", metadata=[("x-client", "c1"), ("x-token-bin", b"\xfe\x00")], timeout=20)
        results: dict[str, Any] = {
            "unary": reply,
            "initial": dict(call.initial_metadata()),
            "trailing": dict(call.trailing_metadata()),
            "code": call.code(),
        }
        stream = client.method("unary_stream", "ServerStream")
        results["serverStream"] = list(stream(b"300", timeout=20))
        collect = client.method("stream_unary", "ClientStream")
        results["clientStream"] = collect(iter([b"a" * 50000] * 40), timeout=20)
        bidi = client.method("stream_stream", "Bidi")
        results["bidi"] = list(bidi(iter([b"one", b"two", b"three"]), timeout=20))
        return results

    try:
        results = await inThread(calls)
    finally:
        client.close()
    assert results["unary"] == b"echo:hi"
    assert results["code"] == grpc.StatusCode.OK
    assert results["initial"]["x-initial"] == "first"
    assert results["trailing"]["x-trailing"] == "last"
    assert results["trailing"]["x-bin-bin"] == b"\x00\x01\xff"
    seen = dict(service.seenMetadata)
    assert seen["x-client"] == "c1"
    assert seen["x-token-bin"] == b"\xfe\x00"
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert len(results["serverStream"]) == 300
    assert results["serverStream"][299].startswith(b"299:")
    assert results["clientStream"] == b"40/2000000"
    assert results["bidi"] == [b"ONE", b"TWO", b"THREE"]


@pytest_twisted.ensureDeferred
async def test_status_error_passes_through(
    relay: Relay, agents: list[RunningAgent], grpcServer: tuple[int, EchoService]
) -> None:
    """
    A NOT_FOUND with details and trailing metadata reaches the client as
    the server sent it.
    """
    port, _ = grpcServer
    client = await _tunnel(relay, agents, port)

    def call() -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as caught:
            client.method("unary_unary", "Fail")(b"widget", timeout=20)
        return caught.value

    try:
        error: Any = await inThread(call)
    finally:
        client.close()
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == "no thing called widget"
    assert dict(error.trailing_metadata())["x-why"] == "because"


@pytest_twisted.ensureDeferred
async def test_deadline_exceeded_reaches_the_server(
    relay: Relay, agents: list[RunningAgent], grpcServer: tuple[int, EchoService]
) -> None:
    """
    The client's deadline travels as grpc-timeout (the server sees about
    the time left) and, when it passes, the client gets DEADLINE_EXCEEDED
    and the server sees the call end.
    """
    port, service = grpcServer
    client = await _tunnel(relay, agents, port)

    def call() -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as caught:
            client.method("unary_unary", "Slow")(b"", timeout=1.0)
        return caught.value

    try:
        error: Any = await inThread(call)
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert await inThread(service.cancelled.wait, 10)
    finally:
        client.close()
    remaining = service.seenDeadline[0]
    assert remaining is not None and 0 < remaining <= 1.1


@pytest_twisted.ensureDeferred
async def test_client_cancellation_reaches_the_server(
    relay: Relay, agents: list[RunningAgent], grpcServer: tuple[int, EchoService]
) -> None:
    """
    A call the client cancels (RST_STREAM to the relay) is cancelled on the
    local server too (RST_STREAM from the agent).
    """
    port, service = grpcServer
    client = await _tunnel(relay, agents, port)

    def call() -> Any:
        future = client.method("unary_unary", "Slow").future(b"", timeout=30)
        assert service.slowStarted.wait(10)
        future.cancel()
        return future

    try:
        future = await inThread(call)
        assert future.cancelled()
        assert await inThread(service.cancelled.wait, 10)
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_local_service_down_is_unavailable(relay: Relay, agents: list[RunningAgent]) -> None:
    """
    When nothing listens at the target the client gets UNAVAILABLE, with
    the agent's words about the target.
    """
    port = closedPort()
    client = await _tunnel(relay, agents, port)

    def call() -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as caught:
            client.method("unary_unary", "Unary")(b"x", timeout=20)
        return caught.value

    try:
        error: Any = await inThread(call)
    finally:
        client.close()
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert f"127.0.0.1:{port}" in error.details()


@pytest_twisted.ensureDeferred
async def test_unknown_tunnel_is_unimplemented(relay: Relay) -> None:
    """
    A call for a name no tunnel holds gets the relay's 404, which gRPC
    reports as UNIMPLEMENTED.
    """
    client = Client(relay, "nobody")

    def call() -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as caught:
            client.method("unary_unary", "Unary")(b"x", timeout=20)
        return caught.value

    try:
        error: Any = await inThread(call)
    finally:
        client.close()
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest_twisted.ensureDeferred
async def test_grpc_tunnel_by_name(
    relay: Relay, agents: list[RunningAgent], grpcServer: tuple[int, EchoService]
) -> None:
    """
    A C{--grpc} tunnel sends every HTTP/2 request to the local service over
    HTTP/2; an HTTP/1.1 visitor is told to use HTTP/2.
    """
    port, _ = grpcServer
    client = await _tunnel(relay, agents, port, kind="grpc")
    try:
        reply = await inThread(lambda: client.method("unary_unary", "Unary")(b"named", timeout=20))
    finally:
        client.close()
    assert reply == b"echo:named"
    code, out, err = await curl("-H", f"Host: calls.localhost:{relay.port}", f"http://127.0.0.1:{relay.port}/")
    assert code == 0, err
    assert out.startswith(b"505 ")


@pytest_twisted.ensureDeferred
async def test_grpc_over_tls(tmp_path: Any, agents: list[RunningAgent], grpcServer: tuple[int, EchoService]) -> None:
    """
    A gRPC client with TLS credentials negotiates ALPN h2 with the relay's
    ssl: listener; a server-streaming call comes through.
    """
    from twisted.internet import defer

    from tests.conftest import startRelay
    from tests.test_http_tunnel import selfSignedCertificate

    port, _ = grpcServer
    key, cert = selfSignedCertificate(tmp_path)
    relay = await startRelay(
        str(tmp_path / "state"), "--https", f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
    )
    try:
        await startAgent(agents, relay, "--http", str(port), "--subdomain", "secure")
        httpsPort = relay.relay.httpsPort
        with open(cert, "rb") as f:
            credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
        channel = grpc.secure_channel(
            f"127.0.0.1:{httpsPort}",
            credentials,
            options=[
                ("grpc.ssl_target_name_override", "secure.localhost"),
                ("grpc.default_authority", f"secure.localhost:{httpsPort}"),
            ],
        )
        try:
            method = channel.unary_stream(
                f"/{SERVICE}/ServerStream", request_serializer=_identity, response_deserializer=_identity
            )
            replies = await inThread(lambda: list(method(b"5", timeout=20)))
        finally:
            channel.close()
        assert len(replies) == 5
    finally:
        await defer.maybeDeferred(relay.service.stopService)


@pytest_twisted.ensureDeferred
async def test_local_service_without_http2_is_unavailable(
    relay: Relay, agents: list[RunningAgent], origin: int
) -> None:
    """
    A gRPC call to a local service that only speaks HTTP/1.1 gets
    UNAVAILABLE saying so, not a hang or a bare reset.
    """
    client = await _tunnel(relay, agents, origin, kind="grpc")

    def call() -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as caught:
            client.method("unary_unary", "Unary")(b"x", timeout=20)
        return caught.value

    try:
        error: Any = await inThread(call)
    finally:
        client.close()
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert f"the local service at 127.0.0.1:{origin}" in error.details()


@pytest_twisted.ensureDeferred
async def test_gates_see_and_rewrite_grpc_calls(
    relay: Relay, agents: list[RunningAgent], grpcServer: tuple[int, EchoService]
) -> None:
    """
    The relay's visitor gates run on each HTTP/2 stream before it is
    forwarded: a slow gate's added header reaches the server and the header
    it drops does not; a refusal is reported to the client.
    """
    from tests.test_gates import Deny, Slow

    port, service = grpcServer
    client = await _tunnel(relay, agents, port)
    deny = Deny()
    relay.relay.gates[:] = [deny, Slow()]

    def calls() -> tuple[bytes, Any]:
        reply = client.method("unary_unary", "Unary")(
            b"gated", metadata=[("authorization", "secret"), ("x-visitor", "forged")], timeout=20
        )
        with pytest.raises(grpc.RpcError) as caught:
            client.channel.unary_unary("/private/Nope", _identity, _identity)(b"", timeout=20)
        return reply, caught.value

    try:
        reply, error = await inThread(calls)
    finally:
        client.close()
    assert reply == b"echo:gated"
    seen = service.seenMetadata
    assert ("x-visitor", "checked") in seen and ("x-visitor", "forged") not in seen
    assert not any(name == "authorization" for name, _ in seen)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert deny.seen[0].head.path == f"/{SERVICE}/Unary".encode()
    assert deny.seen[0].host == f"calls.localhost:{relay.port}".encode()


#: A gRPC server in its own process, so a test can kill it outright: its
#: C{Tick} method streams a message every 50 ms until the client leaves.
TICKER = """
import grpc, time
from concurrent import futures
def tick(request, context):
    i = 0
    while context.is_active():
        yield b"%d" % i
        i += 1
        time.sleep(0.05)
same = lambda b: b
handler = grpc.method_handlers_generic_handler("t.T", {"Tick": grpc.unary_stream_rpc_method_handler(tick, same, same)})
server = grpc.server(futures.ThreadPoolExecutor(4))
server.add_generic_rpc_handlers((handler,))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
server.wait_for_termination()
"""


@pytest_twisted.ensureDeferred
async def test_server_killed_mid_stream_ends_the_call(relay: Relay, agents: list[RunningAgent]) -> None:
    """
    When the local gRPC server is killed (SIGKILL: no GOAWAY, no
    RST_STREAM, its TCP connection just closes) in the middle of a
    server-streaming call, the visitor's call ends promptly with
    UNAVAILABLE or INTERNAL instead of hanging until its deadline.
    """
    import subprocess
    import sys

    server = subprocess.Popen([sys.executable, "-c", TICKER], stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None
        port = int(await inThread(server.stdout.readline))
        client = await _tunnel(relay, agents, port)
        stream = client.channel.unary_stream("/t.T/Tick", request_serializer=_identity, response_deserializer=_identity)
        replies = stream(b"", timeout=60)

        def readSome() -> list[bytes]:
            return [next(replies) for _ in range(5)]

        def readRest() -> tuple[Any, float]:
            start = time.monotonic()
            try:
                for _ in replies:
                    pass
            except grpc.RpcError as e:
                return e.code(), time.monotonic() - start
            return "ended OK", time.monotonic() - start

        try:
            assert await inThread(readSome) == [b"0", b"1", b"2", b"3", b"4"]
            server.kill()
            code, after = await inThread(readRest)
        finally:
            client.close()
        assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL), code
        assert after < 10.0, f"the call ended {after:.1f}s after the server died"
        print(f"server killed mid-stream: {code} after {after * 1000:.0f}ms")
    finally:
        server.kill()
        server.wait(10)


@pytest_twisted.ensureDeferred
async def test_oversized_message_is_resource_exhausted(
    relay: Relay, agents: list[RunningAgent], grpcServer: tuple[int, EchoService]
) -> None:
    """
    A request message over the local server's receive limit (grpcio's
    default, 4 MiB) crosses the tunnel and is refused by the server with
    RESOURCE_EXHAUSTED, status and details reaching the visitor; the
    channel still serves calls afterwards.
    """
    port, _ = grpcServer
    client = await _tunnel(relay, agents, port)

    def calls() -> tuple[Any, str, bytes]:
        with pytest.raises(grpc.RpcError) as caught:
            client.method("unary_unary", "Unary")(b"x" * (5 * 1024 * 1024), timeout=30)
        after = client.method("unary_unary", "Unary")(b"small", timeout=20)
        return caught.value.code(), caught.value.details(), after

    try:
        code, details, after = await inThread(calls)
    finally:
        client.close()
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
    assert "larger than max" in details
    assert after == b"echo:small"
