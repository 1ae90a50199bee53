#!/usr/bin/env python
"""Layer microbenchmark: dense vs plain vs pivoted linears at the same parameter count.

For each shape (out x in) and ratio, plain factors get rank k = rank_for_ratio(..., "plain") and
pivoted factors rank r = rank_for_ratio(..., "pivoted"): both store at most (1 - ratio) out in numbers.
Times the forward of batch 1 token and 512 tokens (median of --reps after warm-up), float32, on
CPU (and on CUDA when --device cuda). The pivoted layer is timed in several equivalent ways:

- pivoted: streamsvd's PivotedLinear, two index_selects (x[..., p], x[..., q]), addmm, then @ A'^T;
- one-gather+slices: x.index_select(-1, perm), then x_perm[:r] + x_perm[r:] @ B'^T, then @ A'^T;
- one-gather+addmm: the same with addmm on the slices;
- identity: the r x in matrix [I | B'] scattered back to input order, then two matmuls (plain cost).

Prints one JSON line per (shape, tokens, variant).

    python tools/bench_layers.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from streamsvd.math.factorize import rank_for_ratio, stored_numel
from streamsvd.math.pivot import pivot_factors
from streamsvd.model.lowrank import LowRankLinear, PivotedLinear

SHAPES = {"smollm2 q/o 576x576": (576, 576), "smollm2 gate/up 1536x576": (1536, 576), "smollm2 down 576x1536": (576, 1536),
          "llama-7b q 4096x4096": (4096, 4096), "llama-7b gate 11008x4096": (11008, 4096), "llama-7b down 4096x11008": (4096, 11008)}


def _time(fn, x, reps: int, device: str) -> float:
    with torch.no_grad():
        for _ in range(3):
            fn(x)
        times = []
        for _ in range(reps):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn(x)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 512])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dev = args.device
    g = torch.Generator().manual_seed(0)
    for label in args.shapes:
        m, n = SHAPES[label]
        k = rank_for_ratio(m, n, args.ratio, "plain")
        r = rank_for_ratio(m, n, args.ratio, "pivoted")
        dense = torch.nn.Linear(n, m, bias=False)
        plain = LowRankLinear.from_factors(torch.randn(m, k, generator=g) / k**0.5, torch.randn(k, n, generator=g) / n**0.5, None)
        pf = pivot_factors(torch.randn(m, r, generator=g, dtype=torch.float64), torch.randn(r, n, generator=g, dtype=torch.float64), "lu")
        piv = PivotedLinear.from_tensors(pf.out_factor.float(), pf.in_rest.float(), pf.pivots, None)
        dense, plain, piv = dense.to(dev), plain.to(dev), piv.to(dev)
        a, rest, perm = piv.out_factor, piv.in_rest, piv.pivots
        rest_t = rest.T.contiguous()
        ident = torch.zeros(r, n, device=dev)
        ident[:, perm[:r]] = torch.eye(r, device=dev)
        ident[:, perm[r:]] = rest

        def one_gather_slices(x):
            xs = x.index_select(-1, perm)
            return F.linear(xs[..., :r] + F.linear(xs[..., r:], rest), a)

        def one_gather_addmm(x):
            xs = x.reshape(-1, n).index_select(1, perm)
            return F.linear(torch.addmm(xs[:, :r], xs[:, r:], rest_t), a).reshape(*x.shape[:-1], m)

        variants = {"dense": dense, "plain": plain, "pivoted": piv, "pivoted one-gather+slices": one_gather_slices,
                    "pivoted one-gather+addmm": one_gather_addmm,
                    "pivoted identity": lambda x: F.linear(F.linear(x, ident), a)}
        params = {"dense": m * n, "plain": stored_numel(m, n, k, "plain"), "pivoted": stored_numel(m, n, r, "pivoted")}
        for tokens in args.tokens:
            x = torch.randn(1, tokens, n, generator=g).to(dev)
            want = piv(x).detach()
            for name, fn in variants.items():
                if name.startswith("pivoted"):
                    with torch.no_grad():
                        assert float((fn(x) - want).norm() / want.norm()) < 1e-4, name
                seconds = _time(fn, x, args.reps, dev)
                kind = name.split()[0]
                print(json.dumps({"shape": label, "out": m, "in": n, "ratio": args.ratio, "tokens": tokens, "variant": name,
                                  "rank": {"dense": min(m, n), "plain": k, "pivoted": r}[kind], "params": params[kind],
                                  "median_ms": round(seconds * 1e3, 4), "device": dev, "threads": args.threads}), flush=True)


if __name__ == "__main__":
    main()
