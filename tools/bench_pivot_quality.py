#!/usr/bin/env python
"""Plain vs pivoted factors at the same parameter budget, in one process (a cheap stand-in for
`bench_quality.py --factors plain pivoted` when the machine is too slow for 2 x 3 full jobs).

One forward of the calibration windows through the original model collects every linear's input
Gram (statistics of the original model's activations, i.e. `--propagate original`); then, for each
ratio and form, every decoder linear is factored by streamsvd's own code (`factorize` eig at the
rank `rank_for_ratio(..., factors)` affords, `factor_tensors` -> `module_from_tensors`, so pivoted
modules are exactly what a shard would hold) and the model is scored on held-out plays (the
calibration's domain) and on Python's reference docs (another domain). One JSON line per row.

    python tools/bench_pivot_quality.py --model smollm2 --ratios 0.4 0.2 0.6
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from streamsvd import assets
from streamsvd.io.calibration import default_text, load_tokenizer, sample_windows
from streamsvd.job.evaluate import perplexity
from streamsvd.math.factorize import factorize, rank_for_ratio, whiten
from streamsvd.model.lowrank import factor_tensors, module_from_tensors, replace_module

MODELS = {"smollm2": assets.smollm2_checkpoint, "gemma3": assets.gemma3_checkpoint}


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.4, 0.2, 0.6])
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=6)
    p.add_argument("--eval-seqlen", type=int, default=256)
    args = p.parse_args()
    model_dir = MODELS[args.model]()
    tokenizer = load_tokenizer(model_dir)
    calib = assets.shakespeare_text(assets.CALIB_PLAYS).read_text()
    texts = {"ppl": assets.shakespeare_text(assets.EVAL_PLAYS).read_text(), "ppl_cross": default_text()}
    common = {"model": args.model, "calib": f"{args.calib_samples}x{args.seqlen} of " + "+".join(assets.CALIB_PLAYS),
              "propagate": "original", "eval": f"{args.eval_windows}x{args.eval_seqlen}: ppl hamlet+macbeth+othello+lear, "
              "ppl_cross pydoc_data.topics"}

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    start = time.time()
    print(json.dumps({**common, "factors": "original", **{k: perplexity(model, tokenizer, t, args.eval_seqlen, args.eval_windows,
                      progress=False)["perplexity"] for k, t in texts.items()}, "seconds": round(time.time() - start, 1)}), flush=True)

    linears = {n: m for n, m in model.model.layers.named_modules() if isinstance(m, nn.Linear)}
    grams: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(module, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            grams[name] = grams.get(name, 0) + x.T @ x
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    windows = sample_windows(tokenizer, calib, args.calib_samples, args.seqlen, seed=0)
    for i in range(len(windows)):
        model(windows[i : i + 1], use_cache=False)
    for h in handles:
        h.remove()
    whitenings = {n: whiten(g / (args.calib_samples * args.seqlen), "eig") for n, g in grams.items()}
    weights = {n: m.weight.detach().clone() for n, m in linears.items()}
    biases = {n: (None if m.bias is None else m.bias.detach().clone()) for n, m in linears.items()}

    for ratio in args.ratios:
        for factors in ("plain", "pivoted"):
            start = time.time()
            before = after = 0
            for name, w in weights.items():
                m, n = w.shape
                f = factorize(w, whitenings[name], rank_for_ratio(m, n, ratio, factors), "eig")
                tensors = factor_tensors(name, f.out_factor, f.in_factor, biases[name], torch.float32, factors)
                module = module_from_tensors(tensors.__getitem__, set(tensors), name, torch.float32)
                replace_module(model.model.layers, name, module)
                before += m * n
                after += sum(p.numel() for k, p in module.named_parameters() if k != "bias")
            scores = {k: perplexity(model, tokenizer, t, args.eval_seqlen, args.eval_windows, progress=False)["perplexity"]
                      for k, t in texts.items()}
            print(json.dumps({**common, "factors": factors, "ratio": ratio, "linear_params_before": before,
                              "linear_params_after": after, "ratio_linear": round(1 - after / before, 4), **scores,
                              "seconds": round(time.time() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()
