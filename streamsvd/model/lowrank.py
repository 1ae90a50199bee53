"""The two-factor module that replaces a compressed nn.Linear."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..math.pivot import DEFAULT_PIVOT, dense_fallback, pivot_factors


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

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}, pivoted")


# The stored forms of a compressed linear, by the tensor suffixes a shard holds for it.
FORMS = {
    "plain": (".out_factor", ".in_factor"),
    "pivoted": (".out_factor", ".in_rest", ".pivots"),
    "dense": (".weight",),
}


def factor_tensors(full: str, out_factor: torch.Tensor, in_factor: torch.Tensor, bias: torch.Tensor | None,
                   dtype: torch.dtype, factors: str = "plain", pivot: str = DEFAULT_PIVOT) -> dict[str, torch.Tensor]:
    """The tensors a shard holds for the compressed linear `full` (its module name in the model).

    factors="plain": `.in_factor` (k x in), `.out_factor` (out x k). factors="pivoted": `.out_factor`
    (A', out x r), `.in_rest` (B', r x (in - r)), `.pivots` (int32, p then q). Either form falls back to a
    dense `.weight` (the product) when factoring would not be smaller (`math.pivot.dense_fallback`).
    """
    m, n = out_factor.shape[0], in_factor.shape[1]
    if dense_fallback(m, n, in_factor.shape[0], factors):
        tensors = {full + ".weight": (out_factor.double() @ in_factor.double()).to(dtype)}
    elif factors == "pivoted":
        pf = pivot_factors(out_factor, in_factor, pivot)
        tensors = {full + ".out_factor": pf.out_factor.to(dtype), full + ".in_rest": pf.in_rest.to(dtype),
                   full + ".pivots": pf.pivots.to(torch.int32)}
    elif factors == "plain":
        tensors = {full + ".in_factor": in_factor.to(dtype), full + ".out_factor": out_factor.to(dtype)}
    else:
        raise ValueError(f"unknown factor form {factors!r}")
    if bias is not None:
        tensors[full + ".bias"] = bias
    return tensors


def stored_form(keys: set[str], full: str) -> str:
    """Which form the tensors `keys` hold for `full`: pivoted, plain or dense."""
    if full + ".pivots" in keys:
        return "pivoted"
    if full + ".in_factor" in keys:
        return "plain"
    if full + ".weight" in keys:
        return "dense"
    raise KeyError(f"no stored tensors for {full}")


def stored_rank(get, keys: set[str], full: str) -> int:
    """The rank of the stored module (min(out, in) for a dense one)."""
    form = stored_form(keys, full)
    if form == "dense":
        return min(get(full + ".weight").shape)
    return get(full + ".out_factor").shape[1]


def module_from_tensors(get, keys: set[str], full: str, dtype: torch.dtype) -> nn.Module:
    """The module for the compressed linear `full`, from a shard's tensors (`get(name)` reads one).

    Dispatches on the keys present, so outputs written before pivoted factors existed still load.
    """
    bias = get(full + ".bias").to(dtype) if full + ".bias" in keys else None
    form = stored_form(keys, full)
    if form == "pivoted":
        return PivotedLinear.from_tensors(get(full + ".out_factor").to(dtype), get(full + ".in_rest").to(dtype),
                                          get(full + ".pivots"), bias)
    if form == "dense":
        weight = get(full + ".weight").to(dtype)
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        return linear
    return LowRankLinear.from_factors(get(full + ".out_factor").to(dtype), get(full + ".in_factor").to(dtype), bias)


def empty_module(form: str, in_features: int, out_features: int, rank: int, bias: bool, dtype) -> nn.Module:
    """A module of the stored form on the meta device, for a loader to fill from a shard."""
    if form == "pivoted":
        return PivotedLinear(in_features, out_features, rank, bias, device="meta", dtype=dtype)
    if form == "plain":
        return LowRankLinear(in_features, out_features, rank, bias, device="meta", dtype=dtype)
    if form == "dense":
        return nn.Linear(in_features, out_features, bias=bias, device="meta", dtype=dtype)
    raise ValueError(f"unknown stored form {form!r}")


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
