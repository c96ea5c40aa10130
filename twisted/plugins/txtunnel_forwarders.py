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
