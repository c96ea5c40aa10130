"""
The relay: public listeners, the router, and the agents' links.
"""
