"""Where a job's time goes inside its stages: seconds spent in named kinds of work, per process.

The stages (`job/peak.py`) say when the job was collecting statistics or propagating; this says how
much of that was the statistics' arithmetic (`accumulate`), the activation files (`activation io`)
and the checkpoint's weight reads with their checksums (`read`, io/checkpoint.py) rather than the
block's forward pass. `charged(name)` adds the wall time of its body to `SECONDS[name]`; it costs
two clock reads, and it is used once per batch or per tensor read, never per element.
`tools/bench_speed.py` and `tools/bench_scale.py` read the split from a job's figures.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

SECONDS: defaultdict[str, float] = defaultdict(float)


@contextlib.contextmanager
def charged(name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        SECONDS[name] += time.perf_counter() - start


def snapshot() -> dict[str, float]:
    return dict(SECONDS)


def since(before: dict[str, float]) -> dict[str, float]:
    """Seconds per kind of work since `before` (a snapshot), rounded for a report."""
    return {k: round(v - before.get(k, 0.0), 3) for k, v in sorted(SECONDS.items()) if v - before.get(k, 0.0) > 0}
