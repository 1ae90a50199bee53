"""Memory sizes and the batch size that fits a budget (a soft estimate until the planner lands)."""

from __future__ import annotations

import re

import psutil

from ..errors import StreamSVDError

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
# torch, transformers and Python themselves, measured as the RSS of an idle imported process.
BASELINE_BYTES = 600 << 20


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


def per_sample_bytes(seqlen: int, hidden: int, intermediate: int, heads: int, compute_bytes: int = 4) -> int:
    """Peak bytes one calibration sample adds inside one block forward (activations, scores, hooks)."""
    per_token = 8 * hidden + 4 * intermediate + heads * seqlen
    return seqlen * per_token * compute_bytes


def choose_batch_size(budget: int, fixed: int, per_sample: int, samples: int) -> int:
    room = budget - BASELINE_BYTES - fixed
    if room < per_sample:
        need = BASELINE_BYTES + fixed + per_sample
        raise StreamSVDError(
            f"--max-mem {format_size(budget)} is too small: one block needs about {format_size(need)}",
            f"give --max-mem at least {format_size(need)}, or lower --seqlen",
        )
    return max(1, min(samples, room // per_sample))
