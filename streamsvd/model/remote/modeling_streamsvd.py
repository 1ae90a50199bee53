"""streamsvd's compressed linear layers, and the remote code that loads a streamsvd OUT_DIR with plain transformers.

This one file is both a module of streamsvd (streamsvd/model/lowrank.py imports the layer classes from
it, so streamsvd and the shipped code can never drift apart) and, byte for byte, the
`modeling_streamsvd.py` every OUT_DIR holds. It imports only torch and transformers, so

    AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)

works where streamsvd is not installed. OUT_DIR's config.json is the base model's, with
`model_type` "streamsvd", `auto_map` pointing here, and a "streamsvd" section that names the base
family (`base_model_type`, `base_architectures`) and, per compressed linear, its rank and stored form
(`ranks`, `forms`: pivoted, plain or dense). Loading builds the base family's own transformers model
(attention, norms, rotary tables: transformers' code, never re-implemented) from that config, swaps
each compressed linear for its stored form, and lets transformers' own loader fill every tensor,
refusing any tensor missing or left over (a silently half-random model is the one outcome ruled out).
Without trust_remote_code transformers has no class for model_type "streamsvd" and stops with a
message asking for `trust_remote_code=True`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

MODEL_TYPE = "streamsvd"
SECTION = "streamsvd"
ARCHITECTURE = "StreamSVDForCausalLM"
MODELING_MODULE = "modeling_streamsvd"
AUTO_MAP = {
    "AutoConfig": f"{MODELING_MODULE}.StreamSVDConfig",
    "AutoModelForCausalLM": f"{MODELING_MODULE}.{ARCHITECTURE}",
}


class LowRankLinear(nn.Module):
    """y = out_factor @ (in_factor @ x) + bias, with in_factor (k x in) and out_factor (out x k).

    Two plain matmuls keep it exportable (ONNX, GGUF) and fast on any backend; the names are the
    tensor names in the saved shards.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        kw = {"device": device, "dtype": dtype}
        self.in_factor = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.out_factor = nn.Parameter(torch.empty(out_features, rank, **kw))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **kw))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_factors(cls, out_factor: torch.Tensor, in_factor: torch.Tensor, bias: torch.Tensor | None) -> "LowRankLinear":
        module = cls(in_factor.shape[1], out_factor.shape[0], in_factor.shape[0], bias is not None, dtype=in_factor.dtype)
        with torch.no_grad():
            module.in_factor.copy_(in_factor)
            module.out_factor.copy_(out_factor)
            if bias is not None:
                module.bias.copy_(bias)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.in_factor), self.out_factor, self.bias)

    def dense_weight(self) -> torch.Tensor:
        """The out x in matrix the factors stand for, computed in float64."""
        return self.out_factor.double() @ self.in_factor.double()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"


