"""The stages of one block, each a function the job's loop calls in turn.

1. `collect_statistics`: stream the block's inputs through it and accumulate one Gram per distinct
   linear input (GPTQ-style `add_batch` through forward pre-hooks).
2. `factor_block`: factor every linear from those statistics, replace it in the layer by the
   module rebuilt from exactly the tensors that go into the shard, and return the shard's
   tensors, the spectra and the per-module records.
3. The job then propagates the inputs through the compressed block and commits the block.

With sequential calibration or compensation (`GroupPasses`), statistics and factoring alternate
group by group instead: each input group (q/k/v, o, gate/up, down, in the order the forward
reaches them) is calibrated on the inputs the block's already-compressed groups give it, and, when
compensating, paired token by token with the original block's inputs to the same linear
(math/compensate.py).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import faults
from ..errors import StreamSVDError
from ..io.activations import ActivationFile
from ..io.checkpoint import TORCH_DTYPES, Checkpoint
from ..math.compensate import (ProjectedCrossAccumulator, compensated_whitening, cross_accumulator, factorize_compensated,
                               output_error)
from ..math.factorize import factorize, factorize_output_side, rank_for_ratio, stored_numel, whiten
from ..math.gram import GramAccumulator, OutputGramAccumulator, shrink_gram, shrunk_output_gram
from ..math.quantize import QuantSpec, quantize_module_tensors
from ..model.quantized import dequantizing_getter, logical_keys
from ..model.architecture import linear_modules
from ..model.lowrank import factor_tensors, module_from_tensors, replace_module, stored_form, stored_rank
from ..timing import charged
from .distributed import World
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
            with charged("accumulate"):
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
                with charged("accumulate"):
                    self.grams.setdefault(leader, GramAccumulator(x.shape[-1], x.device)).add_batch(x)
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


class _StopForward(Exception):
    """Raised by a pre-hook to end a pass once everything it wants has been captured."""


@torch.no_grad()
def forward_groups(layer: nn.Module, hidden: torch.Tensor, forward: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> list[list[str]]:
    """The linears of `layer` grouped by shared input, in the order the forward reaches them (one probe)."""
    linears = linear_modules(layer)
    groups: list[list[str]] = []
    seen: dict[tuple, tuple[int, torch.Tensor]] = {}  # holding x keeps its memory from being reused

    def hook(name):
        def fn(module, inputs):
            x = inputs[0]
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
            if key in seen:
                groups[seen[key][0]].append(name)
            else:
                seen[key] = (len(groups), x)
                groups.append([name])
        return fn

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in linears.items()]
    try:
        forward(layer, hidden)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in linears if not any(n in g for g in groups)]
    return groups + [[n] for n in missing]  # a linear the forward never reached keeps its own (empty) group


@torch.no_grad()
def replayable_parts(layer: nn.Module, hidden: torch.Tensor,
                     forward: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> dict[str, tuple[str, int]]:
    """The block's direct children whose output is one of their linears' output as it is (one probe).

    child name -> (that linear's name, 0 when the child returns the tensor itself, else the length of the
    tuple it returns, all of whose other items are None). A Llama-style block: self_attn -> o_proj (the
    tuple (output, None) of transformers' attention), mlp -> down_proj. Only a child called once per
    forward, whose linear is called once and whose output is that linear's very tensor, qualifies: what
    `Replay` may replace by the linear alone without changing a bit.
    """
    linears = linear_modules(layer)
    children = dict(layer.named_children())
    seen: dict[str, list] = {}

    def hook(name):
        def fn(module, inputs, out):
            seen.setdefault(name, []).append(out)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in list(linears.items()) + list(children.items())]
    try:
        forward(layer, hidden)
    finally:
        for h in handles:
            h.remove()
    parts = {}
    for child in children:
        outs = seen.get(child, [])
        if len(outs) != 1:
            continue
        out, items = outs[0], 0
        if isinstance(out, tuple) and out and all(o is None for o in out[1:]):
            out, items = out[0], len(out)
        if not isinstance(out, torch.Tensor):
            continue
        tail = next((n for n in linears if n.startswith(child + ".") and len(seen.get(n, [])) == 1
                     and seen[n][0] is out), None)
        if tail is not None:
            parts[child] = (tail, items)
    return parts


class Replay:
    """The compressed block's finished parts run from their saved inputs, not again (group-by-group passes).

    Group by group, each pass runs the compressed block up to the group it calibrates, and the propagate
    stage runs it whole: the attention ran again in every later pass and once more to propagate. A part
    (`replayable_parts`: self_attn -> o_proj, mlp -> down_proj) whose linears are all factored is replayed
    as its last linear applied to that linear's input, saved in the linear's own pass, when everything
    before it in the block was already final: the same float32 tensor the forward would make again (same
    kernels, same batches), so the output is byte-identical (tested). One float32 file per part,
    (samples, seqlen, in_features), for one block (job/plan.py's disk "replayed inputs").
    """

    PREFIX = "replay-inputs-"

    def __init__(self, folder: Path, samples: int, seqlen: int, layer: nn.Module, parts: dict[str, tuple[str, int]]):
        linears = linear_modules(layer)
        self.layer, self.parts = layer, parts
        self.members = {child: {n for n in linears if n.startswith(child + ".")} for child in parts}
        self.files = {tail: ActivationFile(Path(folder) / f"{self.PREFIX}{i}.bin",
                                           (samples, seqlen, linears[tail].in_features), "float32", create=True)
                      for i, (tail, _) in enumerate(parts.values())}
        self.dtypes: dict[str, torch.dtype] = {}
        self.saved: set[str] = set()  # tails whose every batch's input is on disk
        self.ready: set[str] = set()  # children replayed from now on
        self.factored: set[str] = set()
        self.batch = (0, 0)

    def to_save(self, names: Iterable[str]) -> list[str]:
        """The tails among `names` (a pass's linears) whose inputs this pass saves."""
        names = set(names)
        return [tail for tail in self.files if tail in names and tail not in self.saved]

    def save(self, tail: str, x: torch.Tensor) -> None:
        self.dtypes[tail] = x.dtype
        self.files[tail].write(self.batch[0], x)

    def done_factoring(self, names: Iterable[str]) -> None:
        """After a pass's linears are factored: a part whose linears are all final and whose input is saved
        is replayed from the next pass on."""
        self.factored.update(names)
        for child, (tail, _) in self.parts.items():
            if tail in self.saved and self.members[child] <= self.factored:
                self.ready.add(child)

    def _forward(self, child: str):
        tail, items = self.parts[child]
        linear = self.layer.get_submodule(tail)

        def fn(*args, **kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            x = self.files[tail].read(*self.batch, dtype=self.dtypes[tail])
            y = linear(x.to(next(linear.parameters()).device))  # where the block runs (run --device)
            if hidden is not None and tuple(y.shape[:-1]) != tuple(hidden.shape[:-1]):
                raise RuntimeError(f"replayed {child} gave {tuple(y.shape)} for inputs {tuple(hidden.shape)}")
            return y if items == 0 else (y, *([None] * (items - 1)))
        return fn

    @contextlib.contextmanager
    def replaying(self) -> Iterator[None]:
        """The ready parts' forwards replaced by their replay (set `batch` before each forward)."""
        patched = []
        try:
            for child in sorted(self.ready):
                module = self.layer.get_submodule(child)
                patched.append((module, module.__dict__.get("forward")))
                module.forward = self._forward(child)
            yield
        finally:
            for module, old in patched:
                if old is None:
                    del module.forward
                else:
                    module.forward = old

    def remove(self) -> None:
        for f in self.files.values():
            f.path.unlink(missing_ok=True)


class GroupStatistics:
    """What one pass collects for some input groups; the interface `factor_block` reads (as GramCollector's).

    grams: leader -> X'^T X' (the compressed model's inputs); cross: leader -> X^T X' (paired with the
    original model's inputs, when compensating; W X^T X' itself for a linear alone in its group with out < in); e0: name -> mean ||W x||^2 of the original linear.
    """

    def __init__(self, layer: nn.Module, groups: list[list[str]], compensate: bool, output_side: set[str]):
        linears = linear_modules(layer)
        self.group_of = {name: group[0] for group in groups for name in group}
        self.output_grams = {n: OutputGramAccumulator(linears[n].weight) for g in groups for n in g if n in output_side}
        leaders = [g[0] for g in groups if any(n not in output_side for n in g)]
        self.grams = {leader: GramAccumulator(linears[leader].in_features, linears[leader].weight.device)
                      for leader in leaders}
        alone = {g[0] for g in groups if len(g) == 1}  # a linear with its input to itself: W C directly where out < in
        self.cross = {leader: cross_accumulator(linears[leader].weight, leader in alone) for leader in leaders} if compensate else {}
        self.e0: dict[str, float] = {}
        self.energy_terms: dict[str, list[float]] = {}  # name -> the per-batch sums e0 is made of


@torch.no_grad()
def collect_group_statistics(
    layer: nn.Module,
    groups: list[list[str]],
    batches: Iterable[tuple[int, int]],
    read: Callable[[int, int], torch.Tensor],
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    stop_before: str | None = None,
    original: nn.Module | None = None,
    read_original: Callable[[int, int], torch.Tensor] | None = None,
    on_original_output: Callable[[int, torch.Tensor], None] | None = None,
    output_side: set[str] = frozenset(),
    stash: "OriginalInputs | None" = None,
    energies: dict[str, float] | None = None,
    replay: "Replay | None" = None,
) -> GroupStatistics:
    """One pass: the statistics of `groups` on the inputs `layer` (as compressed so far) gives them.

    Each forward ends as soon as its hooks have had what they need (the compressed block: the
    wanted groups' inputs; the original: their inputs and the wanted linears' outputs), and at the
    latest at the pre-hook of `stop_before` (the next group's first linear; None: the whole block).
    A pass that must hand the original block's outputs on runs the original whole. Stopping early
    changes no statistic, only skips work: the rest of the block (a first pass's attention, a
    gate/up pass's MLP) was a fifth of a default job's block forwards on SmolLM2.

    With `original` (the untouched block) each batch first runs through it on the original model's
    inputs, and its inputs to the same linears are paired with the compressed ones (compensation);
    a pass that runs the whole original block hands its outputs, the next block's original inputs,
    to `on_original_output`.

    `stash` (OriginalInputs): the original block runs once per block instead of once per pass. The
    pass given `original` runs it whole and writes its inputs to the later groups' leaders into the
    stash (and their outputs' energy into `energies`, shared by the passes); a pass without
    `original` reads its paired inputs from the stash.

    `replay` (Replay): the compressed block's parts that are ready run from their saved inputs, and this
    pass saves the inputs of the parts' last linears it calibrates.
    """
    stats = GroupStatistics(layer, groups, original is not None or stash is not None, output_side)
    wanted = {n for g in groups for n in g}
    captured: dict[str, torch.Tensor] = {}
    energies = {} if energies is None else energies
    batch_start = [0]

    def stop_hook(module, inputs):
        raise _StopForward

    pending: set = set()  # the hooks of the running forward that have not fired yet in this batch
    early = [True]  # whether the running forward may end once `pending` is empty

    def done(key):
        pending.discard(key)
        if early[0] and not pending:
            raise _StopForward

    def capture(name):
        def fn(module, inputs):
            captured[name] = inputs[0]
            done(("capture", name))
        return fn

    def capture_output(name):  # a projected cross statistic pairs the original linear's outputs (W x) instead
        bias = modules[id(original)][name].bias

        def fn(module, inputs, out):
            y = without_bias(out, bias)
            captured[name] = y.clone() if bias is None else y  # the block may change its own output in place later
            done(("capture", name))
        return fn

    def stash_input(name):
        def fn(module, inputs):
            stash.write(name, batch_start[0], inputs[0])
        return fn

    def stash_output(name):
        bias = modules[id(original)][name].bias

        def fn(module, inputs, out):
            stash.write(name, batch_start[0], without_bias(out, bias))
        return fn

    def save_input(name):
        def fn(module, inputs):
            replay.save(name, inputs[0])
            done(("save", name))
        return fn

    def output_energy(name):
        bias = modules[id(original)][name].bias

        def fn(module, inputs, out):
            with charged("accumulate"):
                y = without_bias(out, bias)
                # squares in the layer's precision, summed in float64 (no float64 copy of the outputs); one term
                # per batch, added up in batch order (energy_means), so N processes add the same terms in the same order
                energies.setdefault(name, []).append(float(torch.sum(y * y, dtype=torch.float64)))
            done(("energy", name))
        return fn

    def accumulate(name):
        def fn(module, inputs):
            x = inputs[0]
            with charged("accumulate"):
                if name in stats.output_grams:
                    stats.output_grams[name].add_batch(x)
                if name in stats.grams:
                    stats.grams[name].add_batch(x)
                    if name in stats.cross:
                        if name in projected:
                            stats.cross[name].add_outputs(captured.pop(name), x)
                        else:
                            stats.cross[name].add_pair(captured.pop(name), x)
            done(("accumulate", name))
        return fn

    modules = {id(layer): linear_modules(layer)}  # looked up once per pass, not per hook and batch
    if original is not None:
        modules[id(original)] = linear_modules(original)

    def run(module, hidden, hooks, keys, may_stop_early):
        by_name = modules[id(module)]
        handles = [by_name[n].register_forward_pre_hook(fn) if kind == "pre" else by_name[n].register_forward_hook(fn)
                   for n, kind, fn in hooks]
        pending.clear()
        pending.update(keys)
        early[0] = may_stop_early
        try:
            return forward(module, hidden)
        except _StopForward:
            return None
        finally:
            for h in handles:
                h.remove()

    stop = [(stop_before, "pre", stop_hook)] if stop_before is not None else []
    leaders = [n for n in wanted if stats.group_of[n] == n]
    captures = [n for n in leaders if n in stats.cross]
    projected = {n for n in captures if isinstance(stats.cross[n], ProjectedCrossAccumulator)}
    if stash is not None and any((n in projected) != (n in stash.outputs) for n in captures if n in stash.files):
        raise RuntimeError("the stash of the original block and this pass disagree on which leaders pair outputs")
    accumulated = [n for n in wanted if n in stats.grams or n in stats.output_grams]
    if original is not None and stash is not None:  # the one original pass of the block: whole, stashing ahead
        whole_original, original_stop = True, []
        energy = list(modules[id(original)])  # every linear's: the later passes do not run the original
        ahead = [(n, "post", stash_output(n)) if n in stash.outputs else (n, "pre", stash_input(n)) for n in stash.files]
    else:
        whole_original = stop_before is None and on_original_output is not None  # its outputs are the next block's inputs
        original_stop, energy, ahead = stop, sorted(wanted), []
    saving = replay.to_save(wanted) if replay is not None else []

    def one_batch(start, end):
        batch_start[0] = start
        if original is not None:
            out = run(original, read_original(start, end),
                      [(n, "post", capture_output(n)) if n in projected else (n, "pre", capture(n)) for n in captures] + ahead + [(n, "post", output_energy(n)) for n in energy]
                      + original_stop,
                      [("capture", n) for n in captures] + [("energy", n) for n in energy], not whole_original)
            if out is not None and on_original_output is not None:
                on_original_output(start, out)
        elif stash is not None:
            captured.update({n: stash.read(n, start, end) for n in captures})
        if replay is not None:
            replay.batch = (start, end)
        run(layer, read(start, end), [(n, "pre", accumulate(n)) for n in accumulated]
            + [(n, "pre", save_input(n)) for n in saving] + stop,
            [("accumulate", n) for n in accumulated] + [("save", n) for n in saving], True)
        captured.clear()

    with replay.replaying() if replay is not None else contextlib.nullcontext():
        for start, end in batches:
            one_batch(start, end)
    if replay is not None:
        replay.saved.update(saving)
    tokens = next((g.tokens for g in list(stats.grams.values()) + list(stats.output_grams.values())), 0)
    stats.energy_terms = {n: list(energies[n]) for n in sorted(wanted) if n in energies}
    stats.e0 = energy_means(stats.energy_terms, tokens)
    return stats


def without_bias(out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A linear's output W x from what its forward gave (W x + b)."""
    y = out.detach()
    return y - bias.detach() if bias is not None else y


def energy_means(terms: dict[str, list[float]], tokens: int) -> dict[str, float]:
    """name -> (sum of its per-batch output energies, added in batch order from 0.0) / tokens."""
    means = {}
    for name, values in terms.items():
        total = 0.0
        for value in values:  # not sum(): Python 3.12's sum() of floats compensates, and would change the bits
            total += value
        means[name] = total / max(tokens, 1)
    return means


class OriginalInputs:
    """The original block's inputs to the leaders of a block's later groups, on disk for one block.

    With compensation each group's cross statistics pair the original block's inputs with the
    compressed one's. Without this the original block ran again in every pass (up to the group);
    with it, it runs once per block and the later passes read their half of the pairs from here:
    float32 (exactly what the forward gave), one file per leader, (samples, seqlen, in_features).
    """

    PREFIX = "original-inputs-"

    def __init__(self, folder: Path, samples: int, seqlen: int, leaders: dict[str, int], outputs: set[str] = frozenset()):
        self.files = {name: ActivationFile(Path(folder) / f"{self.PREFIX}{i}.bin", (samples, seqlen, width), "float32",
                                           create=True)
                      for i, (name, width) in enumerate(leaders.items())}
        # the leaders whose cross statistic is W C (math/compensate.projects_cross): their original outputs W x are
        # kept instead of their inputs (out wide, not in wide; SmolLM2's down_proj 576 against 1536)
        self.outputs = set(outputs)

    def write(self, name: str, start: int, x: torch.Tensor) -> None:
        self.files[name].write(start, x)

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        faults.point("original-inputs-read")  # a kill here leaves a stash the redone block rewrites
        return self.files[name].read(start, stop)

    def remove(self) -> None:
        for f in self.files.values():
            f.path.unlink(missing_ok=True)


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


def _not_finite(linear: str) -> StreamSVDError:
    """NaN or inf in a linear's statistics or factors: the block's activations overflowed before it (a config.json
    value such as rope_theta 0 or rms_norm_eps inf did it in a probe, 2026-12-07: a LinAlgError traceback)."""
    return StreamSVDError(f"{linear}'s inputs on the calibration text hold NaN or infinite values, so it cannot be "
                          "factored",
                          "restore the checkpoint's own config.json (a value such as rms_norm_eps, rope_theta or a rope "
                          "scaling factor out of range makes the activations overflow) and check its weights; then "
                          "rerun with --restart")


@torch.no_grad()
def factor_block(
    layer: nn.Module, prefix: str, ckpt: Checkpoint, stats, ratio: float, method: str,
    compute_dtype: torch.dtype = torch.float32, factors: str = "pivoted", svd: str = "exact",
    names: list[str] | None = None, anchor: float = 0.0, block: FactoredBlock | None = None, finish: bool = True,
    ranks: dict[str, int] | None = None, quant: QuantSpec | None = None, shrink: float = 0.0, spread=None,
    precision: torch.dtype = torch.float64, device: torch.device | None = None,
) -> FactoredBlock:
    """Factor the linears `names` of `layer` (default: all) and swap in the modules the shard will hold.

    `factors`: the stored form, "pivoted" (default) or "plain" (model/lowrank.py); the rank for
    `ratio` is the one that form affords. A module that would not get smaller is stored dense.
    `stats` is a GramCollector or a GroupStatistics; where it holds cross statistics (compensation)
    or `anchor` > 0, a linear is factored by math/compensate.py. `finish` adds the block's other
    tensors (norms) to the shard: the last call for a block does it. `ranks` (full module name ->
    rank, from math/allocate.py) wins over `ratio` when given. `quant`: each module's factors are
    quantised as soon as they are made (math/quantize.py; GPTQ rounding with the Gram of the
    linear's input while it is still held, round-to-nearest for a linear factored on its output side)
    and the module swapped in is the dequantised one. `shrink` a: every input Gram is read as
    (1 - a) G + a diag(G) (math/gram.shrink_gram; run --shrink). `spread(names, solve)`: under torchrun,
    every linear's factors computed by one rank and given to all (job/distributed.World.spread); None or a
    `spread` that returns None: each linear is factored here as the loop reaches it. `precision`: the dtype of
    eig's exact routes (math/factorize.py; run --precision). `device` (run --device; None: the CPU): where each
    linear's factorisation runs. Its weight, its group's statistics and whitening go there as it is factored, and
    its factors come back to the CPU, where the statistics, the shard and the block stay.
    """
    cpu = torch.device("cpu")
    device = cpu if device is None else device
    on = lambda t: t.to(device)  # noqa: E731  (the same tensor when it is there already: the CPU job holds no copy)
    block = block if block is not None else FactoredBlock()
    whitenings: dict[str, object] = {}
    kept_grams: dict[str, torch.Tensor] = {}  # input Grams held for GPTQ rounding after whitening took them
    keep = quant is not None and quant.rounding == "gptq"
    linears = linear_modules(layer)
    names = list(linears) if names is None else list(names)

    def solve(name: str):
        """(input group, factors, output error, input Gram for GPTQ) of linear `name`; the factors on the CPU."""
        try:
            return solve_on_device(name)
        except torch.OutOfMemoryError as e:  # a GPU's allocator, held to --max-gpu-mem (job/device.py), or the host's
            budget = "--max-gpu-mem" if device.type == "cuda" else "--max-mem"
            raise StreamSVDError(f"{device} ran out of memory factoring {prefix + name} (the plan counted less than "
                                 f"this step needed: {e})".replace("\n", " "),
                                 f"rerun the same command with a larger {budget}"
                                 + (", or without --device to factor on the CPU" if device.type == "cuda" else "")
                                 + "; the finished blocks are kept") from e
        except torch.linalg.LinAlgError as e:
            if "non-finite" not in str(e):
                raise
            raise _not_finite(prefix + name) from e

    def solve_on_device(name: str):
        linear = linears[name]
        weight = on(linear.weight.detach())
        full = prefix + name
        rank = ranks[full] if ranks is not None else rank_for_ratio(linear.out_features, linear.in_features, ratio, factors)
        error = None
        input_gram = None
        if name in stats.output_grams:
            group = name
            f = factorize_output_side(weight, on(shrunk_output_gram(stats.output_grams.pop(name), shrink)), rank,
                                      precision)
        else:
            group = stats.group_of[name]
            cross = getattr(stats, "cross", {}).get(group)
            route_svd = choose_svd(svd, linear.out_features, linear.in_features, rank)
            if cross is not None or anchor > 0:
                if group not in whitenings:
                    gram = on(shrink_gram(stats.grams[group].gram, shrink))
                    whitenings[group] = (compensated_whitening(gram, anchor, stats.grams[group].product_eps), gram)
                (white, q, inv, lam), gram = whitenings[group]
                input_gram = gram
                wc = None if cross is None else cross.times(weight)  # W C: all compensation reads of C
                f = factorize_compensated(weight, white, q, inv, lam, None, rank, svd=route_svd, wc=wc,
                                          dtype=precision)
                if name in getattr(stats, "e0", {}):
                    error = output_error(weight, (f.out_factor, f.in_factor), stats.e0[name], None, gram, wc=wc)
                del wc
            else:
                if method != "svd" and group not in whitenings:
                    gram = shrink_gram(stats.grams.pop(group).gram, shrink)
                    whitenings[group] = whiten(on(gram), method)  # the Gram is not needed again, unless GPTQ rounds
                    if keep:
                        kept_grams[group] = gram
                    del gram  # gone before the first factorisation, as job/plan.py's factorize stage counts
                input_gram = kept_grams.get(group) if group in kept_grams else (
                    stats.grams[group].gram if keep and group in stats.grams else None)
                f = factorize(weight, whitenings.get(group), rank, method, svd=route_svd, dtype=precision)
        del weight
        if not (bool(torch.isfinite(f.out_factor).all()) and bool(torch.isfinite(f.in_factor).all())):
            raise _not_finite(full)  # pivoting them raised a LinAlgError traceback (a probe)
        return group, f.to(cpu), error, input_gram

    out_side = set(stats.output_grams)

    def stored_for(name: str, f, input_gram):
        """The shard's tensors of linear `name` (quantised with --quant), its stored form and kept rank."""
        full = prefix + name
        bias = ckpt.get(full + ".bias") if (full + ".bias") in ckpt else None
        stored = factor_tensors(full, f.out_factor, f.in_factor, bias, store_dtype(ckpt, full + ".weight"), factors)
        form, kept = stored_form(set(stored), full), stored_rank(stored.__getitem__, set(stored), full)
        if quant is not None:
            # GPTQ rounds on the host (run --device: the Gram comes over from the GPU)
            stored = quantize_module_tensors(stored, full, quant, input_gram.to("cpu") if input_gram is not None else None)
        return stored, form, kept

    def solve_spread(name: str):
        """What the owner of `name` sends: its factors and error, and with --quant its rounded tensors too
        (GPTQ reads the input Gram, which the owner holds)."""
        _, f, error, input_gram = solve(name)
        return f, error, stored_for(name, f, input_gram) if quant is not None else None

    # Under torchrun (job/distributed.py) the linears are factored by the ranks in turn and the factors broadcast.
    solved = spread(names, solve_spread) if spread is not None else None
    for i, name in enumerate(names):
        linear = linears[name]
        full = prefix + name
        if solved is None:
            group, f, error, input_gram = solve(name)
            stored, form, kept = stored_for(name, f, input_gram)
        else:
            f, error, made = solved[name]
            stored, form, kept = made if made is not None else stored_for(name, f, None)
            group = name if name in out_side else stats.group_of[name]
        get, keys = stored.__getitem__, set(stored)
        if quant is not None:
            get, keys = dequantizing_getter(stored.__getitem__, stored, quant.bits, quant.group_size), logical_keys(stored)
        block.tensors.update(stored)
        block.spectra[full] = f.spectrum.to(torch.float32)
        block.records[full] = {
            "in_features": linear.in_features,
            "out_features": linear.out_features,
            "rank": kept,
            "form": form,
            "stored_numel": stored_numel(linear.out_features, linear.in_features, kept, "plain" if form == "plain" else "pivoted"),
            "stored_bytes": linear_bytes(stored, full),
            "input_group": prefix + group,
            "truncation_loss": f.truncation_loss(),
            "cholesky_shift": f.shift,
        }
        if error is not None:
            block.records[full]["output_error"] = error
        bad = {k: v for k, v in block.records[full].items() if isinstance(v, float) and not math.isfinite(v)}
        if bad:  # the state would refuse these figures after the run said "done" (and its --restart would loop)
            raise StreamSVDError(f"{full} gives non-finite figures on the calibration text "
                                 f"({', '.join(f'{k} {v}' for k, v in bad.items())}): its outputs overflow float32",
                                 "check the checkpoint's weights (a matrix scaled far out of range?); re-download or "
                                 "re-export it")
        if f.precision != "float64":  # --precision float32, kept (math/factorize.float32_trusted); absent: float64
            block.records[full]["precision"] = f.precision
        if group in whitenings and not any(stats.group_of.get(other) == group for other in names[i + 1 :]):
            del whitenings[group]  # the last reader of this input is done
            kept_grams.pop(group, None)
        # Exactly what a resume rebuilds from the saved shard (store dtype, then compute dtype).
        swap_module(layer, name, module_from_tensors(get, keys, full, compute_dtype))
        # The original weight goes now, not at the block's end: each linear's compute-dtype factors take the place
        # of its (larger) weight, so the block never holds both (job/plan.py's factorize stage counts on it).
        del linear, linears[name], f
        if solved is not None:
            del solved[name]
    if not finish:
        return block
    factored = {k[len(prefix):] for k in block.records}  # earlier calls' linears are no longer nn.Linear
    replaced = {prefix + n + s for n in factored | set(linears) for s in (".weight", ".bias")}
    for key in ckpt.keys():
        if key.startswith(prefix) and key not in replaced:
            block.tensors[key] = ckpt.get(key)
    return block


def swap_module(layer: nn.Module, name: str, new: nn.Module) -> None:
    """replace_module, with `new` on the device of the module it replaces (run --device: a block on the GPU gets
    its factored modules there; on the CPU `.to` gives the module itself)."""
    old = next(layer.get_submodule(name).parameters(), None)
    replace_module(layer, name, new.to(old.device) if old is not None else new)


def linear_bytes(tensors: dict[str, torch.Tensor], full: str) -> int:
    """Bytes the shard holds for compressed linear `full` (factors or packed factors, scales, pivots), bias excluded."""
    return sum(v.numel() * v.element_size() for k, v in tensors.items() if k.startswith(full + ".") and k != full + ".bias")


@torch.no_grad()
def quantize_block(layer: nn.Module, prefix: str, block: FactoredBlock, spec: QuantSpec,
                   compute_dtype: torch.dtype = torch.float32) -> None:
    """Replace every compressed linear's factors in the shard by their quantised, packed form
    (math/quantize.py, model/quantized.py) and the module in `layer` by the one rebuilt from them, so
    propagation, the next blocks' calibration and a resume all see the quantised block."""
    for full in block.records:
        own = {k: v for k, v in block.tensors.items() if k.startswith(full + ".")}
        packed = quantize_module_tensors(own, full, spec)
        for key in own:
            del block.tensors[key]
        block.tensors.update(packed)
        block.records[full]["stored_bytes"] = linear_bytes(packed, full)
        get = dequantizing_getter(packed.__getitem__, packed, spec.bits, spec.group_size)
        swap_module(layer, full[len(prefix):], module_from_tensors(get, logical_keys(packed), full, compute_dtype))


TRAINABLE = (".out_factor", ".in_factor", ".in_rest")  # the stored factor tensors refinement tunes (not pivots, biases)


@dataclass
class Refinement:
    steps: int  # optimiser steps taken (early stopping may end before the requested number)
    best_step: int  # the step whose factors were kept (0: refinement did not help on held-out windows)
    heldout_before: float  # relative MSE to the target on the held-out windows, before and after
    heldout_after: float
    seconds: float


def refine_block(
    layer: nn.Module, prefix: str, block: FactoredBlock,
    read: Callable[[int, int], torch.Tensor], target: Callable[[int, int], torch.Tensor],
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor], samples: int, batch_size: int,
    steps: int, lr: float, compute_dtype: torch.dtype = torch.float32, seed: int = 0,
    world: "World | None" = None, share: tuple[int, int] | None = None,
) -> Refinement:
    """Tune the block's factors (only them) so its output on `read` matches `target` (AutoRound-style).

    The last eighth of the windows (at least one) is held out of the fit: every tenth of the steps
    their relative MSE is measured, the best factors so far are kept, and three evaluations without
    a gain end the fit, so a fit that does not generalise changes nothing. Adam, fixed batch order,
    seeded: the same factors on a resume. The shard's tensors are replaced by the refined ones (in
    their stored dtype) and the layer rebuilt from them, exactly what a resume reads back.

    `samples` counts the job's windows; `read` and `target` take this process's window numbers, its
    `share` [lo, hi) of whole batches (all of them on one process). Under torchrun every step's batch lies
    on one rank: that rank computes the gradients and broadcasts them, and every rank takes the same Adam
    step; the held-out figures are gathered and added in window order. So the factors are one process's,
    bit for bit, at one process's speed (the steps are sequential; a bigger batch spread over the ranks
    would change the fit).
    """
    import time

    start_time = time.time()
    held = max(1, samples // 8) if samples > 1 else 0
    train = samples - held
    modules = {name: m for name, m in layer.named_modules() if any(prefix + name + s in block.tensors for s in TRAINABLE)}
    params = [p for name, m in modules.items() for pname, p in m.named_parameters(recurse=False) if "." + pname in TRAINABLE]
    for p in layer.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)

    world = world or World.current()
    lo, hi = share or (0, samples)

    def mine(s: int, e: int) -> bool:
        return lo <= s and e <= hi

    shares = world.shares(samples, batch_size) if world.active else [(0, samples)]

    def owner(s: int) -> int:  # the rank whose share holds window s (a batch never straddles two shares)
        return next(r for r, (a, b) in enumerate(shares) if a <= s < b)

    # the held-out windows in chunks of at most a batch that never cross the job's batch grid
    chunks, s = [], train
    while s < samples:
        chunks.append((s, min(samples, (s // batch_size + 1) * batch_size)))
        s = chunks[-1][1]

    def heldout_loss() -> float:
        if not held:
            return float("nan")
        terms = []
        with torch.no_grad():
            for s, e in chunks:
                if mine(s, e):
                    y = target(s - lo, e - lo)
                    terms.append((float((forward(layer, read(s - lo, e - lo)) - y).pow(2).sum()), float(y.pow(2).sum())))
        num = den = 0.0
        for part in world.gather(terms, "refine held-out"):  # rank order is window order
            for n, d in part:
                num, den = num + n, den + d
        return num / max(den, 1e-30)

    torch.manual_seed(seed)
    opt = torch.optim.Adam(params, lr=lr)
    before = heldout_loss()
    best, best_step, best_state = before, 0, [p.detach().clone() for p in params]
    every, misses, taken = max(1, steps // 10), 0, 0
    starts = list(range(0, max(train, 1), batch_size)) if train else []
    with torch.enable_grad():
        for step in range(1, steps + 1 if train else 1):
            s = starts[(step - 1) % len(starts)]
            e = min(train, s + batch_size)
            opt.zero_grad(set_to_none=True)
            if mine(s, e):
                y = target(s - lo, e - lo)
                loss = (forward(layer, read(s - lo, e - lo)) - y).pow(2).mean() / y.pow(2).mean().clamp_min(1e-30)
                loss.backward()
            else:
                for p in params:
                    p.grad = torch.empty_like(p)
            world.from_rank(owner(s), [p.grad for p in params])
            opt.step()
            taken = step
            if step % every == 0 or step == steps:
                now = heldout_loss()
                if held and now < best:
                    best, best_step, best_state, misses = now, step, [p.detach().clone() for p in params], 0
                elif held:
                    misses += 1
                    if misses >= 3:
                        break
    if not held:  # nothing to judge by: keep the last factors
        best_state, best_step = [p.detach().clone() for p in params], taken
    with torch.no_grad():
        for p, value in zip(params, best_state):
            p.copy_(value)
            p.requires_grad_(False)
    for name, m in modules.items():
        full = prefix + name
        for suffix in TRAINABLE:
            if full + suffix in block.tensors:
                block.tensors[full + suffix] = getattr(m, suffix[1:]).detach().to(
                    device="cpu", dtype=block.tensors[full + suffix].dtype).clone()
        stored = {k: v for k, v in block.tensors.items() if k.startswith(full + ".")}
        swap_module(layer, name, module_from_tensors(stored.__getitem__, set(stored), full, compute_dtype))
    after = heldout_loss() if held else float("nan")
    return Refinement(taken, best_step, before, after, round(time.time() - start_time, 2))
