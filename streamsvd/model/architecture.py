"""Which decoder models streamsvd runs, and how it builds them without materialising the weights.

The model is built on the meta device (parameters only; buffers such as rotary frequencies and
Gemma's embedding scale stay real), and transformers' own decoder-layer classes run each block, so
attention is never re-implemented here.
"""

from __future__ import annotations

import copy

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from ..io.checkpoint import Checkpoint
from ..errors import UnsupportedArchitecture

# model_type -> attribute path of the decoder-layer list inside the *ForCausalLM model.
SUPPORTED = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "gemma3_text": "model.layers",
}


def check_supported(config_dict: dict) -> str:
    model_type = config_dict.get("model_type")
    if model_type not in SUPPORTED:
        found = f"model_type={model_type!r}, architectures={config_dict.get('architectures')}"
        raise UnsupportedArchitecture(
            f"unsupported architecture ({found})",
            f"streamsvd supports decoder models of type {', '.join(sorted(SUPPORTED))}",
        )
    return model_type


def load_config(checkpoint: Checkpoint) -> PretrainedConfig:
    model_type = check_supported(checkpoint.config_dict)
    if checkpoint.config_dict != checkpoint.raw_config_dict:
        # A streamsvd output (config.json of model_type "streamsvd"): the base family's config class
        # from the base form of the dict, as AutoConfig would build it from the original config.json.
        config = CONFIG_MAPPING[model_type].from_dict(dict(checkpoint.config_dict))
    else:
        config = AutoConfig.from_pretrained(checkpoint.dir)
    config._attn_implementation = "sdpa"
    return config


def empty_model(config: PretrainedConfig, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The *ForCausalLM with every parameter on the meta device and real buffers."""
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(SUPPORTED[model.config.model_type])


def layer_prefix(model: nn.Module, index: int) -> str:
    return f"{SUPPORTED[model.config.model_type]}.{index}."


def materialize(module: nn.Module, prefix: str, checkpoint: Checkpoint, dtype: torch.dtype) -> None:
    """Fill `module`'s parameters from the checkpoint (names under `prefix`)."""
    for name, _ in list(module.named_parameters()):
        set_module_tensor_to_device(module, name, "cpu", value=checkpoint.get(prefix + name).to(dtype))


def materialize_base(model: nn.Module, checkpoint: Checkpoint, dtype: torch.dtype) -> None:
    """The parameters outside the decoder layers that run before them (embeddings, final norm)."""
    layers_path = SUPPORTED[model.config.model_type]
    for name, _ in list(model.named_parameters()):
        if name.startswith("model.") and not name.startswith(layers_path + ".") and name in checkpoint:
            set_module_tensor_to_device(model, name, "cpu", value=checkpoint.get(name).to(dtype))


def load_layer(model: nn.Module, index: int, checkpoint: Checkpoint, dtype: torch.dtype) -> nn.Module:
    """A standalone, materialised copy of decoder layer `index`; the skeleton stays on meta."""
    layer = copy.deepcopy(decoder_layers(model)[index])
    materialize(layer, layer_prefix(model, index), checkpoint, dtype)
    return layer.eval()


def linear_modules(layer: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


def max_positions(config: PretrainedConfig) -> int | None:
    return getattr(config, "max_position_embeddings", None)


def check_seqlen(config: PretrainedConfig, seqlen: int) -> None:
    """Refuse windows longer than the model's positions (run, plan, profile and eval alike)."""
    from ..errors import StreamSVDError

    limit = max_positions(config)
    if limit is not None and seqlen > limit:
        raise StreamSVDError(f"--seqlen {seqlen} is longer than the model allows ({limit} positions)",
                             f"use --seqlen {limit} or less")