class PivotedLinear(nn.Module):
    """y = out_factor @ (x[..., p] + in_rest @ x[..., q]) + bias: gauge-fixed rank-r factors (math/pivot.py).

    out_factor is A' (out x r), in_rest is B' (r x (in - r)), pivots the permutation of the input
    features, the r pivots p first, then q. r (in + out - r) numbers instead of r (in + out); only
    index_select, matmul and add, so every export path can take it (docs/DESIGN.md).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        kw = {"device": device, "dtype": dtype}
        self.out_factor = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.in_rest = nn.Parameter(torch.empty(rank, in_features - rank, **kw))
        self.register_buffer("pivots", torch.empty(in_features, dtype=torch.long, device=device))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **kw))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_tensors(cls, out_factor: torch.Tensor, in_rest: torch.Tensor, pivots: torch.Tensor,
                     bias: torch.Tensor | None) -> "PivotedLinear":
        rank = out_factor.shape[1]
        module = cls(rank + in_rest.shape[1], out_factor.shape[0], rank, bias is not None, dtype=out_factor.dtype)
        with torch.no_grad():
            module.out_factor.copy_(out_factor)
            module.in_rest.copy_(in_rest)
            module.pivots.copy_(pivots.to(torch.long))
            if bias is not None:
                module.bias.copy_(bias)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Two gathers and one addmm (x_p + x_q B'^T): measured faster than one gather of all features
        # followed by slices, and than a scattered [I | B'] matmul (tools/bench_layers.py, docs/RESULTS.md).
        r = self.rank
        flat = x.reshape(-1, self.in_features)
        z = torch.addmm(flat.index_select(1, self.pivots[:r]), flat.index_select(1, self.pivots[r:]), self.in_rest.t())
        return F.linear(z, self.out_factor, self.bias).reshape(*x.shape[:-1], self.out_features)

    def dense_weight(self) -> torch.Tensor:
        """W' = A' [I | B'] P^T (out x in), computed in float64: the columns p are A', the columns q A' B'."""
        a = self.out_factor.double()
        weight = torch.empty(self.out_features, self.in_features, dtype=torch.float64, device=a.device)
        pivots = self.pivots.long()
        weight[:, pivots[: self.rank]] = a
        weight[:, pivots[self.rank:]] = a @ self.in_rest.double()
        return weight

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}, pivoted")


def empty_module(form: str, in_features: int, out_features: int, rank: int, bias: bool, dtype, device=None) -> nn.Module:
    """An unfilled module of the stored form ("pivoted", "plain" or "dense") for a loader to fill."""
    if form == "pivoted":
        return PivotedLinear(in_features, out_features, rank, bias, device=device, dtype=dtype)
    if form == "plain":
        return LowRankLinear(in_features, out_features, rank, bias, device=device, dtype=dtype)
    if form == "dense":
        return nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
    raise ValueError(f"unknown stored form {form!r}")


def swap_compressed_linears(model: nn.Module, section: dict, dtype=None, device=None) -> None:
    """Replace each compressed nn.Linear of `model` by an empty module of its stored form.

    A section without `forms` (outputs written before pivoted factors existed) means all plain;
    dense modules stay the model's own nn.Linear.
    """
    forms = section.get("forms", {})
    for name, rank in section["ranks"].items():
        form = forms.get(name, "plain")
        if form == "dense":
            continue
        linear = model.get_submodule(name)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, empty_module(form, linear.in_features, linear.out_features, rank,
                                            linear.bias is not None, dtype or linear.weight.dtype, device))


def base_config_dict(config_dict: dict) -> dict:
    """The base family's config.json from an OUT_DIR's: model_type and architectures back, no auto_map.

    A config that is not of model_type "streamsvd" (a plain checkpoint, or an OUT_DIR written before
    outputs carried remote code) is returned unchanged (as a copy). The "streamsvd" section stays.
    """
    config_dict = dict(config_dict)
    if config_dict.get("model_type") != MODEL_TYPE:
        return config_dict
    section = config_dict.get(SECTION) or {}
    config_dict["model_type"] = section.get("base_model_type")
    config_dict.pop("auto_map", None)
    config_dict.pop("architectures", None)
    if section.get("base_architectures") is not None:
        config_dict["architectures"] = section["base_architectures"]
    return config_dict


def remote_config_dict(base_dict: dict, section: dict) -> dict:
    """OUT_DIR's config.json: the base config, model_type "streamsvd", auto_map to this file, and the
    section (with the base family's model_type and architectures added)."""
    config_dict = dict(base_dict)
    config_dict[SECTION] = dict(section, base_model_type=base_dict.get("model_type"),
                                base_architectures=base_dict.get("architectures"))
    config_dict["model_type"] = MODEL_TYPE
    config_dict["architectures"] = [ARCHITECTURE]
    config_dict["auto_map"] = dict(AUTO_MAP)
    return config_dict


class StreamSVDConfig(PreTrainedConfig):
    """The config of a streamsvd output: the base family's fields, and the "streamsvd" section."""

    model_type = MODEL_TYPE

    def base_config(self) -> PreTrainedConfig:
        """The base family's own config class, built from the same fields (and keeping the section)."""
        config_dict = base_config_dict(self.to_dict())
        base_type = config_dict.get("model_type")
        if base_type not in CONFIG_MAPPING:
            raise ValueError(f"this streamsvd output is of model_type {base_type!r}, which this transformers "
                             f"version does not know; install a transformers version that supports it")
        config_dict.pop("model_type")
        config_dict.pop("transformers_version", None)
        config = CONFIG_MAPPING[base_type].from_dict(config_dict)
        attn = getattr(self, "_attn_implementation_internal", None)
        if attn is not None:
            config._attn_implementation = attn
        return config


class StreamSVDForCausalLM(PreTrainedModel):
    """Loads a streamsvd output as the base family's own *ForCausalLM, compressed linears swapped.

    `from_pretrained` returns an instance of a subclass of the base class (e.g. LlamaForCausalLM),
    so generate(), device_map, dtype and everything else are transformers' own.
    """

    config_class = StreamSVDConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        if not isinstance(config, StreamSVDConfig):
            config = StreamSVDConfig.from_pretrained(pretrained_model_name_or_path)
        base = config.base_config()
        section = getattr(base, SECTION)
        quant = section.get("quantization")
        if quant:
            # Packed integer factors (`run --quant`): this file does not dequantise them yet.
            raise ValueError(f"{pretrained_model_name_or_path} stores its factors quantised ({quant.get('type', 'int')}"
                             f"{quant.get('num_bits', '')}, groups of {quant.get('group_size')}), which this remote code "
                             "cannot load yet; load it with streamsvd.load (pip install streamsvd), or compress "
                             "without --quant for an output that loads anywhere")
        model_class = compressed_class(AutoModelForCausalLM._model_mapping[type(base)])
        want_info = kwargs.pop("output_loading_info", False)
        kwargs.pop("trust_remote_code", None)
        model, info = model_class.from_pretrained(pretrained_model_name_or_path, *model_args, config=base,
                                                  output_loading_info=True, **kwargs)
        bad = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if bad:
            raise ValueError(f"{pretrained_model_name_or_path} does not match its streamsvd config "
                             f"(base {section.get('base_model_type')}): {bad}; the output is damaged or incomplete, "
                             "rerun the `streamsvd run` command that made it")
        return (model, info) if want_info else model


_CLASSES: dict[type, type] = {}


def compressed_class(base_class: type) -> type:
    """A subclass of the base family's *ForCausalLM whose __init__ swaps in the stored forms."""
    if base_class not in _CLASSES:
        def __init__(self, config, *args, **kwargs):
            base_class.__init__(self, config, *args, **kwargs)
            swap_compressed_linears(self, getattr(config, SECTION))

        name = "StreamSVD" + base_class.__name__
        _CLASSES[base_class] = type(name, (base_class,), {"__init__": __init__, "__module__": __name__, "__qualname__": name})
    return _CLASSES[base_class]
