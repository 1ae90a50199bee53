"""`streamsvd quantize OUT_DIR NEW_DIR`: the factors of a finished output, quantised, into a new directory.

One shard in memory at a time. Each compressed linear's factor tensors go through the same
`quantize_module_tensors` as `run --quant` (round-to-nearest per group, so no calibration is
needed); every other tensor and file is copied as it is. NEW_DIR gets the config with a
`quantization` entry in its streamsvd section, a fresh index, and the report with the new byte
counts. It gets a job state too (where OUT_DIR has one): unfinished from the start, so a NEW_DIR a kill left is
named as such (and a quantize into it starts it over), then finished, recording every file's size and sha256 as a run's does, so
`streamsvd verify`, load, eval and export check it; that state's identity is the source's with the
quantisation and `made_by: quantize`, so `run` into NEW_DIR is refused as another job.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import StreamSVDError
from ..io.checksums import file_record
from ..io.fsutil import (atomic_path, atomic_write_bytes, atomic_write_json, file_in_the_way, holds_only_temporaries_of,
                         within)
from ..io.output import INDEX_NAME, REPORT_JSON, REPORT_MD, RUN_LOG, markdown_report
from ..math.quantize import DEFAULT_GROUP_SIZE, QuantSpec, quantize_module_tensors
from ..model.loading import pivots_checked, check_finished, is_streamsvd_output
from ..model.remote import MODELING_FILE, modeling_source
from .pipeline import WORK_DIR_NAME, check_quant_flags
from .state import STATE_NAME, JobState, fingerprint, read_state
from .lock import LOCK_NAME, entries_besides_lock
from .stages import linear_bytes
from .verify import SOURCE_UNCHECKED

_NOT_COPIED = {STATE_NAME, RUN_LOG, INDEX_NAME, "config.json", REPORT_JSON, REPORT_MD, WORK_DIR_NAME, MODELING_FILE}


def quantize_output(out_dir: Path, new_dir: Path, quant: str | None, group_size: int | None, verify: bool = True) -> dict:
    """Write NEW_DIR and return its report (with the byte counts before and after), NEW_DIR locked meanwhile."""
    from .lock import destination_lock, reading_output

    with destination_lock(Path(new_dir), "NEW_DIR"), reading_output(Path(out_dir)):
        return _quantize_output(out_dir, new_dir, quant, group_size, verify)


def _quantize_output(out_dir: Path, new_dir: Path, quant: str | None, group_size: int | None, verify: bool) -> dict:
    check_quant_flags(quant, group_size)
    if quant is None:
        raise StreamSVDError("streamsvd quantize needs --quant", "add --quant int8 or --quant int4")
    spec = QuantSpec(quant, group_size or DEFAULT_GROUP_SIZE)
    out_dir, new_dir = Path(out_dir), Path(new_dir)
    if not out_dir.is_dir():
        raise StreamSVDError(f"{out_dir} does not exist or is not a directory", "give the OUT_DIR of a finished `streamsvd run`")
    source_state = check_finished(out_dir, verify)  # first: an unfinished job is named as one, a damaged output as one
    if not is_streamsvd_output(out_dir) or not (out_dir / INDEX_NAME).is_file():
        raise StreamSVDError(f"{out_dir} is not a finished streamsvd output (no streamsvd config section or no index)",
                             "give the OUT_DIR of a finished `streamsvd run`")
    config = json.loads((out_dir / "config.json").read_text())
    section = config["streamsvd"]
    if section.get("quantization"):
        raise StreamSVDError(f"{out_dir} is already quantised ({section['quantization']['num_bits']} bits)",
                             "quantise the unquantised output it was made from")
    # what a killed quantize left there (also only its first state write's temporary): made again from the start
    stopped = stopped_quantize(new_dir) or holds_only_temporaries_of(new_dir, [STATE_NAME])
    if new_dir.resolve() == out_dir.resolve() or (new_dir.exists() and not stopped
                                                  and (not new_dir.is_dir() or entries_besides_lock(new_dir))):
        raise StreamSVDError(f"{new_dir} is not a new or empty directory", "give a new directory for the quantised output")
    blocker = file_in_the_way(new_dir)
    if blocker is not None:
        raise StreamSVDError(f"{new_dir} cannot be made: {blocker} is not a directory", "give a new directory for the quantised output")
    if within(new_dir, out_dir):  # the copy of OUT_DIR's folders copied NEW_DIR into itself
        raise StreamSVDError(f"{new_dir} is inside the streamsvd output {out_dir}", "give a directory outside it")
    if within(out_dir, new_dir):  # a stopped quantize's NEW_DIR is emptied below: with OUT_DIR in it (a probe, 12-07)
        raise StreamSVDError(f"the streamsvd output {out_dir} is inside NEW_DIR {new_dir}", "give a NEW_DIR outside it")
    if stopped:
        for child in entries_besides_lock(new_dir):
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    new_dir.mkdir(parents=True, exist_ok=True)
    if not verify:
        print(f"warning: {out_dir}'s files are read without their sha256 check (--no-verify): {new_dir} is only as sound "
              f"as they are, and its state says so (`streamsvd verify {out_dir}` checks them)", file=sys.stderr)
    if source_state is not None:  # first: a NEW_DIR a kill leaves is named as an unfinished quantize, not as no output
        fp, settings = _identity(source_state, spec, verify)
        JobState(fingerprint=fp, settings=settings).save(new_dir)

    index = json.loads((out_dir / INDEX_NAME).read_text())
    modules = list(section.get("ranks", {}))
    shards = sorted(set(index["weight_map"].values()))
    stored_bytes: dict[str, int] = {}
    weight_map, total = {}, 0
    for shard in shards:
        with safe_open(str(out_dir / shard), framework="pt", device="cpu") as f:
            # pivots that are a permutation, tensors of the right kind: what streamsvd.load checks (with --no-verify a
            # changed pivot was quantised into a NEW_DIR that verify passed and load refused, remade the same by a rerun)
            get = pivots_checked(f.get_tensor, out_dir)
            tensors = {k: get(k) for k in f.keys()}
        for full in modules:
            own = {k: v for k, v in tensors.items() if k.startswith(full + ".")}
            if not own:
                continue
            packed = quantize_module_tensors(own, full, spec)
            for key in own:
                del tensors[key]
            tensors.update(packed)
            stored_bytes[full] = linear_bytes(packed, full)
        with atomic_path(new_dir / shard) as tmp:
            save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(tmp), metadata={"format": "pt"})
            tmp.chmod(0o644)
        for k, v in tensors.items():
            weight_map[k] = shard
            total += v.numel() * v.element_size()
        del tensors
    missing = [m for m in modules if m not in stored_bytes]
    if missing:
        raise StreamSVDError(f"{out_dir} has no tensors for {missing[0]}", "the output is damaged; rerun the `streamsvd run` that made it")

    for src in sorted(out_dir.iterdir()):
        if src.name in _NOT_COPIED or src.name in shards or src.name.startswith("."):
            continue
        if src.is_dir():
            shutil.copytree(src, new_dir / src.name)
        elif src.is_file():
            shutil.copyfile(src, new_dir / src.name)

    # This version's remote code, not OUT_DIR's: an output made before the remote code read quantised factors
    # (2026-11-25 to 12-03) gave NEW_DIR a reader that refuses NEW_DIR's own shards.
    atomic_write_bytes(new_dir / MODELING_FILE, modeling_source())
    section["quantization"] = spec.section()
    atomic_write_json(new_dir / "config.json", config)
    report = _report(out_dir, spec, stored_bytes)
    if report is not None:
        atomic_write_json(new_dir / REPORT_JSON, report)
        atomic_write_bytes(new_dir / REPORT_MD, markdown_report(report).encode())
    body = {"metadata": {"total_size": total}, "weight_map": weight_map}
    index_bytes = (json.dumps(body, indent=2, sort_keys=True) + "\n").encode()
    if source_state is not None:  # an output whose state was removed has nothing to check NEW_DIR's files against
        _state(source_state, spec, new_dir, index_bytes, stored_bytes, verify).save(new_dir)
    atomic_write_bytes(new_dir / INDEX_NAME, index_bytes)  # last: a NEW_DIR without it is no model
    return report or {}


def stopped_quantize(new_dir: Path) -> bool:
    """Whether `new_dir` holds what a `streamsvd quantize` that did not finish left: its unfinished state, or its
    finished state without the index (written after the state, last: a kill between the two)."""
    from .verify import made_by_quantize

    state = read_state(new_dir, strict=False) if Path(new_dir).is_dir() else None
    if state is None or not made_by_quantize(state):
        return False
    return not state.complete or not (Path(new_dir) / INDEX_NAME).exists()


def _identity(source: JobState, spec: QuantSpec, verified: bool = True) -> tuple[str, dict]:
    """NEW_DIR's job identity: the source job's settings with the quantisation and `made_by` (and `source_unchecked`
    after --no-verify: verify and load say so), and its fingerprint."""
    settings = {**(source.settings or {}), "quant": spec.section(), "made_by": "quantize",
                **({} if verified else {SOURCE_UNCHECKED: True})}
    return fingerprint({"source": source.fingerprint, "settings": settings}), settings


def _state(source: JobState, spec: QuantSpec, new_dir: Path, index_bytes: bytes,
           stored_bytes: dict[str, int], verified: bool = True) -> JobState:
    """NEW_DIR's finished state: every file in it recorded (the index from the bytes about to be written, so the
    state can be saved before it), the source job's module records with the quantised byte counts, and its
    identity (_identity)."""
    files = {str(p.relative_to(new_dir)): file_record(p) for p in sorted(new_dir.rglob("*"))
             if p.is_file() and p.name not in (STATE_NAME, LOCK_NAME)}
    files[INDEX_NAME] = {"size": len(index_bytes), "sha256": hashlib.sha256(index_bytes).hexdigest()}
    fp, settings = _identity(source, spec, verified)
    modules = {name: {**record, **({"stored_bytes": stored_bytes[name]} if name in stored_bytes else {})}
               for name, record in source.modules.items()}
    return JobState(fingerprint=fp, blocks_done=source.blocks_done, extra_shard_done=True, complete=True,
                    modules=modules, files=files, weights=dict(source.weights), model_files=dict(source.model_files),
                    settings=settings)


def _report(out_dir: Path, spec: QuantSpec, stored_bytes: dict[str, int]) -> dict | None:
    """The source report with the quantised byte counts (none if the source has no report)."""
    try:
        report = json.loads((out_dir / REPORT_JSON).read_text())
    except (OSError, ValueError):
        return None
    for name, record in report.get("modules", {}).items():
        if name in stored_bytes:
            record["stored_bytes"] = stored_bytes[name]
    before = report.get("linear_bytes_before")
    if before is None:  # an output from before byte counts: the original weights' bytes from the records
        return report
    after = sum(stored_bytes.values())
    report.update({"linear_bytes_after": after, "bytes_ratio_linear": 1 - after / before, "quantization": spec.section(),
                   "quantized_from": str(out_dir)})
    return report

