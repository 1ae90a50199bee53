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

import contextlib

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


# ---------------------------------------------------------------- quantised factors (`run --quant`)
# compressed-tensors' pack-quantized layout; the format is described in streamsvd/model/quantized.py,
# which packs (the writer) and imports this reader.
QUANT_PARTS = ("_packed", "_scale", "_zero_point", "_shape")


def unpack_int32(packed: torch.Tensor, bits: int, length: int, dim: int = 1) -> torch.Tensor:
    """The int8 values `pack_int32` packed: `length` of them along `dim`."""
    value = packed.to(torch.int64)
    if dim == 0:
        value = value.t()
    per_word = 32 // bits
    if value.dim() != 2 or value.shape[1] != -(-length // per_word):
        # another bit width than the packing's (an edited config) would otherwise unpack into other numbers
        raise ValueError(f"packed words of shape {tuple(packed.shape)} do not hold {length} values of {bits} bits "
                         f"along dimension {dim}")
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    fields = (value.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    out = (fields.reshape(value.shape[0], -1)[:, :length] - (1 << (bits - 1))).to(torch.int8)
    return (out.t() if dim == 0 else out).contiguous()


def dequantize(packed: torch.Tensor, scale: torch.Tensor, shape, bits: int, group_size: int,
               zero_point: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The rows x cols tensor a packed one stands for, in `dtype` (default: the scale's)."""
    rows, cols = (int(s) for s in shape)
    if packed.shape[0] != rows:
        raise ValueError(f"packed words of shape {tuple(packed.shape)} do not hold {rows} rows")
    q = unpack_int32(packed, bits, cols).to(torch.float32)
    if scale.shape != (rows, -(-cols // group_size)):
        raise ValueError(f"a scale of shape {tuple(scale.shape)} does not fit {rows} x {cols} in groups of {group_size}")
    index = torch.arange(cols) // group_size  # column j belongs to group j // G
    s = scale.to(torch.float32)[:, index]
    if zero_point is not None:
        zp = unpack_int32(zero_point, bits, rows, dim=0).to(torch.float32)[:, index]
        q = q - zp
    return (q * s).to(dtype or scale.dtype)


def quant_readable(quant: dict) -> bool:
    """Whether this reader takes a `quantization` entry: pack-quantized, 4 or 8 bits, an integer group size."""
    return (quant.get("format") == "pack-quantized" and quant.get("num_bits") in (4, 8)
            and isinstance(quant.get("group_size"), int))


def ties_embeddings(config) -> bool:
    """Whether the output head shares the input embedding's tensor (so the head is not stored)."""
    return bool(getattr(config, "tie_word_embeddings", False) or getattr(config.get_text_config(), "tie_word_embeddings", False))


def quantized_bases(keys) -> set[str]:
    """The tensor names (`NAME.T`) that `keys` hold in packed form."""
    return {k[: -len("_packed")] for k in keys if k.endswith("_packed")}


def logical_keys(keys) -> set[str]:
    """The names a model sees: a packed tensor's parts become its one name."""
    keys = set(keys)
    bases = quantized_bases(keys)
    parts = {b + p for b in bases for p in QUANT_PARTS}
    return (keys - parts) | bases


def dequantizing_getter(get, keys, bits: int, group_size: int, dtype: torch.dtype | None = None):
    """`get(name)` over logical names: a packed tensor comes back dequantised, the rest as stored.

    `get` reads one stored tensor by name; `keys` are the stored names.
    """
    keys = set(keys)
    bases = quantized_bases(keys)

    def read(name: str) -> torch.Tensor:
        if name in bases:
            zp = get(name + "_zero_point") if name + "_zero_point" in keys else None
            return dequantize(get(name + "_packed"), get(name + "_scale"), get(name + "_shape").tolist(), bits,
                              group_size, zp, dtype)
        return get(name)

    return read


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


SAVED_COPY = "saved_copy"  # in the section of a folder that save_pretrained wrote from a loaded output


def is_saved_copy(path) -> bool:
    """Whether `path` is a folder save_pretrained wrote from a loaded streamsvd output (`save_pretrained` below)."""
    import json
    import os

    try:
        with open(os.path.join(path, "config.json")) as f:
            section = json.load(f).get(SECTION)
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(section, dict) and section.get(SAVED_COPY) is True


def save_pretrained(model: nn.Module, base_class: type, save_directory, *args, **kwargs) -> None:
    """A loaded output saved as an output: transformers' own save_pretrained writes the base family's config.json
    with the factors' tensors, which plain transformers then loaded, with or without trust_remote_code, as the base
    model with every compressed linear's weight randomly initialised (it only printed a load report; a probe,
    2026-12-07). Its config.json is made an output's (model_type "streamsvd", auto_map) and this file is written
    beside it, so from_pretrained asks for trust_remote_code and then loads the factors. The section is marked
    `saved_copy` (no state file records its files: it is read unchecked) and loses `quantization` (the saved
    factors are the dequantised floating-point ones)."""
    import json
    import os

    if kwargs.get("push_to_hub"):
        raise ValueError("save a streamsvd model with save_pretrained(DIR) first, then upload DIR (huggingface_hub's "
                         "upload_folder): pushed directly it would be uploaded as the base family's model, which "
                         "transformers loads with random weights in place of the factors")
    base_class.save_pretrained(model, save_directory, *args, **kwargs)
    config_path = os.path.join(save_directory, "config.json")
    with open(config_path) as f:
        config_dict = json.load(f)
    section = dict(config_dict.pop(SECTION))
    for key in ("base_model_type", "base_architectures", "quantization"):
        section.pop(key, None)
    section[SAVED_COPY] = True
    with open(__file__, "rb") as f:
        source = f.read()
    with open(os.path.join(save_directory, f"{MODELING_MODULE}.py"), "wb") as f:
        f.write(source)
    with open(config_path, "w") as f:
        json.dump(remote_config_dict(config_dict, section), f, indent=2, sort_keys=True)
        f.write("\n")


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


STATE_FILE = "streamsvd_state.json"  # streamsvd's job/state.STATE_NAME
STATE_OPTIONAL = ("profile_digest", "settings")  # job/state.OPTIONAL_FIELDS: left out of the digest while null
_RERUN = "rerun the `streamsvd run` (or `streamsvd quantize`) command that made it"


def check_output(path, verify: bool = True) -> None:
    """Refuse a local OUT_DIR whose streamsvd job did not finish, or whose files are not as the job wrote them,
    as streamsvd.load does (streamsvd/model/loading.check_finished): every file its state records, by size, and with
    `verify` by sha256 (one read of the output). Without this a changed byte in a shard, an edited config or a
    stopped job's state loaded as a model with other logits. A hub id is not checked (the state is not fetched)."""
    import hashlib
    import json
    import os

    if not (isinstance(path, (str, os.PathLike)) and os.path.isdir(path)):
        return
    try:
        with open(os.path.join(path, STATE_FILE)) as f:
            state = json.load(f)
    except FileNotFoundError:
        if is_saved_copy(path):  # save_pretrained of a loaded output: it never had a state to check against
            return
        if verify:
            raise ValueError(f"{path} lacks {STATE_FILE}, which records the files its streamsvd job wrote, so they cannot "
                             "be checked; copy it from the folder the job wrote, or pass streamsvd_verify=False to load "
                             "without checks") from None
        return
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}'s {STATE_FILE} cannot be read ({e}); the output is damaged, {_RERUN}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}'s {STATE_FILE} is not a JSON object; the output is damaged, {_RERUN}")
    # its own digest, as streamsvd's reader checks it (job/state.JobState.content_digest): a state edited by hand
    # (a shard's sha256 put in for changed bytes, `complete` set) loaded as the model it described (a probe, 12-07)
    content = {k: v for k, v in state.items() if k != "digest" and not (k in STATE_OPTIONAL and v is None)}
    if hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest() != state.get("digest"):
        raise ValueError(f"{path}'s {STATE_FILE} does not match its own digest (it was edited by hand, or damaged), so "
                         f"its records cannot be trusted; {_RERUN}")
    files = state.get("files")
    if not isinstance(files, dict):
        raise ValueError(f"{path}'s {STATE_FILE} records no files; the output is damaged, {_RERUN}")
    if os.path.exists(os.path.join(path, "model.safetensors")) and "model.safetensors" not in files:
        # transformers reads it in place of the index's shards: a stray copy of the original weights loaded as the output
        raise ValueError(f"{path} holds a model.safetensors its streamsvd job did not write, which transformers would load "
                         "in place of the output's shards; remove it")
    if state.get("complete") is not True:
        raise ValueError(f"{path} is an unfinished streamsvd output (its job was stopped); run the same streamsvd "
                         "command again to finish it")
    for name in sorted(files):
        record, where = files[name], os.path.join(path, name)
        try:
            problem = None if os.path.getsize(where) == record["size"] else f"size {os.path.getsize(where)}, recorded {record['size']}"
            if problem is None and verify:
                digest = hashlib.sha256()
                with open(where, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        digest.update(chunk)
                problem = None if digest.hexdigest() == record["sha256"] else "contents differ from what was written"
        except FileNotFoundError:
            problem = "missing"
        except (OSError, KeyError, TypeError) as e:
            problem = f"cannot be checked ({e})"
        if problem:
            raise ValueError(f"{path} is a damaged streamsvd output: {name}: {problem}; {_RERUN} (`streamsvd verify` "
                             "lists the damaged files)")


def is_permutation(pivots: torch.Tensor) -> bool:
    """Whether `pivots` holds each of 0 .. n-1 once (streamsvd.load's reader checks its tensors with it too)."""
    order = pivots.to(torch.long).sort().values.cpu()
    return torch.equal(order, torch.arange(order.numel()))


def check_pivots(model: nn.Module, path) -> None:
    """Refuse pivots that are not a permutation of their layer's inputs (a wrong model, or an index error later)."""
    for name, module in model.named_modules():
        if isinstance(module, PivotedLinear) and module.pivots.device.type != "meta":
            if not is_permutation(module.pivots):
                raise ValueError(f"{path}'s {name}.pivots is not a permutation of the layer's inputs; the output is "
                                 f"damaged, {_RERUN}")


@contextlib.contextmanager
def held_for_reading(path):
    """A shared flock on the local folder `path` while it is read, as streamsvd's own readers hold it: a `streamsvd
    run` rewriting the folder holds it exclusively, so a load during `run --restart` is refused instead of mixing
    two jobs' shards. Nothing is held for a hub id, off POSIX, or where the file system has no flock."""
    import os

    try:
        import fcntl
    except ImportError:
        fcntl = None
    fd = None
    if fcntl is not None and isinstance(path, (str, os.PathLike)) and os.path.isdir(path):
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(f"{path} is being written by a streamsvd run; wait for it to finish, then load it") from None
        except OSError:
            if fd is not None:
                os.close(fd)
            fd = None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


class StreamSVDForCausalLM(PreTrainedModel):
    """Loads a streamsvd output as the base family's own *ForCausalLM, compressed linears swapped.

    `from_pretrained` returns an instance of a subclass of the base class (e.g. LlamaForCausalLM),
    so generate(), device_map, dtype and everything else are transformers' own.
    """

    config_class = StreamSVDConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        with held_for_reading(pretrained_model_name_or_path):
            return cls._from_pretrained_held(pretrained_model_name_or_path, *model_args, config=config, **kwargs)

    @classmethod
    def _from_pretrained_held(cls, pretrained_model_name_or_path, *model_args, config=None, streamsvd_verify=True, **kwargs):
        check_output(pretrained_model_name_or_path, streamsvd_verify)
        model, info = cls._load_checked(pretrained_model_name_or_path, *model_args, config=config, **kwargs)
        check_pivots(model, pretrained_model_name_or_path)
        return (model, info) if info is not None else model

    @classmethod
    def _load_checked(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        if not isinstance(config, StreamSVDConfig):
            config = StreamSVDConfig.from_pretrained(pretrained_model_name_or_path)
        base = config.base_config()
        section = getattr(base, SECTION)
        quant = section.get("quantization")
        model_class = compressed_class(AutoModelForCausalLM._model_mapping[type(base)])
        want_info = kwargs.pop("output_loading_info", False)
        if quant:
            # Packed integer factors (`run --quant`): transformers' loader has no place for them, so they are
            # read here, dequantised, and loaded into the same model streamsvd.load builds.
            model = load_quantized(model_class, pretrained_model_name_or_path, base, section, quant, **kwargs)
            info = {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
            return model, (info if want_info else None)
        kwargs.pop("trust_remote_code", None)
        model, info = model_class.from_pretrained(pretrained_model_name_or_path, *model_args, config=base,
                                                  output_loading_info=True, **kwargs)
        bad = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if bad:
            raise mismatch(pretrained_model_name_or_path, section, bad)
        return model, (info if want_info else None)


def load_quantized(model_class: type, path, config: PreTrainedConfig, section: dict, quant: dict, dtype=None,
                   torch_dtype=None, **ignored) -> nn.Module:
    """A quantised OUT_DIR (a local folder) as `model_class`: every stored tensor read from its shards, packed
    factors dequantised (the reader above, as streamsvd.load does), then cast to `dtype` (default: the saved
    one). A tensor missing or left over is refused, as on the plain path."""
    import json
    from pathlib import Path

    from safetensors import safe_open

    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"{path}: a quantised streamsvd output loads from a local folder; download it first")
    if not quant_readable(quant):
        raise ValueError(f"{path} stores its factors quantised as {quant!r}, which this remote code cannot read; "
                         "load it with a newer streamsvd (streamsvd.load)")
    dtype = dtype if dtype not in (None, "auto") else torch_dtype
    if dtype in (None, "auto"):
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    index = root / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    stored = {}
    for shard in shards:
        with safe_open(str(root / shard), framework="pt") as f:
            for key in f.keys():
                stored[key] = f.get_tensor(key)
    read = dequantizing_getter(stored.__getitem__, stored.keys(), quant["num_bits"], quant["group_size"])
    state = {}
    for key in logical_keys(stored):
        try:
            value = read(key)
        except KeyError as e:  # a packed tensor without its scale, zero point or shape
            raise ValueError(f"{path} lacks {e} for the quantised tensor {key}; the output is damaged or incomplete, "
                             "rerun the `streamsvd run` command that made it") from None
        state[key] = value.to(dtype) if value.is_floating_point() else value.to(torch.long)
    model = model_class._from_config(config, dtype=dtype)  # as AutoModelForCausalLM.from_config builds it for streamsvd.load
    head = model.get_output_embeddings()
    head_key = next((n + ".weight" for n, mod in model.named_modules() if mod is head), None)
    # A head stored beside a config that ties it: transformers keeps the stored head (it warns that the config is
    # wrong), so it gets its own tensor here; loaded into the tied one, it overwrote the input embedding too.
    tie = ties_embeddings(config) and head_key not in state
    if ties_embeddings(config) and not tie:
        head.weight = nn.Parameter(torch.empty_like(head.weight))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set()
    if tie:
        model.tie_weights()
        tied = {head_key}
    missing = sorted(set(missing) - tied)
    if missing or unexpected:
        raise mismatch(path, section, {"missing_keys": missing, "unexpected_keys": sorted(unexpected)})
    return model.eval()


def mismatch(path, section: dict, bad: dict) -> ValueError:
    """The error for an OUT_DIR whose tensors are not the ones its config describes."""
    return ValueError(f"{path} does not match its streamsvd config (base {section.get('base_model_type')}): {bad}; "
                      "the output is damaged or incomplete, rerun the `streamsvd run` command that made it")


_CLASSES: dict[type, type] = {}


def compressed_class(base_class: type) -> type:
    """A subclass of the base family's *ForCausalLM whose __init__ swaps in the stored forms and whose save_pretrained
    writes an output transformers loads with trust_remote_code (`save_pretrained` above)."""
    if base_class not in _CLASSES:
        def __init__(self, config, *args, **kwargs):
            base_class.__init__(self, config, *args, **kwargs)
            swap_compressed_linears(self, getattr(config, SECTION))

        def save(self, save_directory, *args, **kwargs):
            save_pretrained(self, base_class, save_directory, *args, **kwargs)

        save.__doc__ = save_pretrained.__doc__
        name = "StreamSVD" + base_class.__name__
        _CLASSES[base_class] = type(name, (base_class,), {"__init__": __init__, "save_pretrained": save,
                                                          "__module__": __name__, "__qualname__": name})
    return _CLASSES[base_class]
