from twisted.application.service import ServiceMaker

tunnelRelay = ServiceMaker(
    "txtunnel relay",
    "txtunnel.relay.tap",
    "A txtunnel relay: public listeners that hand traffic to connected agents.",
    "tunnelrelay",
)
