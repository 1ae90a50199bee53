"""The job file in OUT_DIR: what is finished, so a killed job resumes instead of starting over.

It is rewritten atomically after each finished step, and carries a fingerprint of the job's
inputs, so a rerun with other settings (or another model) into the same OUT_DIR is refused
instead of silently mixing two jobs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import JobMismatch, StreamSVDError
from ..io.fsutil import atomic_write_json

STATE_NAME = "streamsvd_state.json"


def fingerprint(job_identity: dict) -> str:
    return hashlib.sha256(json.dumps(job_identity, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class JobState:
    fingerprint: str
    blocks_done: int = 0  # blocks whose shard, spectra and next-block inputs are on disk
    inputs_file: str | None = None  # activation file holding the inputs of block `blocks_done`
    batch_size: int | None = None  # kept across a resume so results do not depend on interruptions
    extra_shard_done: bool = False
    complete: bool = False
    modules: dict = field(default_factory=dict)  # per-module record for the report

    @classmethod
    def open(cls, out_dir: Path, fp: str) -> "JobState":
        """The state of the job in out_dir, or a fresh one; refuses an OUT_DIR of another job."""
        path = Path(out_dir) / STATE_NAME
        if path.is_file():
            try:
                data = json.loads(path.read_text())
                state = cls(**data)
            except (ValueError, TypeError) as e:
                raise StreamSVDError(
                    f"{path} is not a streamsvd state file ({e})", "remove OUT_DIR or choose another OUT_DIR"
                ) from e
            if state.fingerprint != fp:
                raise JobMismatch(
                    f"{out_dir} holds a different streamsvd job (another model, text or settings)",
                    "choose a new OUT_DIR, or rerun with exactly the settings of the job in it, "
                    "or delete it to start over",
                )
            return state
        if Path(out_dir).exists() and not Path(out_dir).is_dir():
            raise StreamSVDError(f"OUT_DIR {out_dir} is a file", "choose a directory path for OUT_DIR")
        if Path(out_dir).exists() and any(Path(out_dir).iterdir()):
            raise StreamSVDError(
                f"{out_dir} exists, is not empty and holds no streamsvd job",
                "choose a new or empty OUT_DIR so nothing in it is overwritten",
            )
        return cls(fingerprint=fp)

    def save(self, out_dir: Path) -> None:
        atomic_write_json(Path(out_dir) / STATE_NAME, asdict(self))


def read_state(out_dir: Path) -> JobState | None:
    path = Path(out_dir) / STATE_NAME
    if not path.is_file():
        return None
    return JobState(**json.loads(path.read_text()))
