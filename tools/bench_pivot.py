#!/usr/bin/env python
"""Pivot choice benchmark: for real SmolLM2-135M matrices truncated to the pivoted rank of a ratio,
compare the pivot rules of streamsvd.math.pivot (maxvol, lu, qr) by max |B'|, max |A'| / max |W|,
the time to pivot, and the relative reconstruction error ||W'_stored - W'||_F / ||W'||_F of the
matrix rebuilt from the factors rounded to float32, bfloat16 and float16 (W' = the exact rank-r
truncation, in float64). The plain two-factor form at the same rank is the row "plain".

The factors are SVD-LLM V2's form A = U_r, B = U_r^T W with the plain SVD of W (no calibration
Grams: the pivots depend only on the row space of B, and this keeps the benchmark quick).
Prints one JSON line per (matrix, rule).

    python tools/bench_pivot.py --ratio 0.4 --layers 0 15 29
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from streamsvd import assets
from streamsvd.io.checkpoint import Checkpoint
from streamsvd.math.factorize import rank_for_ratio
from streamsvd.math.pivot import PIVOT_METHODS, pivot_factors

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _rel(w_hat: torch.Tensor, w: torch.Tensor) -> float:
    return float((w_hat.double() - w).norm() / w.norm())


def _pivoted_matrix(a: torch.Tensor, rest: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    r, n = a.shape[1], perm.numel()
    full = torch.zeros(r, n, dtype=torch.float64)
    full[:, perm[:r]] = torch.eye(r, dtype=torch.float64)
    full[:, perm[r:]] = rest.double()
    return a.double() @ full


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--layers", type=int, nargs="+", default=[0, 15, 29])
    p.add_argument("--modules", nargs="+", default=["self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj", "mlp.down_proj"])
    p.add_argument("--methods", nargs="+", default=list(PIVOT_METHODS), choices=PIVOT_METHODS)
    args = p.parse_args()
    torch.set_num_threads(1)
    ckpt = Checkpoint(assets.smollm2_checkpoint())
    for layer in args.layers:
        for module in args.modules:
            name = f"model.layers.{layer}.{module}.weight"
            w = ckpt.get(name).double()
            m, n = w.shape
            r = rank_for_ratio(m, n, args.ratio, "pivoted")
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            a, b = u[:, :r], u[:, :r].T @ w
            exact = a @ b
            common = {"matrix": name, "shape": [m, n], "rank": r, "ratio": args.ratio, "max_abs_w": float(w.abs().max())}
            row = {**common, "rule": "plain", "max_abs_in": float(b.abs().max()), "max_abs_out": float(a.abs().max())}
            for dname, dt in DTYPES.items():
                row[f"rel_err_{dname}"] = _rel(a.to(dt).double() @ b.to(dt).double(), exact)
            print(json.dumps(row), flush=True)
            for method in args.methods:
                start = time.perf_counter()
                f = pivot_factors(a, b, method)
                seconds = time.perf_counter() - start
                row = {**common, "rule": method, "seconds": round(seconds, 3), "max_abs_in": float(f.in_rest.abs().max()),
                       "max_abs_out": float(f.out_factor.abs().max())}
                for dname, dt in DTYPES.items():
                    row[f"rel_err_{dname}"] = _rel(_pivoted_matrix(f.out_factor.to(dt), f.in_rest.to(dt), f.pivots), exact)
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
