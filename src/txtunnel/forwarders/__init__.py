"""
The built-in forwarders: C{http}, C{tcp}, C{udp}, C{tls}, C{grpc},
C{websocket} and C{sse}.  Each is exposed as a plugin by
C{twisted/plugins/txtunnel_forwarders.py} and found with C{getPlugins}, as
a third party's would be; the requests of an C{http} tunnel go to the one
that claims them (L{txtunnel.plugins.requestForwarder}).  The core imports
these modules only for shared pieces: the relay's TLS listener uses
L{txtunnel.forwarders.tls}'s SNI router and the agent's options check UDP
idle timeouts against L{txtunnel.forwarders.udp}'s bound.
"""
