"""The stored forms of a compressed nn.Linear: tensors in a shard <-> modules (pivoted, plain, dense)."""

from __future__ import annotations

import torch
from torch import nn

from ..math.pivot import DEFAULT_PIVOT, dense_fallback, pivot_factors
# The layer classes live in the remote-code file that every OUT_DIR ships, so the two never drift apart.
from .remote.modeling_streamsvd import LowRankLinear, PivotedLinear
from .remote.modeling_streamsvd import empty_module as _empty_module


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
    return _empty_module(form, in_features, out_features, rank, bias, dtype, device="meta")


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
