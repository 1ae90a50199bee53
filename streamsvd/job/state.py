"""The job file in OUT_DIR: what is finished, so a killed job resumes instead of starting over.

It is rewritten atomically after each finished step, and carries a fingerprint of the job's
inputs, so a rerun with other settings (or another model) into the same OUT_DIR is refused
instead of silently mixing two jobs. It is read against a schema (`job.state_schema`): a damaged or
hand-edited file (its own digest no longer matches) is refused with one `error:` line naming
`--restart`, never trusted and never a traceback.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..errors import JobMismatch, StreamSVDError
from ..io.fsutil import atomic_write_json

STATE_NAME = "streamsvd_state.json"
RESTART_FIX = "run the same command with --restart to remove streamsvd's files from OUT_DIR and start over"
# Under torchrun only rank 0 writes OUT_DIR (job/distributed.py); the other ranks keep the same state in memory.
_writes = True


def set_writer(writes: bool) -> None:
    global _writes
    _writes = writes


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
    # blake2b of the whole of `inputs_file`, recorded after it was written and fsynced; an activation
    # file is trusted only when it matches (job.scratch).
    inputs_digest: str | None = None
    # OUT_DIR file (relative path) -> {"size", "sha256"}, recorded as each file is written (verify).
    files: dict = field(default_factory=dict)
    # "extra" or a block index -> digest of the checkpoint tensors it was computed from (identity).
    weights: dict = field(default_factory=dict)
    # MODEL_DIR shard -> [size, mtime_ns, inode] when the job last checked its weights.
    model_files: dict = field(default_factory=dict)
    digest: str | None = None  # sha256 of everything above: a hand edit or a torn write is detected
    # The job identity itself (what `fingerprint` hashes), so a refused rerun can name what differs.
    # Absent from states written before it existed; left out of the digest while absent, so those still verify.
    settings: dict | None = None
    # The digest of the profile a job made for itself (OUT_DIR/profile), recorded once it is made: its ranks come
    # from it, so a resume refuses a profile that changed since (the identity can only say "own" before it exists).
    profile_digest: str | None = None

    def content_digest(self) -> str:
        data = {k: v for k, v in asdict(self).items() if k != "digest" and not (k in OPTIONAL_FIELDS and v is None)}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    @classmethod
    def open(cls, out_dir: Path, fp: str, n_layers: int | None = None, calib_samples: int | None = None,
             restart: bool = False, settings: dict | None = None) -> "JobState":
        """The state of the job in out_dir, or a fresh one; refuses an OUT_DIR of another job.

        With `restart`, whatever is there is not read: a fresh state (the caller removes the old files).
        """
        from .state_schema import check_state, is_own_debris

        out_dir = Path(out_dir)
        path = out_dir / STATE_NAME
        if out_dir.exists() and not out_dir.is_dir():
            raise StreamSVDError(f"OUT_DIR {out_dir} is a file", "choose a directory path for OUT_DIR")
        if path.exists() and not restart:
            state = check_state(path, n_layers=n_layers, calib_samples=calib_samples)
            if state.fingerprint != fp and not _predates(state, settings):
                raise JobMismatch(f"{out_dir} holds a different streamsvd job ({mismatch(state.settings, settings)})",
                                  mismatch_fix(state.settings, settings))
            if state.settings is None and settings is not None:
                state.settings = settings  # recorded from now on (the state is saved after each step)
            return state
        if not restart and not path.exists() and out_dir.is_dir() and not all(is_own_debris(p) for p in out_dir.iterdir()):
            raise StreamSVDError(
                f"{out_dir} exists, is not empty and holds no streamsvd job",
                "choose a new or empty OUT_DIR so nothing in it is overwritten",
            )
        return cls(fingerprint=fp, settings=settings)

    def save(self, out_dir: Path) -> None:
        self.digest = self.content_digest()
        if not _writes:
            return
        atomic_write_json(Path(out_dir) / STATE_NAME, asdict(self))


STATE_FIELDS = {f.name for f in fields(JobState)}
OPTIONAL_FIELDS = {"settings", "profile_digest"}  # may be absent (older states); all others must be there

# Identity keys -> how a user sets them; keys absent from an identity are at their old default.
_FLAGS = {"ratio": "--ratio", "method": "--method", "calib_samples": "--calib-samples", "seqlen": "--seqlen",
          "seed": "--seed", "propagate": "--propagate", "act_dtype": "--act-dtype", "svd": "--svd",
          "factors": "--factors", "calibrate": "--calibrate", "anchor": "--anchor", "alloc": "--alloc",
          "rank_multiple": "--rank-multiple", "max_loss": "--max-loss", "alloc_floor": "--alloc-floor", "shrink": "--shrink",
          "processes": "torchrun --nproc-per-node", "precision": "--precision",
          "profile_samples": "--profile-samples"}
_ABSENT = {"precision": "float64", "factors": "plain", "calibrate": "block", "compensate": False, "anchor": 0.0, "refine": [0, None],
           "alloc": "uniform", "rank_multiple": 1, "alloc_floor": 0.0, "shrink": 0.0, "max_loss": None, "profile": None, "quant": None,
           "processes": 1, "profile_samples": "all"}
_WHAT = {"checkpoint": "another model or checkpoint files", "calib_digest": "another calibration text",
         "windows_digest": "other calibration tokens from the same text: another tokenizer in MODEL_DIR",
         "version": "another streamsvd version", "profile": "another --profile",
         "made_by": "it is the output of `streamsvd quantize`, which a run does not resume"}


# Identity keys that a state recorded before they existed lacks: such a state resumes when everything else matches
# (`_predates`), as it did before, under the fingerprint it has.
_LATER_KEYS = ("windows_digest",)


def _predates(state: "JobState", settings: dict | None) -> bool:
    """Whether `state` is this job's, recorded before the identity gained _LATER_KEYS: its fingerprint is that of
    `settings` (this job's identity) without them."""
    if settings is None or not set(_LATER_KEYS) & set(settings):
        return False
    return state.fingerprint == fingerprint({k: v for k, v in settings.items() if k not in _LATER_KEYS})


def _differences(old: dict, new: dict) -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, _ABSENT.get(key)), new.get(key, _ABSENT.get(key))
        if a == b:
            continue
        if key in _LATER_KEYS and (key not in old or key not in new):
            continue  # a state from before the key: it does not say
        if key == "windows_digest" and any(old.get(k) != new.get(k) for k in ("calib_digest", "calib_samples", "seqlen", "seed")):
            continue  # other windows because of a setting the message names already
        if key == "profile" and "own" in (a, b) and None in (a, b):
            continue  # a job that profiles for itself against one that needs no profile: the --alloc line says it
        if key in _WHAT:
            out.append(_WHAT[key])
        elif key == "compensate":
            out.append(f"it was {'--compensate' if a else '--no-compensate'}, now {'--compensate' if b else '--no-compensate'}")
        elif key == "quant":
            out.append(f"it was {_quant_flags(a)}, now {_quant_flags(b)}")
        elif key == "refine":
            out.append(f"it was {_refine_flags(a)}, now {_refine_flags(b)}")
        elif key == "processes":
            out.append(f"it was {_processes(a)}, now {_processes(b)}")
        else:
            flag = _FLAGS.get(key, key)
            out.append(f"it was {_with(flag, a)}, now {b if b is not None else 'without ' + flag}")
    return out


