"""
The agent: dials out to a relay and carries its streams to local services.
"""
