#!/usr/bin/env python
"""Statistics in bfloat16 products, against the float32 products the job makes and exact float64: a lever looked at
for issue 6 item 8 (the statistics' arithmetic is about a quarter of the default job's time on SmolLM2).

For each linear of a few SmolLM2 blocks, its real inputs (calibration windows of assets.CALIB_PLAYS through the
model, one forward pre-hook per linear) are summed into a mean Gram four ways, 2,048 tokens at a time as
math/gram.add_products does, each chunk added into a float64 sum:
- `f64`: float64 products (the reference);
- `f32`: float32 products (what the job does: math/gram.add_products itself);
- `bf16in`: the inputs rounded to bfloat16, multiplied in float32 (the rounding of the data alone);
- `bf16`: bfloat16 inputs and a bfloat16 product (what a bfloat16 matmul gives on a CPU: torch has no
  bfloat16 x bfloat16 -> float32 product there, so every chunk's sum is rounded to 8 bits of mantissa).
Each Gram then gives the eig factors at the rank of --ratio (the output side for out < in, as the job does), and
each row reports that Gram's relative distance to the reference, the loss its factors really give (measured
against the float64 Gram) over the float64 factors' loss, less 1, the predicted loss's error, and the seconds per
2,048-token chunk of each kind of product (best of 5). One JSON line per linear.

    python tools/bench_stats_precision.py                       # SmolLM2 blocks 2, 15, 28; 32 x 512 windows
    python tools/bench_stats_precision.py --synthetic 576 1536  # random inputs and weights of these widths (no model)
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from streamsvd.math.factorize import factorize, rank_for_ratio
from streamsvd.math.gram import _ROW_CHUNK, add_products, mirror

MODES = ("f64", "f32", "bf16in", "bf16")


def mean_gram(x: torch.Tensor, mode: str) -> torch.Tensor:
    """The mean Gram of the rows of `x` (float32), summed chunk by chunk into float64 with `mode`'s products."""
    n = x.shape[1]
    total = torch.zeros(n, n, dtype=torch.float64)
    if mode == "f32":  # the job's own accumulation (upper triangle, then mirrored)
        add_products(total, x)
        mirror(total)
        return total / x.shape[0]
    for start in range(0, x.shape[0], _ROW_CHUNK):
        chunk = x[start : start + _ROW_CHUNK]
        if mode == "f64":
            chunk = chunk.double()
        elif mode == "bf16in":
            chunk = chunk.bfloat16().float()
        else:
            chunk = chunk.bfloat16()
        total += (chunk.T @ chunk).double()
    return total / x.shape[0]


def chunk_seconds(x: torch.Tensor, mode: str, repeats: int = 5) -> float:
    """Seconds of one 2,048-token chunk's product in `mode`'s precision (best of `repeats`)."""
    chunk = x[:_ROW_CHUNK]
    chunk = {"f64": chunk.double(), "f32": chunk, "bf16in": chunk, "bf16": chunk.bfloat16()}[mode]
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        chunk.T @ chunk
        best = min(best, time.perf_counter() - start)
    return best


def compare(label: str, w: torch.Tensor, x: torch.Tensor, ratio: float) -> dict:
    m, n = w.shape
    rank = rank_for_ratio(m, n, ratio, "pivoted")
    side = "output" if m < n else "input"
    grams = {mode: mean_gram(x, mode) for mode in MODES}
    ref = grams["f64"]

    def true_loss(f) -> float:
        d = w.double() - f.out_factor.double() @ f.in_factor.double()
        return float(torch.einsum("ij,jk,ik->", d, ref, d).clamp_min(0).sqrt())

    exact = factorize(w, ref, rank, side=side)
    base, predicted = true_loss(exact), exact.truncation_loss()
    row = {"matrix": label, "shape": [m, n], "tokens": x.shape[0], "ratio": ratio, "rank": rank, "side": side,
           "loss_f64": base}
    for mode in MODES[1:]:
        f = factorize(w, grams[mode], rank, side=side)
        row[f"gram_rel_{mode}"] = float((grams[mode] - ref).norm() / ref.norm())
        row[f"loss_increase_{mode}"] = true_loss(f) / base - 1
        row[f"predicted_error_{mode}"] = f.truncation_loss() / predicted - 1
    for mode in ("f64", "f32", "bf16"):
        row[f"chunk_s_{mode}"] = round(chunk_seconds(x, mode), 6)
    row["bf16_speedup_over_f32"] = round(row["chunk_s_f32"] / row["chunk_s_bf16"], 2)
    return row


def smollm2_inputs(blocks: list[int], samples: int, seqlen: int):
    """(model, {(block, linear name): float32 inputs, tokens x features}) of SmolLM2-135M's q_proj, gate_proj and
    down_proj in `blocks` (one input per input group), from `samples` x `seqlen` windows of assets.CALIB_PLAYS."""
    from bench_svd import smollm2_windows  # tools/ is on sys.path beside this script

    model, windows = smollm2_windows(samples, seqlen)
    inputs, hooks = {}, []
    for b in blocks:
        for name in ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"):
            def hook(module, args, key=(b, name)):
                inputs.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1]).detach().clone())
            hooks.append(model.model.layers[b].get_submodule(name).register_forward_pre_hook(hook))
    with torch.no_grad():
        for i in range(0, len(windows), 4):
            model(windows[i : i + 4])
    for h in hooks:
        h.remove()
    return model, {key: torch.cat(parts) for key, parts in inputs.items()}


def synthetic(widths: list[int], tokens: int, ratio: float) -> None:
    """Inputs whose covariance decays as a power law (a few channels 30x the rest, as real activations have),
    and random weights: no model needed (the test's rows)."""
    g = torch.Generator().manual_seed(0)
    for n in widths:
        basis, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        scale = (1 + torch.arange(n, dtype=torch.float64)) ** -0.8
        scale[:3] *= 30
        x = ((torch.randn(tokens, n, generator=g, dtype=torch.float64) * scale) @ basis.T).float()
        for m in (n // 2, 2 * n):
            w = torch.randn(m, n, generator=g) / n**0.5
            print(json.dumps(compare(f"synthetic {m} x {n}", w, x, ratio)), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, nargs="+", default=[2, 15, 28])
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--synthetic", type=int, nargs="+", metavar="WIDTH", help="random inputs of these widths instead")
    p.add_argument("--tokens", type=int, default=8192, help="tokens of each synthetic input (default 8192)")
    args = p.parse_args()
    if args.synthetic:
        synthetic(args.synthetic, args.tokens, args.ratio)
        return
    model, inputs = smollm2_inputs(args.blocks, args.samples, args.seqlen)
    for (b, name), x in inputs.items():
        w = model.model.layers[b].get_submodule(name).weight.detach()
        print(json.dumps(compare(f"SmolLM2 block {b} {name}", w, x, args.ratio)), flush=True)


if __name__ == "__main__":
    main()
