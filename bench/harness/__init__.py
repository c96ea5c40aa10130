"""
Helpers of the txtunnel benchmark harness (``bench/run.py``).
"""
