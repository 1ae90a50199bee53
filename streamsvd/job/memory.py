"""Memory sizes (parse and print) and the default budget. The budget itself is planned in job/plan.py."""

from __future__ import annotations

import re

import psutil

from ..errors import StreamSVDError

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'24G', '512M', '24GiB', '1.5G' or plain bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise StreamSVDError(f"cannot read the size {text!r}", "write it like 24G, 512M or 1.5G")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def default_budget() -> int:
    return int(psutil.virtual_memory().available * 0.75)


def format_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)
