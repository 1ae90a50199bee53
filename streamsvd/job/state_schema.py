"""The schema of `streamsvd_state.json`: types, ranges, its own digest, consistency.

Anything off is one `StreamSVDError` saying what is wrong, with `--restart` as the fix: a state
file that does not pass is never trusted (a trusted wrong state is a silently wrong model) and never
a traceback. `is_own_debris` says which entries of an OUT_DIR without a state file streamsvd left
itself (a lock file, temporary files), so they never block a rerun.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import StreamSVDError

HEX64 = re.compile(r"^[0-9a-f]{64}$")
HEX_DIGEST = re.compile(r"^[0-9a-f]{16,128}$")
ACTIVATION_NAMES = ("acts-0.bin", "acts-1.bin")
MAX_BLOCKS = 100_000  # no decoder has more; bounds blocks_done when the model is not known yet
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


class StateError(StreamSVDError):
    pass


def _fail(path: Path, what: str) -> StateError:
    from .state import RESTART_FIX

    return StateError(f"the job state {path} {what}; it cannot be trusted", RESTART_FIX)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and v == v and v not in (float("inf"), float("-inf"))


def _safe_relpath(name) -> bool:
    if not isinstance(name, str) or not name or name.startswith("/") or "\\" in name or "\x00" in name:
        return False
    parts = name.split("/")
    return all(p not in ("", ".", "..") for p in parts) and len(parts) <= 2


def _check_module(path: Path, name, rec) -> None:
    if not isinstance(name, str) or not isinstance(rec, dict):
        raise _fail(path, f"has a module record that is not a name and an object ({name!r})")
    need = {"in_features": _is_int, "out_features": _is_int, "rank": _is_int, "input_group": lambda v: isinstance(v, str),
            "truncation_loss": _is_num, "cholesky_shift": _is_num,
            "form": lambda v: v in ("plain", "pivoted", "dense"), "stored_numel": _is_int}
    optional = {"output_error": lambda v: _is_num(v) and v >= 0,  # compensated jobs (math/compensate.py)
                "stored_bytes": lambda v: _is_int(v) and v >= 1,  # bytes of the stored factors (absent before quantisation)
                "precision": lambda v: v == "float32"}  # --precision float32 where kept (math/factorize.float32_trusted)
    if not set(need) <= set(rec) <= set(need) | set(optional):
        raise _fail(path, f"has a module record for {name} with keys {sorted(rec)}, not {sorted(need)}")
    for key, ok in {**need, **optional}.items():
        if key in rec and not ok(rec[key]):
            raise _fail(path, f"has {name}.{key} = {rec[key]!r}, which is not of the right type")
    if rec["in_features"] < 1 or rec["out_features"] < 1 or not 1 <= rec["rank"] <= min(rec["in_features"], rec["out_features"]):
        raise _fail(path, f"has impossible sizes for {name} ({rec['out_features']} x {rec['in_features']}, rank {rec['rank']})")
    if not 1 <= rec["stored_numel"] <= rec["in_features"] * rec["out_features"]:
        raise _fail(path, f"has an impossible stored size for {name} ({rec['stored_numel']})")
    if rec["truncation_loss"] < 0 or rec["cholesky_shift"] < 0:
        raise _fail(path, f"has a negative loss or shift for {name}")


def check_state(path: Path, n_layers: int | None = None, calib_samples: int | None = None):
    """Read and check the state file at `path`; return the JobState or raise StateError."""
    from .state import OPTIONAL_FIELDS, STATE_FIELDS, JobState

    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise _fail(path, f"cannot be read ({e.strerror or e})") from e
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise _fail(path, f"is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise _fail(path, f"is not a JSON object (it is a {type(data).__name__})")
    unknown = sorted(set(data) - STATE_FIELDS)
    if unknown:
        raise _fail(path, f"has unknown keys {', '.join(map(repr, unknown))}")
    missing = sorted(STATE_FIELDS - OPTIONAL_FIELDS - set(data))
    if missing:
        raise _fail(path, f"lacks keys {', '.join(missing)} (written by another streamsvd version, or cut short)")

    def check(key, ok, want):
        if not ok(data[key]):
            raise _fail(path, f"has {key} = {json.dumps(data[key])[:60]}, which is not {want}")

    check("fingerprint", lambda v: isinstance(v, str) and HEX64.match(v), "a 64-digit hex fingerprint")
    check("digest", lambda v: isinstance(v, str) and HEX64.match(v), "a 64-digit hex digest")
    limit = n_layers if n_layers is not None else MAX_BLOCKS
    check("blocks_done", lambda v: _is_int(v) and 0 <= v <= limit, f"a block count between 0 and {limit}")
    check("inputs_file", lambda v: v is None or v in ACTIVATION_NAMES, f"null or one of {', '.join(ACTIVATION_NAMES)}")
    check("inputs_digest", lambda v: v is None or (isinstance(v, str) and HEX_DIGEST.match(v)), "null or a hex digest")
    top = calib_samples if calib_samples is not None else 1 << 31
    check("batch_size", lambda v: v is None or (_is_int(v) and 1 <= v <= top), f"null or a batch size between 1 and {top}")
    for key in ("extra_shard_done", "complete"):
        check(key, lambda v: isinstance(v, bool), "true or false")
    for key in ("modules", "files", "weights", "model_files"):
        check(key, lambda v: isinstance(v, dict), "an object")
    if data.get("profile_digest") is not None:
        check("profile_digest", lambda v: isinstance(v, str) and HEX_DIGEST.match(v), "null or a hex digest")
    if data.get("settings") is not None:
        check("settings", lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v), "an object")
    for name, rec in data["modules"].items():
        _check_module(path, name, rec)
    for name, rec in data["files"].items():
        if not _safe_relpath(name):
            raise _fail(path, f"names the file {name!r}, which is not a file streamsvd writes inside OUT_DIR")
        if not (isinstance(rec, dict) and set(rec) == {"size", "sha256"} and _is_int(rec["size"]) and rec["size"] >= 0
                and isinstance(rec["sha256"], str) and HEX64.match(rec["sha256"])):
            raise _fail(path, f"has a malformed checksum record for {name}")
    for key, digest in data["weights"].items():
        if not (key == "extra" or key.isdigit()) or not (isinstance(digest, str) and HEX_DIGEST.match(digest)):
            raise _fail(path, f"has a malformed weight digest for {key!r}")
        if key.isdigit() and int(key) >= data["blocks_done"]:
            raise _fail(path, f"records the weights of block {key}, beyond the {data['blocks_done']} finished")
    for name, stat in data["model_files"].items():
        if not (_safe_relpath(name) and isinstance(stat, list) and len(stat) == 3 and all(_is_int(x) and x >= 0 for x in stat)):
            raise _fail(path, f"has a malformed model file record for {name!r}")

    state = JobState(**data)
    if state.content_digest() != state.digest:
        raise _fail(path, "does not match its own digest (it was edited by hand, or damaged)")

    # Consistency.
    if (state.inputs_file is None) != (state.inputs_digest is None):
        raise _fail(path, "names an activation file without its checksum, or a checksum without a file")
    if state.complete and (not state.extra_shard_done or (n_layers is not None and state.blocks_done != n_layers)):
        raise _fail(path, f"says complete with {state.blocks_done} of {n_layers} blocks done")
    blocks_with_records = set()
    for name in state.modules:
        m = _LAYER_INDEX.search(name)
        if m is None:
            raise _fail(path, f"has a module record {name!r} outside the decoder blocks")
        blocks_with_records.add(int(m.group(1)))
    if blocks_with_records != set(range(state.blocks_done)):
        raise _fail(path, f"says {state.blocks_done} blocks are done but has module records for blocks "
                          f"{sorted(blocks_with_records)}")
    return state


def is_own_debris(path: Path) -> bool:
    """Entries a killed streamsvd can leave in OUT_DIR before its state file exists."""
    from .lock import LOCK_NAME

    name = Path(path).name
    if name == LOCK_NAME or (name.startswith(".") and ".tmp-" in name):
        return Path(path).is_file()
    if name in ("spectra", ".streamsvd-work") and Path(path).is_dir():
        return all(is_own_debris(p) or p.name.startswith("acts-") for p in Path(path).iterdir())
    if _RANK_FOLDER.fullmatch(name) and Path(path).parent.name == ".streamsvd-work" and Path(path).is_dir():
        # a torchrun rank's work folder (distributed.work_folder): its lock can be taken before rank 0 saves the state
        return all(is_own_debris(p) or p.name.startswith("acts-") for p in Path(path).iterdir())
    return False


_RANK_FOLDER = re.compile(r"rank-\d+-of-\d+")
