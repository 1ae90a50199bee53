"""streamsvd.load: an OUT_DIR (or any supported checkpoint) as a ready transformers model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate.utils import set_module_tensor_to_device
from torch import nn

from .architecture import empty_model, load_config
from ..io.checkpoint import Checkpoint
from ..errors import CheckpointError, StreamSVDError
from .lowrank import FORMS, empty_module, replace_module
from ..job.state import read_state


def load(path, dtype: torch.dtype | None = None, device: str = "cpu") -> nn.Module:
    """Two-factor modules where streamsvd compressed, the original layers elsewhere; eval mode."""
    path = Path(path)
    state = read_state(path) if path.is_dir() else None
    if state is not None and not state.complete:
        raise StreamSVDError(
            f"{path} is an unfinished streamsvd job ({state.blocks_done} blocks done)",
            "run the same `streamsvd run` command again to finish it",
        )
    output = state is not None or is_streamsvd_output(path)
    try:
        return _load(path, dtype, device)
    except CheckpointError as e:
        if not output:
            raise
        # An output is re-made by rerunning the job, not re-downloaded.
        raise CheckpointError(
            f"{path} is a damaged streamsvd output: {e.problem}",
            "run the same `streamsvd run MODEL_DIR OUT_DIR ...` command again: it redoes the damaged files "
            "(`streamsvd verify OUT_DIR` lists them)",
        ) from e


def _load(path: Path, dtype: torch.dtype | None, device: str) -> nn.Module:
    ckpt = Checkpoint(path)
    section = ckpt.config_dict.get("streamsvd")
    config = load_config(ckpt)
    dtype = dtype or _saved_dtype(ckpt.config_dict)
    model = empty_model(config, dtype)
    ranks = section["ranks"] if section else {}
    # Outputs written before pivoted factors existed have no "forms": every module is plain.
    forms = section.get("forms", {}) if section else {}
    for name, rank in ranks.items():
        form = forms.get(name, "plain")
        if form not in FORMS:
            raise StreamSVDError(f"{path} stores {name} in an unknown form {form!r}", "upgrade streamsvd to load this output")
        if form == "dense":
            continue  # kept as the nn.Linear the model already has
        linear = model.get_submodule(name)
        replace_module(model, name, empty_module(form, linear.in_features, linear.out_features, rank, linear.bias is not None, dtype))
    expected = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for key in ckpt.keys():
        if key not in expected:
            raise StreamSVDError(f"{path} holds tensor {key}, which the model does not have", "re-run streamsvd into a new OUT_DIR")
        value = ckpt.get(key)
        # Integer tensors (the pivots of pivoted factors) keep their integer type.
        value = value.to(torch.long) if not value.is_floating_point() else value.to(dtype)
        set_module_tensor_to_device(model, key, device, value=value)
    if getattr(config, "tie_word_embeddings", False) or getattr(config.get_text_config(), "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.device.type == "meta"]
    if missing:
        raise StreamSVDError(f"{path} lacks tensors: {', '.join(missing[:5])}", "the output is incomplete; re-run streamsvd")
    model.to(device)
    return model.eval()


def _saved_dtype(config_dict: dict) -> torch.dtype:
    name = config_dict.get("dtype") or config_dict.get("torch_dtype") or "float32"
    return getattr(torch, name) if isinstance(name, str) and hasattr(torch, name) else torch.float32


def is_streamsvd_output(path: Path) -> bool:
    try:
        return "streamsvd" in json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
