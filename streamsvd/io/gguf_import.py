"""Turn a GGUF file into an ordinary Hugging Face checkpoint.

The rest of streamsvd reads safetensors one tensor at a time; GGUF is quantised and has its own
tensor names, so it is dequantised once here (by transformers) and written out in HF layout. The
output is built in a hidden sibling directory and renamed into place at the end, so an interrupted
import never leaves a directory that looks like a finished checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
from pathlib import Path

import torch

from .checkpoint import INDEX_NAME, SINGLE_NAME
from ..errors import StreamSVDError
from .fsutil import drop_held_marker, file_in_the_way, new_held_folder, remove_abandoned_folders


def import_gguf(gguf_path, out_dir, dtype=torch.float32, max_shard_size="2GB") -> Path:
    """Dequantise `gguf_path` into an HF checkpoint at `out_dir` (which must not hold anything)."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    _check_inputs(gguf_path, out_dir)
    # Resolved: an empty target given as a link to a directory (rmdir refused it) or as "." (the build directory
    # went inside it, and the rename failed as if something else had written there).
    target = out_dir.resolve()
    # the build folders (`.OUT.importing-XXXX`) of killed imports into the same target: a whole dequantised checkpoint
    # each, which nothing else removes; a live import's (its flock held) is left alone
    remove_abandoned_folders(target.parent, f".{target.name}.importing-")
    tmp, held = new_held_folder(target.parent, f".{target.name}.importing-")
    try:
        _write_checkpoint(gguf_path, tmp, dtype, max_shard_size)
        _check_tensor_names(tmp)
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()  # an empty target is allowed; rename cannot replace it portably
        drop_held_marker(tmp)  # still held by its flock: no sweep takes it meanwhile
        try:
            os.rename(tmp, target)
        except OSError as e:
            raise StreamSVDError(
                f"could not move the imported checkpoint into {out_dir} ({e})",
                "something else wrote to that directory during the import; pick a new OUT_DIR",
            ) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if held is not None:
            os.close(held)
    return out_dir


