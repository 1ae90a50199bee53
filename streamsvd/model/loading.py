"""streamsvd.load: an OUT_DIR (or any supported checkpoint) as a ready transformers model."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
from accelerate.utils import set_module_tensor_to_device
from torch import nn

from .architecture import check_weights_match, decoder_layers, empty_model, layer_prefix, linear_modules, load_config
from ..io.checkpoint import Checkpoint
from ..errors import CheckpointError, StreamSVDError
from .lowrank import FORMS, module_from_tensors, replace_module
from .quantized import dequantizing_getter, logical_keys
from .remote.modeling_streamsvd import (MODEL_TYPE, compressed_class, is_permutation, is_saved_copy, quant_readable,
                                       swap_compressed_linears, ties_embeddings)
from ..job.state import STATE_NAME, read_state


def load(path, dtype: torch.dtype | None = None, device: str = "cpu", verify: bool = True) -> nn.Module:
    """Two-factor modules where streamsvd compressed, the original layers elsewhere; eval mode.

    `verify`: a streamsvd OUT_DIR's files are first checked against the sha256 its job recorded, as `streamsvd
    verify` does (one read of the output, about 1 GB/s per core; False checks sizes and headers only)."""
    import os

    from ..job.device import resolve_device
    from ..job.lock import reading_output
    from ..job.verify import damaged_fix

    # the arguments as a user passes them: a path, a dtype or its name (as transformers takes it), a device's name
    # (load(None), dtype="float16", device="bogus" or "meta" were raw TypeErrors, RuntimeErrors, or "re-run"; a probe)
    if not isinstance(path, (str, os.PathLike)):
        raise StreamSVDError(f"streamsvd.load takes a folder's path, not {type(path).__name__}",
                             "pass the OUT_DIR (or a checkpoint directory) as a str or a pathlib.Path")
    if isinstance(dtype, str):
        named = getattr(torch, dtype.removeprefix("torch."), None)
        if not (isinstance(named, torch.dtype) and named.is_floating_point):
            raise StreamSVDError(f"dtype {dtype!r} is not a floating-point torch dtype",
                                 "pass torch.float32, torch.bfloat16 or torch.float16 (or their names), or leave it out")
        dtype = named
    device = resolve_device(str(device))
    path = Path(path)
    with reading_output(path):  # no `run` rewrites it while it is checked and read
        state = check_finished(path, verify)
        output = state is not None or is_streamsvd_output(path)
        try:
            return _load(path, dtype, device)
        except CheckpointError as e:
            if not output:
                raise
            # An output is re-made by rerunning the job, not re-downloaded.
            raise CheckpointError(f"{path} is a damaged streamsvd output: {e.problem}", damaged_fix(state)) from e


def _load(path: Path, dtype: torch.dtype | None, device: str) -> nn.Module:
    ckpt = Checkpoint(path)
    section = ckpt.config_dict.get("streamsvd")
    config = load_config(ckpt)
    dtype = dtype or _saved_dtype(ckpt.config_dict)
    model = empty_model(config, dtype)
    ranks = section["ranks"] if section else {}
    # Outputs written before pivoted factors existed have no "forms": every module is plain.
    forms = section.get("forms", {}) if section else {}
    for name in ranks:
        form = forms.get(name, "plain")
        if form not in FORMS:
            raise StreamSVDError(f"{path} stores {name} in an unknown form {form!r}", "upgrade streamsvd to load this output")
    if not section:  # an original checkpoint: its weights against its config.json, in `run`'s words
        check_weights_match(model, ckpt)
    else:
        # The same swap the remote code in OUT_DIR does (model/remote/modeling_streamsvd.py); dense modules
        # stay the nn.Linear the model already has.
        swap_compressed_linears(model, {"ranks": ranks, "forms": forms}, dtype=dtype, device="meta")
        # the remote code's class: the same model, whose save_pretrained writes a folder transformers loads as this
        model.__class__ = compressed_class(type(model))
    expected = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    computed = expected.keys() - model.state_dict().keys()  # non-persistent buffers (rotary inv_freq): from the config
    get, keys = tensor_reader(ckpt)
    for key in sorted(keys):
        if key not in expected:
            # (an output's refusals are reworded by load: rerun its job)
            raise CheckpointError(f"{path} holds tensor {key}, which the model its config.json makes does not have",
                                  "check that config.json is the checkpoint's own (its model_type and settings such as "
                                  "attention_bias make the tensors the model has), or download the checkpoint again")
        if key in computed:  # a stored copy (an older transformers saved inv_freq) is ignored, as transformers ignores it
            continue
        value = get(key)
        # Integer tensors (the pivots of pivoted factors) keep their integer type.
        value = value.to(torch.long) if not value.is_floating_point() else value.to(dtype)
        set_module_tensor_to_device(model, key, device, value=value)
    # A head stored beside a tied config's embedding stays its own, as transformers keeps it (its config is wrong) and
    # as the job computed with it (materialize_head); tying it here gave another model than the output's remote code.
    if ties_embeddings(config) and model.get_output_embeddings().weight.device.type == "meta":
        model.tie_weights()
    missing = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.device.type == "meta"]
    if missing:
        raise CheckpointError(f"{path} lacks tensors its config.json calls for: {', '.join(missing[:5])}",
                              "restore the checkpoint's own config.json, or download the checkpoint again")
    if (path / "generation_config.json").is_file():  # as from_pretrained reads it: eos ids, sampling defaults for generate()
        from transformers import GenerationConfig

        try:
            model.generation_config = GenerationConfig.from_pretrained(path)
        except (OSError, ValueError) as e:  # as from_pretrained takes it: a warning, the config's defaults (export onnx
            # and load stopped in a traceback on a file that the original checkpoint loads with; a probe)
            first = (str(e).strip().splitlines() or [""])[0][:200]
            print(f"warning: {path / 'generation_config.json'} cannot be read ({type(e).__name__}: {first}); "
                  "generate() uses the model config's defaults", file=sys.stderr)
    model.to(device)
    return model.eval()


def tensor_reader(ckpt: Checkpoint):
    """(get, keys) over the tensors a model has: quantised factors (the `quantization` entry of the
    streamsvd section; model/quantized.py) come back dequantised, in their scales' dtype."""
    section = ckpt.config_dict.get("streamsvd") or {}
    quant = section.get("quantization")
    if not quant:
        return pivots_checked(ckpt.get, ckpt.dir), set(ckpt.keys())
    if not quant_readable(quant):
        raise StreamSVDError(f"{ckpt.dir} stores its factors quantised as {quant!r}, which this streamsvd cannot read",
                             "upgrade streamsvd to load this output")
    get = dequantizing_getter(ckpt.get, ckpt.keys(), quant["num_bits"], quant["group_size"])
    return pivots_checked(get, ckpt.dir), logical_keys(ckpt.keys())


_FLOATING = (".weight", ".bias", ".out_factor", ".in_factor", ".in_rest")


def pivots_checked(get, where: Path):
    """`get`, refusing a pivoted factor's pivots that are not a permutation of its inputs (a damaged shard read with
    verify off: an index out of range was a RuntimeError from the first forward, a repeated one a wrong model), and
    a tensor of the wrong kind: integer weights or factors, floating-point pivots (a header's dtype edited at the same
    size was cast into the model's floats: another model, silently)."""
    fix = "the output is damaged: run the same `streamsvd run` command again (`streamsvd verify OUT_DIR` lists the damaged files)"

    def checked(name: str) -> torch.Tensor:
        try:
            value = get(name)
        except ValueError as e:  # packed words that do not fit the config's bit width or shape (dequantize)
            raise CheckpointError(f"{where}'s {name} cannot be read: {e}", fix) from None
        if name.endswith(".pivots"):
            if value.is_floating_point() or value.is_complex():
                raise CheckpointError(f"{where}'s {name} is stored as {value.dtype}, not as integers", fix)
            if not is_permutation(value):
                raise CheckpointError(f"{where}'s {name} is not a permutation of the layer's inputs", fix)
        elif name.endswith(_FLOATING) and not value.is_floating_point():
            raise CheckpointError(f"{where}'s {name} is stored as {value.dtype}, not as floating-point numbers", fix)
        return value

    return checked


def check_finished(path: Path, verify: bool = True):
    """Refuse an OUT_DIR whose job has not finished (its shards are not a model yet), or whose recorded files are
    not as the job wrote them: sizes and headers, and with `verify` their sha256 (a changed byte inside a shard was a
    silently wrong model for load, eval and export; only `streamsvd verify` and a rerun saw it). Its state, or None
    (not a streamsvd OUT_DIR, or one whose state was not kept: nothing to check against)."""
    from ..job.verify import made_by_quantize, output_problems, problems_fix, source_unchecked_note, unfinished_fix

    path = Path(path)
    try:
        state = read_state(path) if path.is_dir() else None
    except StreamSVDError as e:  # its fix is run's (--restart), which a quantize output's maker does not have
        raise StreamSVDError(e.problem, "the output is damaged: run the `streamsvd run` command that made it again with "
                             "--restart (a `streamsvd quantize` output: remove that directory and quantize again)") from e
    config = _config_json(path) if state is None else {}
    if config.get("model_type") == MODEL_TYPE and not is_saved_copy(path):  # a job's or quantize's: they leave a state
        # Its files cannot be checked against anything: a changed byte would load as another model, silently. (A
        # folder that save_pretrained wrote from a loaded output, its factors fine-tuned, say, never had a state: it is
        # read as it is. Its section says `saved_copy`; one saved before that has the base family's model_type.)
        if verify:
            # a quantize of an output read with --no-verify and without its state never had one to copy
            section = config.get("streamsvd")
            quantised = isinstance(section, dict) and bool(section.get("quantization"))
            raise StreamSVDError(f"{path} is a streamsvd output without its {STATE_NAME}, which records the files its "
                                 "job wrote, so they cannot be checked",
                                 ("read it with --no-verify / verify=False, as it was quantised (`streamsvd quantize "
                                  "--no-verify` of an output without its state writes none), or quantize an output that "
                                  "has its state" if quantised else
                                  f"copy {STATE_NAME} from the folder the job wrote (or rerun the job); --no-verify / "
                                  "verify=False reads it unchecked"))
        print(f"warning: {path} has no {STATE_NAME}: its files are read unchecked", file=sys.stderr)
    if state is not None and not state.complete:
        what = "`streamsvd quantize` that was stopped" if made_by_quantize(state) else f"job ({state.blocks_done} blocks done)"
        raise StreamSVDError(f"{path} is an unfinished streamsvd {what}", unfinished_fix(state))
    problems = output_problems(path, state.files, deep=verify) if state is not None else []
    if problems:
        (name, problem), more = problems[0], len(problems) - 1
        raise CheckpointError(
            f"{path} is a damaged streamsvd output: {name}: {problem}" + (f" (and {more} more files)" if more else ""),
            problems_fix(path, state, problems),
        )
    note = source_unchecked_note(path, state)
    if note:
        print(f"warning: {note}", file=sys.stderr)
    return state


