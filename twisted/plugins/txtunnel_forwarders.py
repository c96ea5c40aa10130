from txtunnel.plugins import LazyForwarder

http = LazyForwarder(
    "http",
    "txtunnel.forwarders.http.HTTPForwarder",
    "HTTP at NAME.<domain> on the relay's public HTTP(S) listeners",
)
tcp = LazyForwarder(
    "tcp",
    "txtunnel.forwarders.tcp.TCPForwarder",
    "raw TCP on a public port of the relay",
)
udp = LazyForwarder(
    "udp",
    "txtunnel.forwarders.udp.UDPForwarder",
    "UDP datagrams on a public port of the relay, one flow per remote address",
)
tls = LazyForwarder(
    "tls",
    "txtunnel.forwarders.tls.TLSForwarder",
    "TLS passthrough at NAME.<domain> on the relay's TLS port, routed by SNI",
)
grpc = LazyForwarder(
    "grpc",
    "txtunnel.forwarders.grpc.GRPCForwarder",
    "gRPC and HTTP/2 (h2c) services at NAME.<domain> on the relay's public HTTP(S) listeners",
)
websocket = LazyForwarder(
    "websocket",
    "txtunnel.forwarders.websocket.WebSocketForwarder",
    "WebSocket (Upgrade: websocket) at NAME.<domain> on the relay's public HTTP(S) listeners",
)
sse = LazyForwarder(
    "sse",
    "txtunnel.forwarders.sse.SSEForwarder",
    "server-sent events (text/event-stream) at NAME.<domain>, with a heartbeat between events",
)
