"""What each decoder layer really receives, captured GPTQ-style by running the model's own forward.

Every layer is swapped for a catcher that records its arguments and passes the hidden states on,
so per-layer differences (Gemma 3's sliding-window vs global masks and rotary tables) come out
exactly as transformers builds them. Nothing here depends on a model family.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .architecture import decoder_layers


class _StopForward(Exception):
    pass


class _Catcher(nn.Module):
    def __init__(self, wrapped: nn.Module, index: int, record, stop: bool):
        super().__init__()
        object.__setattr__(self, "_wrapped", wrapped)  # not a submodule: keeps the meta layer out of the graph
        self._index, self._record, self._stop = index, record, stop

    def __getattr__(self, name):  # models may read layer attributes (attention_type, ...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_wrapped"), name)

    def forward(self, hidden_states, *args, **kwargs):
        self._record(self._index, hidden_states, args, kwargs)
        if self._stop:
            raise _StopForward
        return hidden_states


@contextlib.contextmanager
def _catching(model: nn.Module, record, stop_at: int):
    layers = decoder_layers(model)
    originals = list(layers)
    for i, layer in enumerate(originals):
        layers[i] = _Catcher(layer, i, record, stop=(i == stop_at))
    try:
        yield
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


@torch.no_grad()
def capture_layer_kwargs(model: nn.Module, input_ids: torch.Tensor) -> list[tuple[tuple, dict]]:
    """(args, kwargs) for every decoder layer, from one forward on `input_ids` (batch 1).

    They do not depend on the hidden states, only on positions, so one capture serves every batch:
    masks and rotary tables have batch dimension 1 and broadcast.
    """
    captured: dict[int, tuple[tuple, dict]] = {}

    def record(i, hidden, args, kwargs):
        captured[i] = (args, dict(kwargs))

    n = len(decoder_layers(model))
    with _catching(model, record, stop_at=n - 1), contextlib.suppress(_StopForward):
        model.model(input_ids=input_ids, use_cache=False)
    if len(captured) != n:
        raise RuntimeError(f"captured arguments for {len(captured)} of {n} decoder layers")
    return [captured[i] for i in range(n)]


@torch.no_grad()
def first_layer_inputs(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The hidden states entering layer 0 (embeddings plus whatever the model does before its layers)."""
    out = {}

    def record(i, hidden, args, kwargs):
        out["hidden"] = hidden

    with _catching(model, record, stop_at=0), contextlib.suppress(_StopForward):
        model.model(input_ids=input_ids, use_cache=False)
    return out["hidden"]


def layer_args_on(layer_args: tuple[tuple, dict], device: torch.device) -> tuple[tuple, dict]:
    """One block's captured (args, kwargs) with every tensor in them (masks, rotary tables) on `device` (run --device)."""
    from torch.utils._pytree import tree_map

    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, layer_args)


def run_layer(layer: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out