def _check_inputs(gguf_path: Path, out_dir: Path) -> None:
    if gguf_path.is_dir():
        raise StreamSVDError(f"{gguf_path} is a directory, not a GGUF file", "give the path of the .gguf file itself")
    if not gguf_path.is_file():
        raise StreamSVDError(f"GGUF file {gguf_path} does not exist", "check the path to the .gguf file")
    try:
        with open(gguf_path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise StreamSVDError(f"GGUF file {gguf_path} cannot be read ({e})", "check its permissions") from e
    if magic != b"GGUF":
        raise StreamSVDError(
            f"{gguf_path} is not a GGUF file (it does not start with the GGUF magic bytes)",
            "pass a .gguf model file; split downloads must be concatenated in order first",
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise StreamSVDError(f"output directory {out_dir} is a file", "pick a new OUT_DIR (a directory the import makes)")
    blocker = file_in_the_way(out_dir.resolve())  # a dangling link: the import makes its target
    if blocker is not None:
        raise StreamSVDError(f"output directory {out_dir} cannot be made: {blocker} is not a directory",
                             "pick a new OUT_DIR (a directory the import makes)")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise StreamSVDError(
            f"output directory {out_dir} already exists and is not empty",
            "pick a new OUT_DIR or remove that one; an import never overwrites existing files",
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)


_READ_FIX = ("check that the file is complete and that its architecture is one transformers supports for GGUF (llama, "
             "gemma3, qwen2, mistral, ...)")


def check_layout(gguf_path: Path) -> list[str]:
    """Refuse a GGUF whose tensors do not tile its data section: each at an aligned offset, none overlapping, no gap
    of an alignment or more, the last ending within an alignment of the file's end. GGUF has no checksums, and
    transformers' reader trusts the header: a tensor count one short moved the data start 64 bytes early and every
    tensor was imported shifted by 16 floats; an offset off by one, or two tensors at one offset, gave other weights.
    Returns the tensors' names."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(gguf_path))
        align, start = int(reader.alignment), int(reader.data_offset)
        spans = sorted((int(t.data_offset) - start, int(t.n_bytes), str(t.name)) for t in reader.tensors)
    except (ValueError, KeyError, OSError, RuntimeError, struct.error, EOFError, IndexError, TypeError) as e:
        raise StreamSVDError(f"could not read {gguf_path} as GGUF ({type(e).__name__}: {e})", _READ_FIX) from e
    size = gguf_path.stat().st_size
    end, last = 0, None
    for offset, nbytes, name in spans:
        if offset % align:
            problem = f"tensor {name} starts at data offset {offset}, not a multiple of the alignment {align}"
        elif offset < end:
            problem = f"tensor {name} overlaps {last}"
        elif offset - end >= align:
            problem = f"{offset - end} bytes before tensor {name} belong to no tensor"
        else:
            end, last = offset + nbytes, name
            continue
        raise StreamSVDError(f"{gguf_path} is damaged: {problem}", "get or convert the GGUF file again")
    if start + end > size or size - (start + end) >= align:
        where = "past the file's end" if start + end > size else f"{size - start - end} bytes before the file's end"
        raise StreamSVDError(f"{gguf_path} is damaged: its {len(spans)} tensors end {where} (its header and its data "
                             "do not agree)", "get or convert the GGUF file again")
    return [name for _, _, name in spans]


def _write_checkpoint(gguf_path: Path, tmp: Path, dtype, max_shard_size) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = check_layout(gguf_path)
    src, name = str(gguf_path.parent), gguf_path.name
    try:
        model, info = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=dtype, output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    except Exception as e:  # noqa: BLE001 -- whatever the reader or the config's validators raise on a bad header
        # struct.error / EOFError: a file cut short inside its metadata (the gguf reader unpacks past its end);
        # huggingface_hub's StrictDataclassClassValidationError: e.g. a head count that does not divide the width
        if isinstance(e, (KeyboardInterrupt, MemoryError)):
            raise
        detail = (str(e).strip().splitlines() or [""])[-1][:300]
        raise StreamSVDError(f"transformers could not read {gguf_path} ({type(e).__name__}: {detail})", _READ_FIX) from e
    # A block count below the blocks the file holds: transformers dropped the others without a word.
    blocks = {int(m.group(1)) for n in names if (m := re.match(r"blk\.(\d+)\.", n))}
    layers = model.config.get_text_config().num_hidden_layers
    if blocks and max(blocks) >= layers:
        raise StreamSVDError(f"{gguf_path} holds tensors of {max(blocks) + 1} blocks, but its metadata says {layers}",
                             "the GGUF file's metadata and tensors disagree: get or convert it again")
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers initialised them at random, and save_pretrained saved them as if they were weights
        raise StreamSVDError(
            f"{gguf_path} lacks {len(missing)} tensor(s) the model needs: {', '.join(missing[:5])}"
            + (" ..." if len(missing) > 5 else ""),
            "the GGUF file is incomplete or was written by a converter that dropped tensors: convert the model again",
        )
    # transformers refuses to save a model it still believes is quantised; the weights are already
    # plain dequantised tensors, so dropping the GGUF marker is all that is needed.
    with contextlib.suppress(AttributeError):
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(tmp)
    for f in tmp.iterdir():  # safetensors shards come out 0600; a shared cache needs them readable
        f.chmod(0o644)


def saved_tensor_names(ckpt_dir: Path) -> set[str]:
    """Names of the tensors stored in a checkpoint, from its index or its single file's header."""
    ckpt_dir = Path(ckpt_dir)
    index = ckpt_dir / INDEX_NAME
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    from safetensors import safe_open

    with safe_open(str(ckpt_dir / SINGLE_NAME), framework="pt") as f:
        return set(f.keys())


def _check_tensor_names(ckpt_dir: Path) -> None:
    """Fail the import if the saved names are not the ones the model class loads.

    transformers may rename tensors on save (checkpoint conversion mappings); if it ever did so
    here, the streaming code, which maps tensor names to modules itself, would silently miss them.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(ckpt_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    state = model.state_dict(keep_vars=True)
    first_name: dict[int, str] = {}
    tied = set()
    for k, v in state.items():  # a tied weight appears under two names with one Parameter
        if id(v) in first_name:
            tied.add(k)
        else:
            first_name[id(v)] = k
    expected, saved = set(state), saved_tensor_names(ckpt_dir)
    missing, unexpected = expected - saved - tied, saved - expected
    if missing or unexpected:
        raise StreamSVDError(
            f"the imported checkpoint's tensor names do not match {type(model).__name__}: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}",
            "this transformers version renames tensors on save for this architecture; "
            "report it with the transformers version and the model type",
        )
