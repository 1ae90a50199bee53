"""`streamsvd verify OUT_DIR`: every file the job recorded, checked for size, header and contents.

The job records each file's size and sha256 in its state as it writes it (shards and spectra as
blocks finish, the rest when it finishes, the index last). Verify reads them all back; `run` on a
finished job makes the same check (job/integrity.reopen_if_damaged) and redoes what fails.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError, StreamSVDError
from ..io.safetensors_header import INDEX_NAME, read_safetensors_header
from ..io.checksums import file_sha256
from .state import STATE_NAME, read_state


# In a quantize output's settings: its source was read with --no-verify (its files as found, a changed byte included).
SOURCE_UNCHECKED = "source_unchecked"


def source_unchecked_note(path: Path, state) -> str | None:
    """What verify and load say of an output `streamsvd quantize --no-verify` made: its files check out, but they were
    made from files nobody checked."""
    if state is None or not (state.settings or {}).get(SOURCE_UNCHECKED):
        return None
    return (f"{path} was quantised from an output read without its sha256 check (quantize --no-verify): its files are "
            "as quantize wrote them, which is only as sound as that output was")


def verify(out_dir: Path, deep: bool = True) -> dict:
    """OUT_DIR's files against what its job recorded (held against a `run` rewriting it meanwhile, which made every
    file it had not yet rewritten look damaged)."""
    from .lock import reading_output

    with reading_output(Path(out_dir)):
        return _verify(Path(out_dir), deep)


def _verify(out_dir: Path, deep: bool) -> dict:
    if not out_dir.is_dir():
        raise StreamSVDError(f"{out_dir} is not a directory", "give the OUT_DIR of a streamsvd run")
    state = read_state(out_dir)
    if state is None:
        raise StreamSVDError(
            f"{out_dir} holds no streamsvd job state ({STATE_NAME})",
            "verify checks streamsvd outputs against what the job recorded; give the OUT_DIR of a streamsvd run",
        )
    damaged = [{"file": name, "problem": problem}
               for name, problem in output_problems(out_dir, state.files, deep)]
    if state.complete and INDEX_NAME not in state.files:
        damaged.append({"file": INDEX_NAME, "problem": "not recorded by the job"})
    return {
        "out_dir": str(out_dir),
        "complete": state.complete,
        "blocks_done": state.blocks_done,
        "files_checked": len(state.files),
        "damaged": damaged,
        "files_ok": not damaged,
        # a usable model: every recorded file as written, and the job finished (an unfinished one's files can all
        # check out while most of the model is missing, so `verify OUT && deploy` must not pass it)
        "ok": not damaged and state.complete,
        "fix": (problems_fix(out_dir, state, [(d["file"], d["problem"]) for d in damaged]) if damaged else
                None if state.complete else unfinished_fix(state)),
        "note": source_unchecked_note(out_dir, state),
        "made_by": "quantize" if made_by_quantize(state) else "run",
    }


def made_by_quantize(state) -> bool:
    """Whether the output was written by `streamsvd quantize` (job/quantize_output.py), not by a run."""
    return state is not None and (state.settings or {}).get("made_by") == "quantize"


def damaged_fix(state) -> str:
    """The fix line for damaged files: a run redoes them itself; a quantize output is made again from its source."""
    if made_by_quantize(state):
        return ("remove that directory and run the same `streamsvd quantize OUT_DIR NEW_DIR ...` command again "
                "(`streamsvd verify` lists the damaged files)")
    return ("run the same `streamsvd run MODEL_DIR OUT_DIR ...` command again: it redoes the damaged files "
            "(`streamsvd verify OUT_DIR` lists them)")


def unfinished_fix(state) -> str:
    """The fix line for an unfinished output: a run resumes; a stopped quantize is made again (it starts over)."""
    if made_by_quantize(state):
        return "run the same `streamsvd quantize OUT_DIR NEW_DIR ...` command again: it starts this directory over"
    return "run the same `streamsvd run` command again: it resumes and finishes the job"


def stray_weights(out_dir: Path, files: dict[str, dict]) -> list[tuple[str, str]]:
    """(name, problem) for a model.safetensors the job did not write: transformers and the checkpoint reader load it in
    place of the index's shards, so a stray copy of the original weights was evaluated as the output (its perplexity
    exactly the original's) while `verify` said ok (a probe, 2026-12-07)."""
    from ..io.safetensors_header import SINGLE_NAME

    if SINGLE_NAME in files or not (Path(out_dir) / SINGLE_NAME).exists():
        return []
    return [(SINGLE_NAME, "not written by the job, and read in place of its shards by transformers and streamsvd: "
                          "remove it")]


def output_problems(out_dir: Path, files: dict[str, dict], deep: bool = True) -> list[tuple[str, str]]:
    """What a reader of a finished output checks (verify, load, eval, export, quantize): the recorded files
    (check_files), and no model.safetensors read in their place (stray_weights). A run's repair uses check_files
    alone: it redoes recorded files, and a stray file is not one of them."""
    return check_files(out_dir, files, deep) + stray_weights(out_dir, files)


def problems_fix(out_dir: Path, state, problems: list[tuple[str, str]]) -> str:
    """The fix line for `problems`: removing a stray model.safetensors (a rerun leaves it there), else damaged_fix."""
    from ..io.safetensors_header import SINGLE_NAME

    if [name for name, _ in problems] == [SINGLE_NAME] and SINGLE_NAME not in state.files:
        return f"remove {Path(out_dir) / SINGLE_NAME}: a streamsvd output is its index and shards, never one model.safetensors"
    return damaged_fix(state)


def check_files(out_dir: Path, files: dict[str, dict], deep: bool = True) -> list[tuple[str, str]]:
    """(name, problem) for each recorded file that is missing, of another size, with a bad safetensors header, or
    (`deep`) whose sha256 differs from the recorded one; in name order. `run` on a finished job uses the same."""
    problems = ((name, _check(Path(out_dir) / name, files[name], deep)) for name in sorted(files))
    return [(name, problem) for name, problem in problems if problem]


def _check(path: Path, record: dict, deep: bool) -> str | None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    if size != record["size"]:
        return f"size {size}, recorded {record['size']}"
    if path.suffix == ".safetensors":
        try:
            read_safetensors_header(path)
        except CheckpointError as e:
            return f"bad safetensors header ({e.problem})"
    if deep:
        try:
            digest = file_sha256(path)
        except OSError as e:
            return f"unreadable ({e.strerror or e})"
        if digest != record["sha256"]:
            return "contents differ from what was written (sha256 mismatch)"
    return None
