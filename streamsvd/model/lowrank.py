"""The two-factor module that replaces a compressed nn.Linear."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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


def factor_tensors(full: str, out_factor: torch.Tensor, in_factor: torch.Tensor, bias: torch.Tensor | None,
                   dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors a shard holds for the compressed linear `full` (its module name in the model)."""
    tensors = {full + ".in_factor": in_factor.to(dtype), full + ".out_factor": out_factor.to(dtype)}
    if bias is not None:
        tensors[full + ".bias"] = bias
    return tensors


def module_from_tensors(get, keys: set[str], full: str, dtype: torch.dtype) -> LowRankLinear:
    """The module for the compressed linear `full`, from a shard's tensors (`get(name)` reads one)."""
    bias = get(full + ".bias").to(dtype) if full + ".bias" in keys else None
    return LowRankLinear.from_factors(get(full + ".out_factor").to(dtype), get(full + ".in_factor").to(dtype), bias)


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
