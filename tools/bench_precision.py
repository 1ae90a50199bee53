#!/usr/bin/env python
"""float32 against float64 factorisation (`run --precision`): the loss each gives, and the time.

For every matrix and ratio, the factorisation the job runs on a linear's input side (eig: the
whitening's eigh of G, float64 in both, then the exact route, A^T A for a tall weight and A A^T for a
square or wide one; math/factorize.py), once in float64 and once in float32, and for a wide weight (out < in, e.g.
down_proj) also its output side (eigh of W G W^T). Each result's loss is measured in float64 from the
factors themselves, ||(W - B A) S||_F with S S^T = G, so the float32 row is judged by what its factors
do, not by its own spectrum. One JSON line per (matrix, ratio, route):

- `loss_f64`, `loss_f32`: the measured losses; `loss_increase`: loss_f32 / loss_f64 - 1;
- `f32_kept`: whether `--precision float32` kept the float32 factors (math/factorize.float32_trusted) or ran
  the route again in float64 (then the float32 column is float64's result, and its seconds include the
  float32 attempt); `--no-guard` measures the float32 route alone;
- `increase_of_total`: (loss_f32 - loss_f64) / ||W S||_F, the same difference against the layer's
  whole output (what relative errors elsewhere in the docs are measured against);
- `reported_error`: the float32 route's own truncation_loss() / loss_f32 - 1 (what the report would say);
- `f64_s`, `f32_s`, `speedup`: each route's seconds, whitening included;
- `device`: where the routes ran (`--device`, as `run --device`); on a GPU also `gpu_peak_f64_bytes` (torch's count of
  the most the float64 route held there beyond its inputs) and, on the input side, `planned_bytes`: what the job's plan
  counts for that step on the GPU (job/plan.py: the whitening and the route's workspace), so the two can be compared.

Real matrices: SmolLM2-135M's linears of a few blocks with their real input Grams (as
tools/bench_svd.py). With --large, random matrices of 7B shapes whose singular values decay as a
power law (s_i = (1 + i)^-0.6) under a Gram whose eigenvalues fall as (1 + i)^-2 (a condition number
of 1.7e7 at 4096, about what real hidden states show; SmolLM2's are 1e5-1e8).

    python tools/bench_precision.py                        # SmolLM2 blocks 0, 15, 29 (about 2 minutes)
    python tools/bench_precision.py --large --skip-real    # the 7B shapes (minutes on 2 cores)
    python tools/bench_precision.py --large --skip-real --device cpu --device cuda   # the same on a GPU, and its CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_svd import add_matrix_flags, power_law_matrix, smollm2_grams  # noqa: E402
from streamsvd.math.factorize import (factorize, factorize_output_side, rank_for_ratio, row_chunks,  # noqa: E402
                                      whiten, whitened)

RATIOS = (0.2, 0.4, 0.6)


def measured_loss(w: torch.Tensor, f, s_white: torch.Tensor) -> float:
    """||(W - B A) S||_F in float64, a row chunk of W at a time."""
    total = 0.0
    for i, chunk in row_chunks(w):
        d = chunk - f.out_factor[i : i + chunk.shape[0]] @ f.in_factor
        total += float((d @ s_white).pow(2).sum())
    return total ** 0.5


def timed(fn, device=None):
    start = time.perf_counter()
    out = fn()
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def planned_input_bytes(m: int, n: int, k: int) -> int:
    """The plan's count for factoring an m x n linear on its input side on a GPU (job/plan.py): the larger of the
    whitening's eigh and the whitening S held beside the route's workspace (input_route_workspace)."""
    from streamsvd.job.plan import LinearShape, input_route_workspace

    _, work = input_route_workspace(LinearShape("bench", m, n, 4, "bench", rank=k), "eig")
    return max(8 * 5 * n * n, 8 * n * n + work)


def compare(label: str, w: torch.Tensor, gram: torch.Tensor, ratios=RATIOS, device=None) -> None:
    m, n = w.shape
    s64 = whiten(gram, "eig").s  # the float64 whitening that judges every result
    total = float(whitened(w, s64).norm())  # ||W S||_F: the loss of dropping everything
    device = torch.device("cpu") if device is None else device
    on_gpu = device.type == "cuda"
    wd, gd = w.to(device), gram.to(device)  # the routes' inputs where they run (the job moves them as it factors)
    routes = ["input"] + (["output"] if m < n else [])
    for route in routes:
        for ratio in ratios:
            k = rank_for_ratio(m, n, ratio)
            seconds = {}
            row = {"matrix": label, "shape": [m, n], "route": route, "ratio": ratio, "rank": k, "device": str(device)}
            losses, reported, kept = {}, {}, None
            for name, dtype in (("f64", torch.float64), ("f32", torch.float32)):
                if on_gpu:
                    torch.cuda.synchronize(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    held = torch.cuda.memory_allocated(device)
                if route == "input":
                    f, t = timed(lambda: factorize(wd, whiten(gd, "eig"), k, "eig", svd="exact", dtype=dtype), device)
                else:
                    def out_side():
                        w64 = wd.double()
                        return factorize_output_side(wd, w64 @ gd @ w64.T, k, dtype)

                    f, t = timed(out_side, device)
                if on_gpu and name == "f64":
                    row["gpu_peak_f64_bytes"] = torch.cuda.max_memory_allocated(device) - held
                    if route == "input":
                        row["planned_bytes"] = planned_input_bytes(m, n, k)
                f = f.to(torch.device("cpu"))
                seconds[name] = t
                losses[name] = measured_loss(w, f, s64)
                reported[name] = f.truncation_loss()
                kept = f.precision
                del f
            row.update({
                "loss_f64": losses["f64"], "loss_f32": losses["f32"],
                "loss_increase": losses["f32"] / losses["f64"] - 1 if losses["f64"] else None,
                "increase_of_total": (losses["f32"] - losses["f64"]) / total,
                "reported_error": reported["f32"] / losses["f32"] - 1 if losses["f32"] else None,
                "f32_kept": kept == "float32",  # False: float32_trusted sent it back to float64
                "f64_s": round(seconds["f64"], 3), "f32_s": round(seconds["f32"], 3),
                "speedup": round(seconds["f64"] / seconds["f32"], 2),
            })
            print(json.dumps(row), flush=True)


def real(args, device) -> None:
    model, grams = smollm2_grams(args.blocks, args.samples, args.seqlen)
    for (b, name), g in grams.items():
        compare(f"SmolLM2 block {b} {name}", model.model.layers[b].get_submodule(name).weight.detach(), g, args.ratios,
                device)


def large(args, device) -> None:
    g = torch.Generator().manual_seed(0)
    for m, n in [tuple(map(int, shape.split("x"))) for shape in args.shapes]:
        w = power_law_matrix(m, n, g).float()
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        gram = (q * (1 + torch.arange(n, dtype=torch.float64)) ** -2.0) @ q.T
        del q
        compare(f"random power-law {m} x {n}", w, gram, args.ratios, device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_matrix_flags(p)
    p.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    p.add_argument("--no-guard", action="store_true",
                   help="keep every float32 result (no float64 rerun where float32_trusted says no): the float32 route alone")
    p.add_argument("--device", action="append", default=None, metavar="DEVICE",
                   help="where the routes run, as run --device: cpu (default), cuda or cuda:N; repeat it for each "
                   "(a GPU's rows next to the same machine's CPU rows)")
    args = p.parse_args()
    from streamsvd.errors import StreamSVDError
    from streamsvd.job.device import resolve_device

    try:
        devices = [resolve_device(d) for d in (args.device or ["cpu"])]
    except StreamSVDError as e:
        sys.exit(f"error: {e}")
    if args.no_guard:
        from streamsvd.math import factorize as factorize_module

        factorize_module.PRECISION_TOLERANCE = float("inf")
    for device in devices:
        if not args.skip_real:
            real(args, device)
        if args.large:
            large(args, device)


if __name__ == "__main__":
    main()
