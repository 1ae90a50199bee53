#!/usr/bin/env python
"""Rank allocators at the same parameter budget, in one process (a cheap stand-in for full `run` jobs).

What `streamsvd profile` measures, computed on the whole model in memory: every linear's input Gram
from the calibration windows through the original model (`--propagate original`), its whitened
spectrum (singular values of W S, eig), and its sensitivity (mean squared gradient of the summed
next-token NLL at its output over the first --sens-samples windows: the quantity
tests/job/test_profile.py checks the streamed profile against). Then for each allocator
(math/allocate.py) and ratio, every decoder linear is replaced by its eig truncation W' = U_k U_k^T W
at the allocated rank (pivoted and plain factors hold the same matrix; the count is the pivoted
form's), and the model is scored on held-out plays (the calibration's domain) and on Python's
reference docs (another domain). One JSON line per row.

    OMP_NUM_THREADS=1 python tools/bench_alloc.py --model smollm2 --ratios 0.4
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM

from streamsvd import assets
from streamsvd.io.calibration import default_text, load_tokenizer, sample_windows
from streamsvd.job.evaluate import perplexity
from streamsvd.math.allocate import Matrix, allocate, total_numel
from streamsvd.math.factorize import factorize, whiten

MODELS = {"smollm2": assets.smollm2_checkpoint, "gemma3": assets.gemma3_checkpoint}
ALLOCS = ("uniform", "v2", "global", "global-unweighted")


def sensitivity(model, linears: dict[str, nn.Linear], windows: torch.Tensor) -> dict[str, float]:
    """Mean squared gradient of the summed NLL at every linear's output, one window at a time."""
    sums = {n: 0.0 for n in linears}
    counts = {n: 0 for n in linears}

    def hook(name):
        def fn(module, inputs, output):
            def on_grad(g):
                sums[name] += float(g.double().pow(2).sum())
                counts[name] += g.numel()
            output.register_hook(on_grad)
        return fn

    model.requires_grad_(False)
    handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
    for w in windows:
        ids = w[None]
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(inputs_embeds=embeds, use_cache=False).logits[:, :-1]
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").backward()
    for h in handles:
        h.remove()
    return {n: sums[n] / counts[n] for n in linears}


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.4])
    p.add_argument("--allocs", nargs="+", default=list(ALLOCS), choices=ALLOCS)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--sens-samples", type=int, default=16)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--eval-seqlen", type=int, default=256)
    args = p.parse_args()
    model_dir = MODELS[args.model]()
    tokenizer = load_tokenizer(model_dir)
    calib = assets.shakespeare_text(assets.CALIB_PLAYS).read_text()
    texts = {"ppl": assets.shakespeare_text(assets.EVAL_PLAYS).read_text(), "ppl_cross": default_text()}
    common = {"model": args.model, "calib": f"{args.calib_samples}x{args.seqlen} of " + "+".join(assets.CALIB_PLAYS),
              "sens": f"first {args.sens_samples} calibration windows", "propagate": "original",
              "eval": f"{args.eval_windows}x{args.eval_seqlen}: ppl " + "+".join(assets.EVAL_PLAYS) + ", ppl_cross pydoc_data.topics"}

    def score():
        return {k: round(perplexity(model, tokenizer, t, args.eval_seqlen, args.eval_windows, progress=False)["perplexity"], 3)
                for k, t in texts.items()}

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    start = time.time()
    print(json.dumps({**common, "alloc": "original", **score(), "seconds": round(time.time() - start, 1)}), flush=True)

    linears = {n: m for n, m in model.model.layers.named_modules() if isinstance(m, nn.Linear)}
    grams: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(module, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x
        return fn

    start = time.time()
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    windows = sample_windows(tokenizer, calib, args.calib_samples, args.seqlen, seed=0)
    for i in range(len(windows)):
        model(windows[i : i + 1], use_cache=False)
    for h in handles:
        h.remove()
    tokens = args.calib_samples * args.seqlen
    whitenings = {n: whiten(g / tokens, "eig") for n, g in grams.items()}
    grams.clear()  # the whitenings are all that is needed
    weights = {n: m.weight.detach().clone() for n, m in linears.items()}
    spectra = {n: torch.linalg.svdvals(w.double() @ whitenings[n].s).numpy() for n, w in weights.items()}
    profile_s = time.time() - start
    start = time.time()
    with torch.enable_grad():
        sens = sensitivity(model, linears, windows[: args.sens_samples])
    sens_s = time.time() - start
    print(json.dumps({**common, "profile_seconds": round(profile_s, 1), "sensitivity_seconds": round(sens_s, 1)}), flush=True)

    for ratio in args.ratios:
        for alloc in args.allocs:
            start = time.time()
            weighted = alloc != "global-unweighted"
            mats = [Matrix(n, *w.shape, spectra[n], sens[n] if weighted else 1.0) for n, w in weights.items()]
            ranks = allocate(alloc.split("-")[0], mats, ratio, "pivoted", tokens=tokens)
            for name, w in weights.items():
                f = factorize(w, whitenings[name], ranks[name], "eig")
                linears[name].weight.copy_((f.out_factor @ f.in_factor).to(w.dtype))
            before = sum(a.m * a.n for a in mats)
            after = total_numel(mats, ranks)
            by_type: dict[str, list[int]] = {}
            for a in mats:
                by_type.setdefault(a.name.rpartition(".")[2], []).append(ranks[a.name])
            print(json.dumps({**common, "alloc": alloc, "ratio": ratio, "ratio_linear": round(1 - after / before, 4),
                              **score(), "dense_matrices": sum(ranks[a.name] >= a.full for a in mats),
                              "mean_rank_by_type": {k: round(sum(v) / len(v), 1) for k, v in by_type.items()},
                              "seconds": round(time.time() - start, 1)}), flush=True)
            for name, w in weights.items():
                linears[name].weight.copy_(w)


if __name__ == "__main__":
    main()