def _processes(n) -> str:
    return "one process (no torchrun)" if n == 1 else f"torchrun --nproc-per-node {n}"


def _with(flag: str, value) -> str:
    """`--flag value`, or `without --flag` for a setting not given (None, which read as `--max-loss None`)."""
    return f"without {flag}" if value is None else f"{flag} {value}"


def _refine_flags(refine) -> str:
    if not refine or not refine[0]:
        return "without --refine-steps"
    return f"--refine-steps {refine[0]} --refine-lr {refine[1]}"


def _quant_flags(q: dict | None) -> str:
    if not q:
        return "without --quant"
    return f"--quant int{q.get('num_bits')} --group-size {q.get('group_size')} --quant-rounding {q.get('rounding')}"


def mismatch(old: dict | None, new: dict | None) -> str:
    """What differs between the identity of the job in OUT_DIR and this one, in flags a user knows."""
    if old is None or new is None:
        return "another model, text or settings"
    return "; ".join(_differences(old, new)) or "other settings"


def mismatch_fix(old: dict | None, new: dict | None) -> str:
    fix = ("choose a new OUT_DIR, or rerun with the settings of the job in it, "
           "or add --restart to remove that job's files and start over")
    if old is None and new is not None and {"calibrate", "compensate", "anchor"} & set(new):
        # A state from before the state recorded its settings, i.e. before compensation became the default.
        fix += ("; a job started by streamsvd before compensation was the default resumes with "
                "--no-compensate --calibrate block --anchor 0")
    return fix


def read_state(out_dir: Path, strict: bool = True) -> JobState | None:
    """The state in out_dir (checked against the schema), None if there is none.

    Not strict: None also for a state that does not pass the schema (callers that only want a hint).
    """
    from .state_schema import check_state

    path = Path(out_dir) / STATE_NAME
    if not path.exists():
        return None
    try:
        return check_state(path)
    except StreamSVDError:
        if strict:
            raise
        return None