def _saved_dtype(config_dict: dict) -> torch.dtype:
    name = config_dict.get("dtype") or config_dict.get("torch_dtype") or "float32"
    return getattr(torch, name) if isinstance(name, str) and hasattr(torch, name) else torch.float32


def _config_json(path: Path) -> dict:
    """`path`'s config.json as a dict ({} where there is none, or it is not a JSON object)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def is_streamsvd_output(path: Path) -> bool:
    return "streamsvd" in _config_json(path)


def stored_layer(model: nn.Module, index: int, ckpt: Checkpoint, dtype: torch.dtype) -> nn.Module:
    """Decoder layer `index` of a checkpoint or a streamsvd output, alone: compressed linears as their
    stored form (whatever `module_from_tensors` reads), everything else from the checkpoint."""
    layer = copy.deepcopy(decoder_layers(model)[index])
    prefix = layer_prefix(model, index)
    get, keys = tensor_reader(ckpt)
    for name in linear_modules(layer):
        if prefix + name + ".weight" not in keys:
            replace_module(layer, name, module_from_tensors(get, keys, prefix + name, dtype))
    for name, param in list(layer.named_parameters()):
        if param.device.type == "meta":
            if prefix + name not in keys:
                raise StreamSVDError(f"{ckpt.dir} lacks tensor {prefix + name}", _REMAKE_FIX)
            set_module_tensor_to_device(layer, name, "cpu", value=get(prefix + name).to(dtype))
    return layer.eval()


def materialize_head(model: nn.Module, ckpt: Checkpoint, dtype: torch.dtype) -> None:
    """The output head: its own tensor, or the input embedding when the two are tied."""
    head = model.get_output_embeddings()
    name = next(n for n, m in model.named_modules() if m is head) + ".weight"
    if name in ckpt:
        set_module_tensor_to_device(model, name, "cpu", value=ckpt.get(name).to(dtype))
    elif ties_embeddings(model.config):
        head.weight = model.get_input_embeddings().weight
    else:  # the input embedding in its place scored another model (streamed eval of such a checkpoint, a probe)
        raise CheckpointError(f"{ckpt.dir} has no tensor {name}, and its config.json says the output head is not the "
                              "input embedding (tie_word_embeddings false)",
                              "restore the checkpoint's own weights or config.json (a checkpoint whose head is its input "
                              "embedding says tie_word_embeddings true)")


_REMAKE_FIX = ("if it is a streamsvd output, rerun the `streamsvd run` command that made it (into a new OUT_DIR "
               "if needed); if it is a downloaded checkpoint, download it again")
