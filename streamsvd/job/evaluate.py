"""Perplexity over non-overlapping windows, for original checkpoints and streamsvd outputs alike."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..io.calibration import tokenize
from ..errors import StreamSVDError

# Vocabulary logits are made this many positions at a time: Gemma's 262k-word head would otherwise
# need gigabytes for one long window.
LOGIT_CHUNK = 256


@torch.no_grad()
def window_nll(model, input_ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of one batch of windows, and the token count."""
    hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state
    return head_nll(model, hidden, input_ids)


@torch.no_grad()
def head_nll(model, hidden: torch.Tensor, input_ids: torch.Tensor) -> tuple[float, int]:
    """NLL from the final hidden states (after the final norm), the head applied a chunk at a time."""
    return logits_nll(model.get_output_embeddings(), getattr(model.config, "final_logit_softcapping", None), hidden, input_ids)


@torch.no_grad()
def logits_nll(head, softcap: float | None, hidden: torch.Tensor, input_ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL and token count, `head` (a callable: hidden -> logits) applied a chunk at a time."""
    total, count = 0.0, 0
    for start in range(0, input_ids.shape[1] - 1, LOGIT_CHUNK):
        stop = min(start + LOGIT_CHUNK, input_ids.shape[1] - 1)
        logits = head(hidden[:, start:stop]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        targets = input_ids[:, start + 1 : stop + 1]
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"))
        count += targets.numel()
    return total, count


def head_key(ckpt) -> str | None:
    """The checkpoint tensor the output head reads: `lm_head.weight`, or the input embedding when tied (None
    for a checkpoint with neither). From the headers alone (the plan's and the profile's head gradient)."""
    if "lm_head.weight" in ckpt:
        return "lm_head.weight"
    return next((k for k in ckpt.keys() if k.endswith("embed_tokens.weight")), None)


def head_weight(model, ckpt, dtype: torch.dtype) -> torch.Tensor:
    """The output head's weight from the checkpoint: its own tensor, or the input embedding when tied
    (model/loading.materialize_head's choice), without making the model's head resident."""
    head = model.get_output_embeddings()
    name = next(n for n, m in model.named_modules() if m is head) + ".weight"
    if name not in ckpt:
        embedding = model.get_input_embeddings()
        name = next(n for n, m in model.named_modules() if m is embedding) + ".weight"
    return ckpt.get(name).to(dtype)


@torch.no_grad()
def final_states_nll(model, ckpt, read, windows: torch.Tensor, dtype: torch.dtype = torch.float32,
                     world=None) -> tuple[float, int]:
    """Summed next-token NLL of `windows` from their last block's outputs, `read(w, w + 1)` (one window at a
    time): the model's final norm (materialised) and the head read from `ckpt`, as `streamsvd eval` applies them.

    `world` (job/distributed.World) under torchrun: `windows` are this process's run of the job's windows (maybe
    none); every process's per-window terms are gathered and added in window order (`add_in_order`), so every
    process gets the one process's sum, bit for bit."""
    terms = states_nll(model.model.norm, head_weight(model, ckpt, dtype), None,
                       getattr(model.config, "final_logit_softcapping", None), read, windows)
    return add_in_order(world.gather(terms, "held-out nll") if world is not None else [terms])


def states_nll(norm, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None, read,
               windows: torch.Tensor) -> list[tuple[float, int]]:
    """Each window's (summed next-token NLL, tokens) from its final states `read(w, w + 1)` (one window at a time):
    `norm` and the head (`weight`, `bias`) applied where `weight` is, the states and the targets moved there."""
    device = weight.device
    return [logits_nll(lambda h: F.linear(h, weight, bias), softcap, norm(read(w, w + 1).to(device)),
                       windows[w : w + 1].to(device)) for w in range(len(windows))]


def add_in_order(shares: list[list[tuple[float, int]]]) -> tuple[float, int]:
    """(NLL, tokens) summed term by term, the shares in rank order (window order): one process's sum."""
    total, count = 0.0, 0
    for share in shares:
        for nll, n in share:
            total, count = total + nll, count + n
    return total, count


def eval_windows(tokenizer, text: str, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of `seqlen` tokens (BOS first where the tokenizer adds one)."""
    if seqlen < 2:
        raise StreamSVDError(f"--seqlen {seqlen} is too short", "use at least 2 tokens per window")
    tokens, bos = tokenize(tokenizer, text)
    body = seqlen - (1 if bos is not None else 0)
    n_windows = tokens.numel() // body
    if max_windows:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise StreamSVDError(
            f"the evaluation text has {tokens.numel()} tokens, fewer than one window of --seqlen {seqlen}",
            "give a longer --text or a smaller --seqlen",
        )
    windows = tokens[: n_windows * body].reshape(n_windows, body)
    if bos is not None:
        windows = torch.cat([torch.full((n_windows, 1), bos, dtype=torch.long), windows], dim=1)
    return windows


def perplexity(model, tokenizer, text: str, seqlen: int, max_windows: int | None = None, progress: bool = True,
               device=None) -> dict:
    """In-memory perplexity: the whole model is loaded (see stream_eval.py for the streaming path). `device`: where
    the model is (each window is moved there); None: the CPU."""
    windows = eval_windows(tokenizer, text, seqlen, max_windows)
    started = time.time()
    total, count = 0.0, 0
    for w in tqdm(range(len(windows)), desc="eval", unit="window", disable=not progress):
        nll, n = window_nll(model, windows[w : w + 1].to(device or "cpu"))
        total, count = total + nll, count + n
    return result(total, count, len(windows), seqlen, time.time() - started)


def result(total: float, count: int, windows: int, seqlen: int, seconds: float) -> dict:
    return {
        "perplexity": math.exp(total / count),
        "nll_per_token": total / count,
        "tokens_scored": count,
        "windows": windows,
        "seqlen": seqlen,
        "seconds": round(seconds, 2),
    }
