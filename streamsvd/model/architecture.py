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
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from ..io.checkpoint import Checkpoint
from ..errors import CheckpointError, StreamSVDError, UnsupportedArchitecture

# model_type -> attribute path of the decoder-layer list inside the *ForCausalLM model.
SUPPORTED = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "gemma3_text": "model.layers",
    "qwen3": "model.layers",  # q/k RMSNorm after the projections
    "phi3": "model.layers",  # fused qkv_proj and gate_up_proj, compressed as the single linears they are
    "gemma2": "model.layers",  # logit softcapping, alternating sliding-window layers
    "olmo2": "model.layers",  # q/k RMSNorm after the projections, norms after attention and MLP
    "olmo3": "model.layers",  # olmo2 with sliding-window layers
    "smollm3": "model.layers",  # llama with some layers without rotary embeddings (NoPE)
}


# Config keys that give a mixture-of-experts model's expert count (mixtral/phimoe/jetmoe/granitemoe,
# qwen2_moe/qwen3_moe/olmoe, deepseek_v2/v3, dbrx's ffn_config).
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
# Mixture-of-experts types whose configs may not carry a count under those keys.
MOE_TYPES = {"dbrx", "deepseek_v2", "deepseek_v3", "dots1", "gpt_oss", "jamba", "jetmoe", "llama4", "llama4_text",
             "minimax", "mixtral", "olmoe", "phimoe", "qwen3_next"}


def expert_count(config_dict: dict) -> int | None:
    """How many routed experts a layer of this config has, or None for a dense model."""
    for d in (config_dict, config_dict.get("text_config") or {}, config_dict.get("ffn_config") or {}):
        for key in EXPERT_KEYS:
            value = d.get(key)
            if isinstance(value, int) and value > 1:
                return value
    return None


def check_moe(config_dict: dict) -> None:
    """Refuse a mixture-of-experts model with what would be compressed and why it is not yet."""
    experts = expert_count(config_dict)
    model_type = config_dict.get("model_type")
    if experts is None and model_type not in MOE_TYPES and "moe" not in str(model_type):
        return
    top_k = config_dict.get("num_experts_per_tok") or config_dict.get("num_selected_experts") or "k"
    routed = f"{experts} routed experts per layer, {top_k} per token" if experts else "routed experts"
    raise UnsupportedArchitecture(
        f"model_type={model_type!r} is a mixture-of-experts model ({routed}), which streamsvd does not compress yet: "
        "only the attention projections (q/k/v/o_proj) and any shared expert are ordinary linears it could factor; the "
        "routed experts, which hold most of the weights, are stored by transformers as stacked 3-D tensors, and each "
        "sees only the calibration tokens the router sends it, so they would need per-expert statistics",
        f"compress a dense model (supported: {', '.join(sorted(SUPPORTED))})",
    )


def check_supported(config_dict: dict) -> str:
    model_type = config_dict.get("model_type")
    if not isinstance(model_type, str):  # a list or a map there gave a TypeError traceback (a probe)
        raise UnsupportedArchitecture(f"config.json's model_type is {model_type!r}, not a model type's name",
                                      "restore the checkpoint's own config.json")
    check_moe(config_dict)
    if model_type not in SUPPORTED:
        found = f"model_type={model_type!r}, architectures={config_dict.get('architectures')}"
        raise UnsupportedArchitecture(
            f"unsupported architecture ({found})",
            f"streamsvd supports decoder models of type {', '.join(sorted(SUPPORTED))}",
        )
    return model_type


def _unbuildable(checkpoint: Checkpoint, exc: Exception) -> StreamSVDError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return StreamSVDError(f"the config.json in {checkpoint.dir} cannot be built by transformers "
                          f"({type(exc).__name__}: {first[:300]})",
                          "restore the checkpoint's own config.json (a value in it is of the wrong kind or unknown to "
                          "this transformers)")


def load_config(checkpoint: Checkpoint) -> PretrainedConfig:
    model_type = check_supported(checkpoint.config_dict)
    try:
        if checkpoint.config_dict != checkpoint.raw_config_dict:
            # A streamsvd output (config.json of model_type "streamsvd"): the base family's config class
            # from the base form of the dict, as AutoConfig would build it from the original config.json.
            config = CONFIG_MAPPING[model_type].from_dict(dict(checkpoint.config_dict))
        else:
            config = AutoConfig.from_pretrained(checkpoint.dir)
    except StreamSVDError:
        raise
    except Exception as exc:  # transformers' own checks of the values: ValueError, KeyError, its validation errors
        raise _unbuildable(checkpoint, exc) from exc
    config._attn_implementation = attention_implementation(config)
    _check_layer_count(config, checkpoint)
    return config


