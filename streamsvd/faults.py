"""Named fault points for the fault-injection test: `point("shard-written")` kills the process there.

Inactive unless the environment variable STREAMSVD_FAULT is set when streamsvd is imported, and then
`point` is one comparison; otherwise it returns at once (zero cost in normal runs).
STREAMSVD_FAULT=NAME:N sends SIGKILL to this process the N-th time (1-based) point NAME is reached,
exactly as a crash or an OOM kill would end it: no cleanup, no exception handlers, no flush.
STREAMSVD_FAULT=NAME:N:stop sends SIGSTOP instead (a job frozen mid-way, holding its locks).
Under torchrun every rank acts on it, unless STREAMSVD_FAULT_RANK=R names the one rank that does.
"""

from __future__ import annotations

import os
import signal

ENV = "STREAMSVD_FAULT"


def _parse(spec: str | None) -> tuple[str, int, int] | None:
    if not spec:
        return None
    name, _, rest = spec.partition(":")
    count, _, action = rest.partition(":")
    return name, int(count or 1), signal.SIGSTOP if action == "stop" else signal.SIGKILL


# STREAMSVD_FAULT_RANK=R: under torchrun, only rank R acts on STREAMSVD_FAULT (job/distributed.py); unset: every rank.
RANK_ENV = "STREAMSVD_FAULT_RANK"
_ACTIVE = _parse(os.environ.get(ENV)) if os.environ.get(RANK_ENV) in (None, os.environ.get("RANK", "0")) else None
_hits: dict[str, int] = {}


def point(name: str) -> None:
    if _ACTIVE is None or _ACTIVE[0] != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == _ACTIVE[1]:
        os.kill(os.getpid(), _ACTIVE[2])
