from twisted.application.service import ServiceMaker

tunnelAgent = ServiceMaker(
    "txtunnel agent",
    "txtunnel.agent.tap",
    "A txtunnel agent: dials out to a relay and serves its tunnels from local services.",
    "tunnelagent",
)
