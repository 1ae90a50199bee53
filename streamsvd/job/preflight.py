"""Checks that can refuse a job, run before OUT_DIR is created or touched.

A refusal after the first write leaves debris (a half-made OUT_DIR) that makes the corrected rerun
refuse in turn; so everything that can be checked up front is checked here: where OUT_DIR and the
work directory go (a file in the way, a read-only filesystem, no write permission), and whether
MODEL_DIR or OUT_DIR is itself a streamsvd output that cannot be used that way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import StreamSVDError
from ..io.fsutil import within


def _nearest_existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not os.path.lexists(path):
        path = path.parent
    return path


def check_can_create(path: Path, what: str, flag_fix: str) -> None:
    """`path` is (or can be made) a directory this process can write into."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise StreamSVDError(f"{what} {path} is a file, not a directory", flag_fix)
    base = _nearest_existing(path)
    if not base.is_dir():
        kind = "a link to nothing" if base.is_symlink() and not base.exists() else "a file, not a directory"
        raise StreamSVDError(f"{what} {path} cannot be created: {base} is {kind}", flag_fix)
    try:
        read_only = bool(os.statvfs(base).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        raise StreamSVDError(f"{what} {path} is on a read-only filesystem ({base})", flag_fix)
    if not os.access(base, os.W_OK | os.X_OK):
        raise StreamSVDError(f"no permission to write in {base} (for {what} {path})",
                             f"{flag_fix}, or give yourself write permission there")


def streamsvd_section(model_dir: Path) -> bool:
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "streamsvd" in config


def check_original(model_dir: Path, fix: str = "compress the original checkpoint (streamsvd does not compress its "
                   "own low-rank factors again)") -> None:
    """MODEL_DIR must be an original checkpoint, not a streamsvd OUT_DIR (finished or not); run, plan and profile."""
    from .state import STATE_NAME

    if streamsvd_section(model_dir) or (Path(model_dir) / STATE_NAME).exists():
        raise StreamSVDError(f"MODEL_DIR {model_dir} is a streamsvd output, not an original checkpoint", fix)


def check_paths(model_dir: Path, out_dir: Path, work_dir: Path | None, restart: bool = False) -> None:
    """Everything about the job's places that can refuse it; writes nothing."""
    from .state import STATE_NAME

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_original(model_dir)
    if out_dir.exists() and model_dir.resolve() == out_dir.resolve():
        raise StreamSVDError(f"OUT_DIR {out_dir} is MODEL_DIR", "choose a new, empty directory for OUT_DIR")
    if within(out_dir, model_dir):
        raise StreamSVDError(f"OUT_DIR {out_dir} is inside MODEL_DIR {model_dir}",
                             "choose a directory outside the checkpoint's for OUT_DIR (the checkpoint stays as it came)")
    if not restart and out_dir.is_dir() and not (out_dir / STATE_NAME).exists() and streamsvd_section(out_dir):
        raise StreamSVDError(
            f"OUT_DIR {out_dir} holds a streamsvd output whose job state ({STATE_NAME}) is gone",
            "add --restart to remove streamsvd's files there and compress again, or choose a new OUT_DIR",
        )
    check_can_create(out_dir, "OUT_DIR", "choose an OUT_DIR in a directory you can write to")
    if work_dir is not None and within(work_dir, out_dir):
        # its folder was made there before OUT_DIR's check refused the job, and then blocked the corrected rerun
        raise StreamSVDError(f"--work-dir {work_dir} is OUT_DIR or inside it",
                             "leave --work-dir out (the activations then go to a folder inside OUT_DIR that the job "
                             "removes), or give a directory outside OUT_DIR")
    if work_dir is not None and within(work_dir, model_dir):
        # a killed job's activation files stay there, in the checkpoint (eval refused it already; a probe, 2026-12-07)
        raise StreamSVDError(f"--work-dir {work_dir} is MODEL_DIR or inside it",
                             "give a directory outside the checkpoint's (it stays as it came), or leave --work-dir out")
    if work_dir is not None:
        check_can_create(work_dir, "--work-dir", "give --work-dir a directory you can write to (or leave it out)")
