"""Whether a launcher (torchrun) started this process as one of several, read from the environment alone: no torch,
so `streamsvd --help`, `verify` and a refused flag answer without importing it (job/distributed.py has the rest)."""

from __future__ import annotations

import os


def launched_distributed() -> bool:
    """Whether torchrun (or another launcher setting RANK and WORLD_SIZE) started more than one process."""
    return env_world()[1] > 1


def env_world() -> tuple[int, int]:
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except ValueError:
        return 0, 1
