"""
Coverage-guided fuzzing of the HTTP/1.1 request framer with atheris.

Not collected by pytest (the name does not start with C{test_}); the
Hypothesis properties in C{tests/test_http1.py} run in the suite.  Run it
by hand, for as long as you like::

    pip install atheris
    python tests/fuzz_http1.py -max_total_time=300

The first byte of each input picks where the rest is cut into two feeds,
so split heads and bodies are explored too.  Anything the framer raises
other than L{HTTPError}, or a buffer that outgrows a head's worth, is a
crash atheris reports with the input that caused it.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from txtunnel.http1 import MAX_HEAD, HTTPError, RequestFramer


def fuzzOne(data: bytes) -> None:
    if not data:
        return
    cut = data[0] * len(data) // 256
    framer = RequestFramer()
    for piece in (data[1 : cut + 1], data[cut + 1 :]):
        try:
            framer.feed(piece)
        except HTTPError:
            return
        if len(framer._buf) > MAX_HEAD + len(piece):
            raise AssertionError(f"framer buffers {len(framer._buf)} bytes")


def main() -> None:
    atheris.Setup(sys.argv, fuzzOne)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
