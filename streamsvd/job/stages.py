"""The stages of one block, each a function the job's loop calls in turn.

1. `collect_statistics`: stream the block's inputs through it and accumulate one Gram per distinct
   linear input (GPTQ-style `add_batch` through forward pre-hooks).
2. `factor_block`: factor every linear from those statistics, replace it in the layer by the
   module rebuilt from exactly the tensors that go into the shard, and return the shard's
   tensors, the spectra and the per-module records.
3. The job then propagates the inputs through the compressed block and commits the block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..io.checkpoint import TORCH_DTYPES, Checkpoint
from ..math.factorize import Whitening, factorize, factorize_output_side, rank_for_ratio, stored_numel, whiten
from ..math.gram import GramAccumulator, OutputGramAccumulator
from ..model.architecture import linear_modules
from ..model.lowrank import factor_tensors, module_from_tensors, replace_module, stored_form, stored_rank
from .plan import choose_svd


class GramCollector:
    """Forward pre-hooks that give each distinct linear input one Gram (q/k/v share, gate/up share)."""

    def __init__(self, linears: dict[str, nn.Linear], output_side: set[str] = frozenset()):
        self.grams: dict[str, GramAccumulator] = {}
        self.group_of: dict[str, str] = {}
        # Linears factored on their output side get the Gram of their outputs instead (out x out).
        self.output_grams = {name: OutputGramAccumulator(linears[name].weight) for name in output_side}
        self._batch_inputs: dict[tuple, tuple[str, torch.Tensor]] = {}
        self._handles = [
            m.register_forward_pre_hook(self._output_hook(name) if name in output_side else self._hook(name))
            for name, m in linears.items()
        ]

    def _output_hook(self, name):
        def fn(module, inputs):
            self.output_grams[name].add_batch(inputs[0])

        return fn

    def _hook(self, name):
        def fn(module, inputs):
            x = inputs[0]
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
            seen = self._batch_inputs.get(key)
            if seen is None:
                # Holding x keeps its memory from being reused by another input within this batch.
                self._batch_inputs[key] = (name, x)
                leader = self.group_of.setdefault(name, name)
                self.grams.setdefault(leader, GramAccumulator(x.shape[-1])).add_batch(x)
            else:
                self.group_of.setdefault(name, self.group_of[seen[0]])

        return fn

    def next_batch(self) -> None:
        self._batch_inputs.clear()

    def close(self) -> None:
        self.next_batch()
        for h in self._handles:
            h.remove()


@torch.no_grad()
def collect_statistics(
    layer: nn.Module,
    batches: Iterable[tuple[int, int]],
    read: Callable[[int, int], torch.Tensor],
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    on_output: Callable[[int, torch.Tensor], None] | None = None,
    output_side: set[str] = frozenset(),
) -> GramCollector:
    """Pass 1: every batch through the (original) layer with the Gram hooks on.

    `on_output(start, hidden)` receives the layer's outputs (the next block's inputs when the job
    propagates the original model's activations).
    """
    collector = GramCollector(linear_modules(layer), output_side)
    try:
        for start, stop in batches:
            out = forward(layer, read(start, stop))
            collector.next_batch()
            if on_output is not None:
                on_output(start, out)
    finally:
        collector.close()
    return collector


@dataclass
class FactoredBlock:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # the block's shard, by full name
    spectra: dict[str, torch.Tensor] = field(default_factory=dict)  # full module name -> whitened spectrum
    records: dict[str, dict] = field(default_factory=dict)  # full module name -> report entry


def output_side_linears(layer: nn.Module, method: str) -> set[str]:
    """The linears of `layer` factored from their output Gram (job/plan.py factor_route: out < in, eig, input not shared)."""
    from .plan import factor_route, input_group

    linears = linear_modules(layer)
    groups = [input_group(name, m.in_features) for name, m in linears.items()]
    return {
        name for (name, m), group in zip(linears.items(), groups)
        if factor_route(method, m.out_features, m.in_features, groups.count(group) > 1) == "output"
    }


def store_dtype(ckpt: Checkpoint, key: str) -> torch.dtype:
    return TORCH_DTYPES[ckpt.dtype_name(key)]


@torch.no_grad()
def factor_block(
    layer: nn.Module, prefix: str, ckpt: Checkpoint, stats: GramCollector, ratio: float, method: str,
    compute_dtype: torch.dtype = torch.float32, factors: str = "pivoted", svd: str = "exact",
    ranks: dict[str, int] | None = None,
) -> FactoredBlock:
    """Factor every linear of `layer` and swap in the module the shard will hold.

    `factors`: the stored form, "pivoted" (default) or "plain" (model/lowrank.py); the rank for
    `ratio` is the one that form affords. A module that would not get smaller is stored dense.
    `ranks` (full module name -> rank, from math/allocate.py) wins over `ratio` when given.
    """
    block = FactoredBlock()
    whitenings: dict[str, Whitening] = {}
    linears = linear_modules(layer)
    for name, linear in linears.items():
        full = prefix + name
        rank = ranks[full] if ranks is not None else rank_for_ratio(linear.out_features, linear.in_features, ratio, factors)
        if name in stats.output_grams:
            group = name
            f = factorize_output_side(linear.weight, stats.output_grams.pop(name).gram, rank)
        else:
            group = stats.group_of[name]
            if method != "svd" and group not in whitenings:
                whitenings[group] = whiten(stats.grams.pop(group).gram, method)  # the Gram is not needed again
            f = factorize(linear.weight, whitenings.get(group), rank, method,
                          svd=choose_svd(svd, linear.out_features, linear.in_features, rank))
        bias = ckpt.get(full + ".bias") if (full + ".bias") in ckpt else None
        stored = factor_tensors(full, f.out_factor, f.in_factor, bias, store_dtype(ckpt, full + ".weight"), factors)
        form = stored_form(set(stored), full)
        kept = stored_rank(stored.__getitem__, set(stored), full)
        block.tensors.update(stored)
        block.spectra[full] = f.spectrum.to(torch.float32)
        block.records[full] = {
            "in_features": linear.in_features,
            "out_features": linear.out_features,
            "rank": kept,
            "form": form,
            "stored_numel": stored_numel(linear.out_features, linear.in_features, kept, "plain" if form == "plain" else "pivoted"),
            "input_group": prefix + group,
            "truncation_loss": f.truncation_loss(),
            "cholesky_shift": f.shift,
        }
        if group in whitenings and not any(stats.group_of.get(other) == group for other in list(linears)[list(linears).index(name) + 1 :]):
            del whitenings[group]  # the last reader of this input is done
        # Exactly what a resume rebuilds from the saved shard (store dtype, then compute dtype).
        replace_module(layer, name, module_from_tensors(stored.__getitem__, set(stored), full, compute_dtype))
    replaced = {prefix + n + s for n in linears for s in (".weight", ".bias")}
    for key in ckpt.keys():
        if key.startswith(prefix) and key not in replaced:
            block.tensors[key] = ckpt.get(key)
    return block
