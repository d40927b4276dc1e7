"""The intra-op thread count of every test process and spawned rank.

One thread by default: faster on 2 shared cores, and one reduction order. CI's second
numerics pass sets ``TURNOUT_TEST_THREADS=2`` so that ops that split a reduction across
threads take another order (a user's machine has more cores than CI).
"""

from __future__ import annotations

import os


def intra_op_threads() -> int:
    value = os.environ.get("TURNOUT_TEST_THREADS", "1")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"TURNOUT_TEST_THREADS must be a positive integer, got {value!r}")
    return int(value)
