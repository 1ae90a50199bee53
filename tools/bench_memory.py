#!/usr/bin/env python
"""Memory benchmark: how `--max-mem` sizes the batches, and the peak RSS each budget really gives.

Compresses SmolLM2-135M once per budget, each in its own `streamsvd run` process (so the peak RSS is
that process's own, read from the kernel's accounting of the child), and prints one JSON line per
budget. Until the planner makes `--max-mem` a hard limit this is how far the estimate can be trusted.

    python tools/bench_memory.py --budgets 1.2G 1.5G 3G 8G
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from streamsvd import assets
from streamsvd.job.memory import parse_size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", nargs="+", default=["1.2G", "1.5G", "3G", "8G"])
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--work", type=Path, default=assets.cache_root() / "bench-memory", help="where outputs go")
    args = p.parse_args()

    model = assets.smollm2_checkpoint()
    calib = assets.shakespeare_text(assets.CALIB_PLAYS)
    for budget in args.budgets:
        out = args.work / f"budget-{budget}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "streamsvd.cli", "run", str(model), str(out), "--ratio", "0.4", "--calib", str(calib),
               "--calib-samples", str(args.calib_samples), "--seqlen", str(args.seqlen), "--max-mem", budget, "--no-progress"]
        start = time.time()
        # Each budget in a fresh child, waited for alone, so ru_maxrss of the children is this run's peak
        # (it is a maximum over children, and the budgets are run from small to large by the default).
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.time() - start
        row = {"model": "SmolLM2-135M-Instruct (Q4_1 dequantised, float32)", "calib_text": "+".join(assets.CALIB_PLAYS),
               "calib_samples": args.calib_samples, "seqlen": args.seqlen, "max_mem": budget,
               "max_mem_bytes": parse_size(budget), "exit": proc.returncode, "wall_s": round(wall, 1)}
        if proc.returncode == 0:
            report = json.loads((out / "streamsvd_report.json").read_text())
            peak = report["this_run"]["peak_rss_bytes"]
            row.update(batch_size=report["this_run"]["batch_size"], peak_rss_bytes=peak,
                       peak_over_budget=round(peak / parse_size(budget), 3),
                       children_max_rss_bytes=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
        else:
            row["error"] = proc.stderr.strip().splitlines()[-2:]
        print(json.dumps(row), flush=True)
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