def _check_layer_count(config: PretrainedConfig, checkpoint: Checkpoint) -> None:
    """More decoder layers in config.json than the checkpoint holds, refused before the model is built: building
    num_hidden_layers 10**30 of them on the meta device ran for as long as anyone waited, 20000 took 80 s and 1.3 GB
    before check_weights_match refused them (a probe, 2026-12-07). (Fewer is check_weights_match's refusal.)"""
    wanted = getattr(config, "num_hidden_layers", None)
    stem = SUPPORTED[config.model_type] + "."
    held = stored_layers(checkpoint.keys(), stem)
    count = sum(1 for i in range(len(held)) if i in held)  # layers 0, 1, ... stored without a gap
    if isinstance(wanted, int) and wanted > count:
        raise CheckpointError(f"the checkpoint in {checkpoint.dir} has no tensor {stem}{count}.* (its config.json calls "
                              f"for {wanted} decoder layers; it holds {count})",
                              "restore the checkpoint's own config.json (num_hidden_layers), or re-download the checkpoint")


def stored_layers(keys, stem: str) -> set[int]:
    """The decoder layer indices the tensor names `keys` hold under `stem` ("model.layers.")."""
    found = (k[len(stem):].split(".", 1)[0] for k in keys if k.startswith(stem))
    return {int(index) for index in found if index.isdigit()}


FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}  # safetensors' names; F8 formats are scaled per tensor elsewhere


def check_weights_match(model: nn.Module, checkpoint: Checkpoint) -> None:
    """An original checkpoint's tensors against the model its config.json makes: every parameter there with its
    shape, and no decoder layer beyond num_hidden_layers. A config.json that contradicts the weights (vocab_size,
    hidden_size, heads) otherwise gave a traceback midway, after shards were written, or (fewer layers) a finished
    output that silently lacked the checkpoint's last blocks."""
    keys = set(checkpoint.keys())
    for name, param in model.named_parameters():
        if name not in keys:
            if name == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False):
                continue
            raise CheckpointError(f"the checkpoint in {checkpoint.dir} has no tensor {name}, which its config.json "
                                  "calls for", "restore the checkpoint's own config.json, or re-download the checkpoint")
        if list(checkpoint.shape(name)) != list(param.shape):
            raise CheckpointError(f"the checkpoint's {name} in {checkpoint.dir} has shape {list(checkpoint.shape(name))}, "
                                  f"its config.json makes it {list(param.shape)}",
                                  "restore the checkpoint's own config.json (it does not describe these weights)")
        if checkpoint.dtype_name(name) not in FLOAT_DTYPES:
            raise CheckpointError(f"the checkpoint's {name} in {checkpoint.dir} is stored as "
                                  f"{checkpoint.dtype_name(name)}, not as floating-point numbers",
                                  "give a floating-point checkpoint (float32, float16 or bfloat16); a quantised one "
                                  "(int weights, GPTQ/AWQ) must be dequantised first")
    stem, n_layers = SUPPORTED[model.config.model_type] + ".", len(decoder_layers(model))
    beyond = sorted(stored_layers(keys, stem) - set(range(n_layers)))
    if beyond:
        raise CheckpointError(f"the checkpoint in {checkpoint.dir} has decoder layers up to {beyond[-1]}, its "
                              f"config.json only {n_layers} (num_hidden_layers)",
                              "restore the checkpoint's own config.json (the job would silently drop the other layers)")
    # The output keeps every other tensor, and streamsvd.load (and the output's remote code) refuse one the model does
    # not have: a "done" job nothing could load. transformers would ignore it, which for a bias the config says the
    # layers lack (attention_bias false) is another model than the checkpoint's. (Stored rotary inv_freq buffers are
    # dropped by the reader, io/checkpoint.COMPUTED_BUFFERS.)
    known = {n for n, _ in model.named_parameters(remove_duplicate=False)} | {n for n, _ in model.named_buffers()}
    unknown = sorted(keys - known)
    if unknown:
        raise CheckpointError(f"the checkpoint in {checkpoint.dir} holds tensor {unknown[0]}, which the model its "
                              f"config.json makes does not have" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""),
                              "check that config.json is the checkpoint's own (its model_type and settings such as "
                              "attention_bias or mlp_bias make the tensors the model has); if that tensor is truly unused, "
                              "remove it from the shard and the index")


def attention_implementation(config: PretrainedConfig) -> str:
    """sdpa where transformers' own class runs it; eager where it does not (Gemma 2: its attention
    logit softcapping has no sdpa path). Either way transformers' own attention code runs."""
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    return "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"


def empty_model(config: PretrainedConfig, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The *ForCausalLM with every parameter on the meta device and real buffers."""
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as exc:  # an unknown hidden_act or rope_type, ... surface only when the model is built
        raise StreamSVDError(f"the model's config.json cannot be built by transformers ({type(exc).__name__}: "
                             f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''})",
                             "restore the checkpoint's own config.json (a value in it is of the wrong kind or unknown "
                             "to this transformers)") from exc
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
