#!/usr/bin/env python
"""Quality benchmark: compress SmolLM2-135M (and Gemma 3 270M) at several ratios with each factor method and measure
perplexity before and after on held-out text, plus wall time and peak RSS of each compression.

Calibration text: the Shakespeare plays in streamsvd.assets.CALIB_PLAYS; evaluation text: the four
tragedies in EVAL_PLAYS (never calibrated on). Each compression and evaluation runs as its own
`streamsvd` process, so its peak RSS is its own. Prints one JSON line per row.

    python tools/bench_quality.py --ratios 0.2 0.4 0.6 --methods eig cholesky
    python tools/bench_quality.py --models smollm2 gemma3 --methods eig --factors plain pivoted --cross-domain
    python tools/bench_quality.py --models smollm2 gemma3 --methods eig --allocs uniform global v2 --cross-domain

With --allocs, each model is profiled once (`streamsvd profile`, its wall time in the rows as `profile_wall_s`)
and every non-uniform row runs with `--alloc A --profile PROFILE` (so `compress_wall_s` excludes profiling).

Plain vs pivoted factors (issue 14) at the same ratio store the same number of parameters (within
rounding of the rank); `ppl` is held-out plays (the calibration's domain), `ppl_cross` Python's
reference docs (another domain).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from streamsvd import assets
from streamsvd.io.calibration import default_text
from streamsvd.io.output import last_run

MODELS = {"smollm2": ("SmolLM2-135M-Instruct (Q4_1 dequantised, float32)", assets.smollm2_checkpoint),
          "gemma3": ("Gemma 3 270M (float32)", assets.gemma3_checkpoint)}


def _streamsvd(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "streamsvd.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return proc


def evaluate(model: Path, text: Path, seqlen: int, windows: int) -> dict:
    proc = _streamsvd("eval", str(model), "--text", str(text), "--seqlen", str(seqlen), "--max-windows", str(windows), "--json", "--no-progress")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _flags(variant: str) -> list[str]:
    """calibrate=sequential,compensate -> ["--calibrate", "sequential", "--compensate"]; "-" -> []."""
    out = []
    for word in filter(None, variant.strip("-").split(",")):
        key, eq, value = word.partition("=")
        out += [f"--{key}"] + ([value] if eq else [])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    p.add_argument("--methods", nargs="+", default=["eig", "cholesky"], choices=["eig", "cholesky", "svd"])
    p.add_argument("--factors", nargs="+", default=["pivoted"], choices=["pivoted", "plain"],
                   help="stored forms to compare (streamsvd run --factors); rows carry the parameters each stores")
    p.add_argument("--models", nargs="+", default=["smollm2"], choices=sorted(MODELS))
    p.add_argument("--cross-domain", action="store_true",
                   help="also score Python's reference docs (pydoc_data, never calibration text when --calib shakespeare)")
    p.add_argument("--calib", choices=["shakespeare", "pydoc"], default="shakespeare",
                   help="calibration text: the CALIB_PLAYS, or streamsvd's built-in default (Python's reference docs)")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--max-mem", default="8G")
    p.add_argument("--allocs", nargs="+", default=["uniform"], choices=["uniform", "v2", "global"],
                   help="rank allocators to compare (streamsvd run --alloc); one `streamsvd profile` per model serves them all")
    p.add_argument("--variants", nargs="+", default=["-"], metavar="FLAGS",
                   help="extra `streamsvd run` flags per row, one word each: key=value or key, comma-separated, e.g. "
                   "calibrate=sequential,compensate,anchor=0.1 for --calibrate sequential --compensate --anchor 0.1 "
                   "(compensation, issue 8); `-` for none (default: one row with none)")
    p.add_argument("--reuse-profile", action="store_true",
                   help="keep a profile already in WORK from an earlier run with the same settings (profile_wall_s is then "
                   "the time to find it, not to make it)")
    p.add_argument("--keep-outputs", action="store_true", help="leave each row's OUT_DIR in WORK (default: removed once scored)")
    p.add_argument("--skip-original", action="store_true", help="do not evaluate the uncompressed model (rows then lack ppl_before)")
    p.add_argument("--work", type=Path, default=assets.cache_root() / "bench", help="where outputs go (default: the cache)")
    args = p.parse_args()
    if args.cross_domain and args.calib == "pydoc":
        sys.exit("--cross-domain scores pydoc text, which --calib pydoc calibrates on: held-out text must not be calibration text")

    calib, held_out = assets.shakespeare_text(assets.CALIB_PLAYS), assets.shakespeare_text(assets.EVAL_PLAYS)
    texts = {"ppl": held_out}
    if args.cross_domain:
        args.work.mkdir(parents=True, exist_ok=True)
        pydoc = args.work / "pydoc_topics.txt"
        pydoc.write_text(default_text())
        texts["ppl_cross"] = pydoc
    calib_flags = ["--calib", str(calib)] if args.calib == "shakespeare" else []
    for model_key in args.models:
        model_name, model_fn = MODELS[model_key]
        model = model_fn()
        common = {"model": model_name,
                  "calib_text": "+".join(assets.CALIB_PLAYS) if args.calib == "shakespeare" else "pydoc_data.topics",
                  "eval_text": "+".join(assets.EVAL_PLAYS), "cross_text": "pydoc_data.topics" if args.cross_domain else None,
                  "calib_samples": args.calib_samples, "seqlen": args.seqlen,
                  "eval_seqlen": args.eval_seqlen, "eval_windows": args.eval_windows}
        # The original's perplexities (every row's *_before); --skip-original leaves them out.
        base = {} if args.skip_original else {key: evaluate(model, text, args.eval_seqlen, args.eval_windows) for key, text in texts.items()}
        if not args.skip_original:
            print(json.dumps({**common, "method": "original", "ratio": 0.0, **{k: v["perplexity"] for k, v in base.items()},
                              "tokens_scored": base["ppl"]["tokens_scored"]}), flush=True)
        calib_args = [*calib_flags, "--calib-samples", str(args.calib_samples), "--seqlen", str(args.seqlen),
                      "--max-mem", args.max_mem, "--no-progress"]
        profile, profile_wall = None, None
        if any(a != "uniform" for a in args.allocs):
            profile = args.work / f"{model_key}-profile"
            if not args.reuse_profile:
                shutil.rmtree(profile, ignore_errors=True)
            start = time.time()
            _streamsvd("profile", str(model), str(profile), *calib_args)
            profile_wall = round(time.time() - start, 1)
        rows = [(m, r, f, a, v) for m in args.methods for r in args.ratios for f in args.factors for a in args.allocs
                for v in args.variants]
        for method, ratio, factors, alloc, variant in rows:
            tag = "" if variant == "-" else "-" + re.sub(r"[^A-Za-z0-9.=]+", "_", variant)
            out = args.work / f"{model_key}-{method}-{factors}-{alloc}-{ratio}{tag}"
            shutil.rmtree(out, ignore_errors=True)
            # explicit for uniform too: `run` defaults to global (which profiles for itself) since 06087f2
            alloc_flags = ["--alloc", "uniform"] if alloc == "uniform" else ["--alloc", alloc, "--profile", str(profile)]
            start = time.time()
            _streamsvd("run", str(model), str(out), "--ratio", str(ratio), "--method", method, "--factors", factors,
                       *calib_args, *alloc_flags, *_flags(variant))
            wall = time.time() - start
            report = json.loads((out / "streamsvd_report.json").read_text())
            ran = (report.get("allocation") or {}).get("alloc", "uniform")
            if ran != alloc:  # a row must be what it says it is
                raise SystemExit(f"the {alloc} row ran --alloc {ran}: {out}")
            this_run = last_run(out)  # wall time, peak RSS
            after = {key: evaluate(out, text, args.eval_seqlen, args.eval_windows) for key, text in texts.items()}
            print(json.dumps({**common, "method": method, "factors": factors, "alloc": alloc, "flags": variant,
                              "ratio": ratio,
                              "ratio_linear": round(report["ratio_linear"], 4),
                              "ratio_model": round(report["ratio_model"], 4),
                              "linear_params_after": report["linear_params_after"],
                              "model_params_after": report["model_params_after"],
                              **{f"{k}_before": v["perplexity"] for k, v in base.items()},
                              **{k: v["perplexity"] for k, v in after.items()}, "compress_wall_s": round(wall, 1),
                              "compress_peak_rss_bytes": this_run["peak_rss_bytes"],
                              "eval_wall_s": after["ppl"]["seconds"],
                              **({"profile_wall_s": profile_wall} if alloc != "uniform" else {})}), flush=True)
            if not args.keep_outputs:
                shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
