#!/usr/bin/env python
"""Quality benchmark: compress SmolLM2-135M at several ratios with each factor method and measure
perplexity before and after on held-out text, plus wall time and peak RSS of each compression.

Calibration text: the Shakespeare plays in streamsvd.assets.CALIB_PLAYS; evaluation text: the four
tragedies in EVAL_PLAYS (never calibrated on). Each compression and evaluation runs as its own
`streamsvd` process, so its peak RSS is its own. Prints one JSON line per row.

    python tools/bench_quality.py --ratios 0.2 0.4 0.6 --methods eig cholesky
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from streamsvd import assets


def _streamsvd(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "streamsvd.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return proc


def evaluate(model: Path, text: Path, seqlen: int, windows: int) -> dict:
    proc = _streamsvd("eval", str(model), "--text", str(text), "--seqlen", str(seqlen), "--max-windows", str(windows), "--json", "--no-progress")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    p.add_argument("--methods", nargs="+", default=["eig", "cholesky"], choices=["eig", "cholesky", "svd"])
    p.add_argument("--calib", choices=["shakespeare", "pydoc"], default="shakespeare",
                   help="calibration text: the CALIB_PLAYS, or streamsvd's built-in default (Python's reference docs)")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--max-mem", default="8G")
    p.add_argument("--skip-original", action="store_true", help="do not re-measure the uncompressed model")
    p.add_argument("--work", type=Path, default=assets.cache_root() / "bench", help="where outputs go (default: the cache)")
    args = p.parse_args()

    model = assets.smollm2_checkpoint()
    calib, held_out = assets.shakespeare_text(assets.CALIB_PLAYS), assets.shakespeare_text(assets.EVAL_PLAYS)
    calib_flags = ["--calib", str(calib)] if args.calib == "shakespeare" else []
    common = {"model": "SmolLM2-135M-Instruct (Q4_1 dequantised, float32)",
              "calib_text": "+".join(assets.CALIB_PLAYS) if args.calib == "shakespeare" else "pydoc_data.topics",
              "eval_text": "+".join(assets.EVAL_PLAYS), "calib_samples": args.calib_samples, "seqlen": args.seqlen,
              "eval_seqlen": args.eval_seqlen, "eval_windows": args.eval_windows}
    base = evaluate(model, held_out, args.eval_seqlen, args.eval_windows)  # ppl_before of every row
    if not args.skip_original:
        print(json.dumps({**common, "method": "original", "ratio": 0.0, "ppl": base["perplexity"], "tokens_scored": base["tokens_scored"]}), flush=True)
    for method in args.methods:
        for ratio in args.ratios:
            out = args.work / f"smollm2-{method}-{ratio}"
            shutil.rmtree(out, ignore_errors=True)
            start = time.time()
            _streamsvd("run", str(model), str(out), "--ratio", str(ratio), "--method", method, *calib_flags,
                       "--calib-samples", str(args.calib_samples), "--seqlen", str(args.seqlen),
                       "--max-mem", args.max_mem, "--no-progress")
            wall = time.time() - start
            report = json.loads((out / "streamsvd_report.json").read_text())
            after = evaluate(out, held_out, args.eval_seqlen, args.eval_windows)
            print(json.dumps({**common, "method": method, "ratio": ratio, "ratio_linear": round(report["ratio_linear"], 4),
                              "ratio_model": round(report["ratio_model"], 4), "ppl_before": base["perplexity"],
                              "ppl": after["perplexity"], "compress_wall_s": round(wall, 1),
                              "compress_peak_rss_bytes": report["this_run"]["peak_rss_bytes"], "eval_wall_s": after["seconds"]}), flush=True)
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
