#!/usr/bin/env python
"""One job on 1 and on N processes (`torchrun --nproc-per-node N -m streamsvd run`): wall time, each
process's peak RSS and time split, the bytes its reductions move, and whether the output is the
one-process output byte for byte (issue 12 item 5).

    python tools/bench_distributed.py --model smollm2 --procs 1 2 --calib-samples 8 --seqlen 128 --batch-size 2

Each job is a fresh OUT_DIR under --work, run as its own process tree (torchrun for N > 1, a plain
`python -m streamsvd run` for 1) with OMP_NUM_THREADS=--threads per process, so N processes use N x
threads cores: on a 2-core machine 1 process x 1 thread against 2 processes x 1 thread shows how the
work splits, not what more cores would give beyond 2. Every flag after `--` goes to `streamsvd run`
(default: the job's own defaults, `--alloc global` included, so the job profiles for itself first).

One JSON line per job (`row: "run"`), with the job's own figures from its run log
(OUT_DIR/streamsvd_runs.jsonl; under torchrun its `per_process` entry):
- `wall_s`: the launcher's wall time, start-up included; `seconds`: the job's own;
- per process: `peak_rss_bytes`, `stage_s` (wall seconds per stage: profile, statistics, factorize,
  propagate, write, ...), `reduce_s` (statistics reductions, waiting for the slowest rank included),
  `share_factors_s` (broadcasting the factors, waiting for their owners included), `reduced_bytes`
  (the tensor bytes this process contributed to reductions; each is broadcast to the N - 1 others),
  `reduced_bytes_per_block` (that over the decoder blocks; the job's own profile is in it),
  `factor_bytes_sent`, `gradient_bytes_sent` (refinement: the gradients of the steps whose batch this process
  holds, `--refine-steps`);
- `identical_to`: for N > 1, whether every output file but the run log and the state (which record the
  number of processes) equals the 1-process job's, and `differing` the files that do not.
Then one `row: "summary"` line: the speed-up of each N over 1 process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from streamsvd import assets  # noqa: E402
from streamsvd.io.output import last_run  # noqa: E402

VOLATILE = {"streamsvd_runs.jsonl", "streamsvd_state.json", "profile_log.json"}


def files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name not in VOLATILE}


def run_job(model: Path, out: Path, procs: int, threads: int, flags: list[str]) -> tuple[float, dict]:
    shutil.rmtree(out, ignore_errors=True)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs)]
                if procs > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    started = time.time()
    done = subprocess.run([*launcher, "-m", "streamsvd", "run", str(model), str(out), "--no-progress", *flags],
                          env=env, capture_output=True, text=True)
    wall = time.time() - started
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"the {procs}-process job failed (exit {done.returncode})")
    return wall, last_run(out)


def process_row(p: dict, blocks: int) -> dict:
    inside = p.get("seconds_in", {})
    return {"rank": p.get("rank", 0), "windows": p.get("windows"), "peak_rss_bytes": p["peak_rss_bytes"],
            "stage_s": p.get("seconds_by_stage", {}), "reduce_s": inside.get("reduce", 0.0),
            "share_factors_s": inside.get("share factors", 0.0), "reduced_bytes": p.get("reduced_bytes", 0),
            "reduced_bytes_per_block": round(p.get("reduced_bytes", 0) / max(blocks, 1)),
            "reductions": p.get("reductions", 0), "factor_bytes_sent": p.get("factor_bytes_sent", 0),
            "gradient_bytes_sent": p.get("gradient_bytes_sent", 0)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="smollm2, gemma3, or a checkpoint directory")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts; 1 is always run first")
    p.add_argument("--threads", type=int, default=1, help="BLAS threads per process (default 1)")
    p.add_argument("--calib", type=Path, default=None, help="calibration text (default: the CALIB_PLAYS)")
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=2, help="fixed, so every process count streams the same batches")
    p.add_argument("--max-mem", default="8G", help="per process")
    p.add_argument("--work", type=Path, default=Path("/tmp/streamsvd-bench-distributed"))
    p.add_argument("--keep-outputs", action="store_true")
    p.add_argument("run_flags", nargs=argparse.REMAINDER, help="after --: more `streamsvd run` flags")
    args = p.parse_args()
    model = {"smollm2": assets.smollm2_checkpoint, "gemma3": assets.gemma3_checkpoint}.get(args.model)
    model = model() if model else Path(args.model)
    calib = args.calib or assets.shakespeare_text(assets.CALIB_PLAYS)
    extra = [f for f in args.run_flags if f != "--"]
    flags = ["--calib", str(calib), "--calib-samples", str(args.calib_samples), "--seqlen", str(args.seqlen),
             "--batch-size", str(args.batch_size), "--max-mem", args.max_mem, "--no-plots", *extra]
    layers = json.loads((model / "config.json").read_text())
    layers = (layers.get("text_config") or layers)["num_hidden_layers"]
    args.work.mkdir(parents=True, exist_ok=True)
    counts = [1] + sorted({n for n in args.procs if n > 1})
    reference, walls = None, {}
    for n in counts:
        out = args.work / f"procs-{n}"
        wall, run = run_job(model, out, n, args.threads, flags)
        walls[n] = wall
        per = run.get("per_process") or [{"rank": 0, "windows": [0, args.calib_samples], **run}]
        row = {"row": "run", "model": str(model), "procs": n, "threads_per_process": args.threads,
               "calib_samples": args.calib_samples, "seqlen": args.seqlen, "batch_size": run["batch_size"],
               "blocks": layers, "flags": extra, "wall_s": round(wall, 2), "seconds": run["seconds"],
               "profile_s": run.get("profile_seconds"), "processes": [process_row(q, layers) for q in per]}
        made = files(out)
        if n == 1:
            reference = made
        else:
            differing = sorted(k for k in set(made) | set(reference) if made.get(k) != reference.get(k))
            row["identical_to"] = {"procs": 1, "identical": not differing, "differing": differing[:20]}
        print(json.dumps(row), flush=True)
        if n > 1 and not args.keep_outputs:
            shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({"row": "summary", "speedup_over_1": {str(n): round(walls[1] / walls[n], 2) for n in counts if n > 1},
                      "wall_s": {str(n): round(w, 2) for n, w in walls.items()}}), flush=True)
    if not args.keep_outputs:
        shutil.rmtree(args.work / "procs-1", ignore_errors=True)


if __name__ == "__main__":
    main()
