#!/usr/bin/env python3
"""Benchmark peer: peer_asyncio_upper.py's TransformProtocol on uvloop.

Run with an interpreter that has uvloop (../shared/bench/.venv/bin/python).
Prints "READY <port>" once listening.
"""

from __future__ import annotations

import sys

from peer_asyncio_upper import main

if __name__ == "__main__":
    sys.exit(main(default_loop="uvloop"))
