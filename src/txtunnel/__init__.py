"""
txtunnel: a self-hostable reverse tunnel on Twisted.

A relay runs on a public host; an agent runs beside a private service, dials
out to the relay and receives the public traffic over that one link.
"""

__version__ = "0.1.0"
