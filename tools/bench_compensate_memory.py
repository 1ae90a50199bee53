"""One compensated linear's factorisation: its peak memory against what the plan counts for it, and its time.

The job's compensated step for an input-side linear (job/stages.factor_block with cross statistics):
W C from the cross statistic, W* = W (C + lam I) H^+, the whitened truncation of W* (math/factorize.py's
route for the shape) and the output error. The plan (job/plan.py, factorisation workspace) counts for it
W C and W* beside the route's own workspace and the factors. This measures the process's RSS above what
was held before the step (the weight, the Gram, the cross statistic and the whitening, as in the job),
sampled every 20 ms (job/peak.PeakSampler), on random inputs of a real shape: memory and time do not depend
on the values, only on the shapes and the rank.

    python tools/bench_compensate_memory.py --shape 28672 8192     # a Llama-3-70B gate_proj / up_proj
    python tools/bench_compensate_memory.py --shape 11008 4096     # a Llama-2-7B gate_proj / up_proj

One JSON line per shape: m, n, rank, the measured peak above the step's start, the plan's count for the
step, their ratio, and the seconds of each part (W C, the factorisation, the output error).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import streamsvd  # noqa: E402,F401  (first: it sets torch's allocator up before torch allocates)
import torch  # noqa: E402

from streamsvd.job.peak import PeakSampler, fix_heap_thresholds, rss_bytes, stage_threshold, trim_heap  # noqa: E402
from streamsvd.job.plan import LinearShape, input_route_workspace  # noqa: E402
from streamsvd.math.compensate import (CrossGramAccumulator, compensated_whitening, factorize_compensated,  # noqa: E402
                                       output_error)
from streamsvd.math.factorize import rank_for_ratio  # noqa: E402


def measure(m: int, n: int, ratio: float, anchor: float, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(m, n, generator=g).to(torch.bfloat16).to(torch.float32)  # a stored bf16 weight, as computed
    x = torch.randn(2 * n, n, generator=g)
    cross = CrossGramAccumulator(n)
    cross.add_pair(x, x + 0.1 * torch.randn(x.shape, generator=g))
    gram = (x.T.to(torch.float64) @ x.to(torch.float64)) / x.shape[0]
    del x
    white, q, inv, lam = compensated_whitening(gram, anchor)
    rank = rank_for_ratio(m, n, ratio, "pivoted")
    e0 = 1.0
    fix_heap_thresholds(stage_threshold("factorize"))  # the heap as in the job's factorize stage
    trim_heap()  # the start is what is live: x and the setup's other freed tensors (under 32 MiB) stay in the heap
    start = rss_bytes()
    sampler = PeakSampler("wc").start()
    t0 = time.perf_counter()
    wc = cross.times(weight)
    t1 = time.perf_counter()
    sampler.stage("factorize")
    f = factorize_compensated(weight, white, q, inv, lam, None, rank, svd="exact", wc=wc)
    t2 = time.perf_counter()
    sampler.stage("output error")
    error = output_error(weight, (f.out_factor, f.in_factor), e0, None, gram, wc=wc)
    t3 = time.perf_counter()
    peaks = sampler.stop()
    what, planned = input_route_workspace(LinearShape("mlp.gate_proj", m, n, 2, "mlp.gate_proj", rank=rank), "eig",
                                          compensated=True)
    peak = max(peaks.values()) - start
    return {"m": m, "n": n, "rank": rank, "peak_above_start_bytes": peak,
            "peak_by_part_bytes": {k: v - start for k, v in peaks.items()}, "planned_bytes": planned, "planned_step": what,
            "planned_over_measured": round(planned / peak, 3), "wc_s": round(t1 - t0, 2),
            "factorize_s": round(t2 - t1, 2), "output_error_s": round(t3 - t2, 2), "threads": torch.get_num_threads(),
            "error_is_finite": error == error}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", nargs=2, type=int, action="append", metavar=("OUT", "IN"), required=True,
                   help="out_features in_features of a tall (out > in) compensated linear; repeatable")
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--anchor", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    for m, n in args.shape:
        print(json.dumps(measure(m, n, args.ratio, args.anchor, args.seed)), flush=True)


if __name__ == "__main__":
    main()
