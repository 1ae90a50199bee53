"""`streamsvd export dense OUT_DIR DIR`: the factors multiplied back into an ordinary checkpoint.

For tools that take only dense weights (vLLM, llama.cpp's converters): DIR gets the base family's
plain config.json (no "streamsvd" section, no auto_map), one safetensors shard per OUT_DIR shard
(each written as it is computed, so at most one block's tensors are in memory), the index last, and
the other files (tokenizer, generation config) copied. A stopped export is finished by the same command: DIR holds
a marker naming its source (`.streamsvd_dense_partial`: OUT_DIR's config, index and recorded file digests) until the
index is written, and the shards already there, each written whole (atomic rename), are kept where their tensor
table is the one this export writes and their sha256 is the one the marker recorded as each was written. Each compressed linear becomes `NAME.weight`,
the product of its stored factors computed in float64 by the layer class itself
(`dense_weight()`, model/remote/modeling_streamsvd.py) and rounded once to the stored dtype. This
gives the size back: the export is as large as the original model's decoder linears. Quantised factors (`run
--quant`, `streamsvd quantize`) are dequantised first, as streamsvd.load reads them, and the weight takes their
scales' dtype: the dense model computes what the quantised one does.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import StreamSVDError
from ..io.checkpoint import INDEX_NAME, SINGLE_NAME, TORCH_DTYPES, Checkpoint, read_safetensors_header
from ..io.checksums import file_sha256
from ..io.fsutil import (atomic_path, atomic_write_bytes, atomic_write_json, file_in_the_way, holds_only_temporaries_of,
                         remove_temporaries, within)
from ..io.plots import ALLOCATION_PNG, SPECTRA_PNG
from ..job.lock import entries_besides_lock
from ..model.loading import tensor_reader
from ..model.lowrank import FORMS, module_from_tensors
from ..model.quantized import QUANT_PARTS, quantized_bases
from ..model.remote import MODELING_FILE

PARTIAL = ".streamsvd_dense_partial"  # in DIR while an export is under way: {"source", "identity", "shards": sha256s}
_FIX_OUTPUT = "give the OUT_DIR of a finished `streamsvd run` (a directory with config.json holding a \"streamsvd\" section)"


def check_source(out_dir: Path, verify: bool = True) -> Checkpoint:
    """A finished streamsvd output whose files are as its job wrote them (`verify`: their sha256 too), or one error
    naming what it is instead."""
    from ..model.loading import check_finished, is_streamsvd_output

    if not out_dir.is_dir():
        raise StreamSVDError(f"{out_dir} is not a directory", _FIX_OUTPUT)
    check_finished(out_dir, verify)  # first: an unfinished job has no config.json yet, and is not "not an output"
    if not is_streamsvd_output(out_dir):
        raise StreamSVDError(f"{out_dir} is not a streamsvd output (its config.json has no \"streamsvd\" section)",
                             _FIX_OUTPUT)
    if not (out_dir / INDEX_NAME).is_file():
        raise StreamSVDError(f"{out_dir} is an unfinished streamsvd output (it has no {INDEX_NAME})",
                             "run the same `streamsvd run` command again to finish it")
    return Checkpoint(out_dir)


def source_identity(out_dir: Path) -> str:
    """What a stopped export must have been made from to be finished in place: OUT_DIR's config.json and index, and
    the digests its state records for every file (without a state, each shard's size)."""
    from ..job.state import read_state

    h = hashlib.sha256()
    for name in ("config.json", INDEX_NAME):
        h.update((out_dir / name).read_bytes())
    state = read_state(out_dir)
    if state is not None:
        h.update(json.dumps(state.files, sort_keys=True).encode())
    else:
        h.update(json.dumps({p.name: p.stat().st_size for p in sorted(out_dir.glob("*.safetensors"))}).encode())
    return h.hexdigest()


def _partial(dest: Path) -> dict | None:
    try:
        marker = json.loads((dest / PARTIAL).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else {}


def check_destination(dest: Path, out_dir: Path, identity: str | None = None) -> bool:
    """Refuse a DIR the export cannot write; True where DIR holds a stopped export of this same output (`identity`,
    source_identity) to finish."""
    outside = dest.resolve() != out_dir.resolve() and not within(dest, out_dir)
    if outside and dest.is_dir() and (dest / PARTIAL).exists():
        marker = _partial(dest)
        if marker is not None and marker.get("identity") == identity:
            return True
        raise StreamSVDError(f"{dest} holds a stopped dense export of another output "
                             f"({marker.get('source', 'unknown') if marker else 'its marker is unreadable'})",
                             f"remove {dest} and export again, or give a new directory")
    if outside and holds_only_temporaries_of(dest, [PARTIAL]):  # a kill during the marker's own write
        remove_temporaries(dest, [PARTIAL])
    if dest.exists() and (not dest.is_dir() or entries_besides_lock(dest)):
        raise StreamSVDError(f"{dest} exists and is not an empty directory",
                             "give a new or empty directory for the dense checkpoint")
    blocker = file_in_the_way(dest)
    if blocker is not None:
        raise StreamSVDError(f"{dest} cannot be made: {blocker} is not a directory", "give a new or empty directory for the dense checkpoint")
    if dest.resolve() == out_dir.resolve():
        raise StreamSVDError(f"{dest} is the streamsvd output itself", "give a new or empty directory")
    if within(dest, out_dir):  # the output then holds a model inside itself
        raise StreamSVDError(f"{dest} is inside the streamsvd output {out_dir}", "give a directory outside it")
    return False


def factored_modules(ckpt: Checkpoint) -> dict[str, str]:
    """Compressed linear name -> stored form, for the modules stored as factors (not dense)."""
    section = ckpt.config_dict["streamsvd"]
    forms = section.get("forms", {})  # older outputs: all plain
    modules = {}
    for name in section["ranks"]:
        form = forms.get(name, "plain")
        if form not in FORMS:
            raise StreamSVDError(f"{ckpt.dir} stores {name} in an unknown form {form!r}", "upgrade streamsvd to export this output")
        if form != "dense":
            modules[name] = form
    return modules


def _factor_keys(name: str, form: str) -> list[str]:
    return [name + suffix for suffix in FORMS[form]]


def _logical_shape(ckpt: Checkpoint, key: str) -> list[int]:
    """A factor's shape: as stored, or a quantised factor's recorded `_shape` (model/quantized.py)."""
    return list(ckpt.shape(key)) if key in ckpt else ckpt.get(key + "_shape").tolist()


def _logical_itemsize(ckpt: Checkpoint, key: str) -> int:
    """Bytes per value of a factor's dense product: its own dtype's, or a quantised factor's scales' (its values')."""
    stored = key if key in ckpt else key + "_scale"
    return ckpt.nbytes(stored) // ckpt.numel(stored)


def _stored_keys(ckpt: Checkpoint, key: str) -> list[str]:
    """The tensors a logical factor is stored as: itself, or its quantised parts."""
    return [key] if key in ckpt else [key + part for part in QUANT_PARTS if key + part in ckpt]


def sizes(ckpt: Checkpoint, modules: dict[str, str]) -> tuple[int, int]:
    """(factored bytes, dense bytes) of all tensors: OUT_DIR as stored, and what the export writes."""
    factored = sum(ckpt.nbytes(k) for k in ckpt.keys())
    dense = factored
    for name, form in modules.items():
        dense -= sum(ckpt.nbytes(k) for key in _factor_keys(name, form) for k in _stored_keys(ckpt, key))
        out_factor = name + ".out_factor"
        m = _logical_shape(ckpt, out_factor)[0]
        n = _logical_shape(ckpt, name + ".in_factor")[1] if form == "plain" else ckpt.numel(name + ".pivots")
        dense += m * n * _logical_itemsize(ckpt, out_factor)
    return factored, dense


def export_dense(out_dir, dest, log=print, verify: bool = True) -> dict:
    """Write the dense checkpoint of the finished output `out_dir` into the new or empty `dest` (locked meanwhile)."""
    from ..job.lock import destination_lock, reading_output

    with destination_lock(Path(dest), "DIR"), reading_output(Path(out_dir)):
        return _export_dense(Path(out_dir), Path(dest), log, verify)


def _export_dense(out_dir: Path, dest: Path, log, verify: bool) -> dict:
    ckpt = check_source(out_dir, verify)
    identity = source_identity(out_dir)
    resuming = check_destination(dest, out_dir, identity)
    get, keys = tensor_reader(ckpt)  # quantised factors dequantised; pivots checked to be permutations
    modules = factored_modules(ckpt)
    factored_bytes, dense_bytes = sizes(ckpt, modules)
    log(f"warning: a dense export gives the size back: {_gb(dense_bytes)} of weights instead of the "
        f"{_gb(factored_bytes)} {out_dir} stores ({dense_bytes / factored_bytes:.2f}x); keep OUT_DIR for "
        "streamsvd.load or transformers with trust_remote_code=True")
    dest.mkdir(parents=True, exist_ok=True)
    # The marker records each shard's sha256 once it is written whole: a stopped export's shard is kept only if its
    # bytes are still those (its header alone let a changed byte in its data through: a silently other model).
    recorded = dict((_partial(dest) or {}).get("shards") or {}) if resuming else {}
    marker = {"source": str(out_dir.resolve()), "identity": identity, "shards": recorded}
    if not resuming:
        atomic_write_json(dest / PARTIAL, marker)
    else:  # the temporaries the stopped export was writing (never renamed into place) are not left in DIR
        copies = [p.name for p in out_dir.iterdir() if p.is_file() and not _streamsvd_file(p.name)]
        remove_temporaries(dest, [*set(ckpt.weight_map.values()), "config.json", *copies, INDEX_NAME, PARTIAL])
    owner = {key: name for name, form in modules.items() for key in _factor_keys(name, form)}
    bases = quantized_bases(ckpt.keys())
    logical = {k: _logical_key(k, bases) for k in ckpt.keys()}
    weight_map, total, kept = {}, 0, 0
    for shard in sorted(set(ckpt.weight_map.values())):
        names = sorted({logical[k] for k, s in ckpt.weight_map.items() if s == shard})
        done = _finished_shard(dest / shard, _written_names(names, owner), recorded.get(shard)) if resuming else None
        if done is not None:  # written whole by the stopped export of this same output
            for key, nbytes in done.items():
                weight_map[key] = shard
                total += nbytes
            kept += 1
            continue
        tensors = {}
        for key in names:
            name = owner.get(key)
            if name is None:
                tensors[key] = get(key)
            elif key == name + ".out_factor":  # one dense weight per module, in its out_factor's shard
                dtype = TORCH_DTYPES[ckpt.dtype_name(key if key in ckpt else key + "_scale")]
                module = module_from_tensors(get, keys, name, torch.float64)
                with torch.no_grad():
                    tensors[name + ".weight"] = module.dense_weight().to(dtype)
        with atomic_path(dest / shard) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
            tmp.chmod(0o644)
            digest = file_sha256(tmp)
        recorded[shard] = digest
        atomic_write_json(dest / PARTIAL, marker)
        for key, value in tensors.items():
            weight_map[key] = shard
            total += value.numel() * value.element_size()
        del tensors
    config = dict(ckpt.config_dict)  # the base family's config (model/remote: base_config_dict)
    config.pop("streamsvd", None)
    atomic_write_json(dest / "config.json", config)
    copied = []
    for path in sorted(out_dir.iterdir()):
        if path.is_file() and not _streamsvd_file(path.name):
            with atomic_path(dest / path.name) as tmp:
                shutil.copyfile(path, tmp)
            copied.append(path.name)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    atomic_write_bytes(dest / INDEX_NAME, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
    (dest / PARTIAL).unlink(missing_ok=True)
    return {"out_dir": str(out_dir), "dir": str(dest), "modules_multiplied": len(modules),
            "factored_bytes": factored_bytes, "dense_bytes": dense_bytes, "copied": copied, "shards_kept": kept}


def _written_names(names: list[str], owner: dict[str, str]) -> set[str]:
    """The tensor names a shard of the export holds, from its source shard's logical names: each compressed linear's
    factors become one NAME.weight (in its out_factor's shard)."""
    out = set()
    for key in names:
        name = owner.get(key)
        if name is None:
            out.add(key)
        elif key == name + ".out_factor":
            out.add(name + ".weight")
    return out


def _finished_shard(path: Path, names: set[str], sha256: str | None) -> dict[str, int] | None:
    """Tensor name -> bytes of a shard a stopped export wrote, where it is whole, holds exactly `names` and has the
    sha256 the marker recorded for it; else None (then it is written again)."""
    if not path.is_file() or sha256 is None:
        return None
    try:
        header = read_safetensors_header(path)
    except StreamSVDError:
        return None
    table = {k: v for k, v in header.items() if k != "__metadata__"}
    if set(table) != names:
        return None
    try:
        if file_sha256(path) != sha256:
            return None
    except OSError:
        return None
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in table.items()}


def _logical_key(key: str, bases: set[str]) -> str:
    """The name a model sees for the stored `key`: a packed tensor's part gives its base's name."""
    for part in QUANT_PARTS:
        if key.endswith(part) and key[: -len(part)] in bases:
            return key[: -len(part)]
    return key


def _streamsvd_file(name: str) -> bool:
    """OUT_DIR files that are not part of an ordinary checkpoint (or are rewritten by the export)."""
    return (name.endswith(".safetensors") or name in (INDEX_NAME, SINGLE_NAME, "config.json", MODELING_FILE,
                                                      ALLOCATION_PNG, SPECTRA_PNG)
            or name.startswith("streamsvd_") or name.startswith("."))


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.2f} MB"
