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
_LOGIT_CHUNK = 256


@torch.no_grad()
def window_nll(model, input_ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of one batch of windows, and the token count."""
    hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    total, count = 0.0, 0
    for start in range(0, input_ids.shape[1] - 1, _LOGIT_CHUNK):
        stop = min(start + _LOGIT_CHUNK, input_ids.shape[1] - 1)
        logits = head(hidden[:, start:stop]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        targets = input_ids[:, start + 1 : stop + 1]
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"))
        count += targets.numel()
    return total, count


def perplexity(model, tokenizer, text: str, seqlen: int, max_windows: int | None = None, progress: bool = True) -> dict:
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
    started = time.time()
    total, count = 0.0, 0
    for w in tqdm(range(n_windows), desc="eval", unit="window", disable=not progress):
        ids = tokens[w * body : (w + 1) * body]
        if bos is not None:
            ids = torch.cat([torch.tensor([bos]), ids])
        nll, n = window_nll(model, ids[None])
        total, count = total + nll, count + n
    return {
        "perplexity": math.exp(total / count),
        "nll_per_token": total / count,
        "tokens_scored": count,
        "windows": n_windows,
        "seqlen": seqlen,
        "seconds": round(time.time() - started, 2),
    }
