#!/usr/bin/env python
"""Memory benchmark: `--max-mem` as a promise. Sweeps budgets from the planner's minimum upwards.

First `streamsvd plan --json` gives the smallest workable budget for the settings; then one
`streamsvd run` process per budget (that minimum times each --factors value, or the --budgets
given; the plan's minimum already carries a 64 MiB margin for the baseline, which is measured in
each process and varies by tens of MiB from one to the next). Each row: the budget, the plan's batch and planned peak, the measured peak RSS (the
kernel's high-water mark of that child alone, from wait4, and the run's own sampler per stage)
and measured / budget. Every row must have a ratio at or under 1.

    python tools/bench_memory.py                       # SmolLM2-135M, 32 x 512, factors 1 1.25 1.6 2.5 4
    python tools/bench_memory.py --layers 3 --calib-samples 16 --seqlen 256   # the first 3 blocks only
    python tools/bench_memory.py --model DIR --budgets 6G 8G
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

from streamsvd import assets
from streamsvd.io.output import last_run
from streamsvd.job.memory import parse_size


def first_blocks(model: Path, layers: int, dest: Path) -> Path:
    """A view of `model` with only its first `layers` decoder blocks (same shards, linked; a shorter index).

    Every block of these models has the same shapes, so the memory of a job is the same per block;
    fewer blocks only make the sweep shorter.
    """
    dest.mkdir(parents=True, exist_ok=True)
    config = json.loads((model / "config.json").read_text())
    config["num_hidden_layers"] = layers
    if isinstance(config.get("layer_types"), list):
        config["layer_types"] = config["layer_types"][:layers]
    (dest / "config.json").write_text(json.dumps(config))
    index = json.loads((model / "model.safetensors.index.json").read_text())
    keep = {}
    for key, shard in index["weight_map"].items():
        parts = key.split(".")
        if len(parts) > 2 and parts[1] == "layers" and int(parts[2]) >= layers:
            continue
        keep[key] = shard
    (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": keep}))
    for f in model.iterdir():
        if f.name not in ("config.json", "model.safetensors.index.json") and not (dest / f.name).exists():
            (dest / f.name).symlink_to(f.resolve())
    return dest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="checkpoint (default: SmolLM2-135M from the assets)")
    p.add_argument("--factors", nargs="+", type=float, default=[1.0, 1.25, 1.6, 2.5, 4.0],
                   help="budgets as multiples of the planner's minimum")
    p.add_argument("--budgets", nargs="+", default=None, help="explicit budgets instead (e.g. 1G 2G)")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--layers", type=int, default=None, help="use only the first N decoder blocks (a shorter sweep)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more flags for plan and run")
    p.add_argument("--work", type=Path, default=assets.cache_root() / "bench-memory", help="where outputs go")
    args = p.parse_args()

    model = args.model or assets.smollm2_checkpoint()
    if args.layers:
        model = first_blocks(model, args.layers, args.work / f"{model.name}-first-{args.layers}")
    calib = assets.shakespeare_text(assets.CALIB_PLAYS)
    common = ["--ratio", str(args.ratio), "--calib", str(calib), "--calib-samples", str(args.calib_samples),
              "--seqlen", str(args.seqlen), *args.extra]
    cli = [sys.executable, "-m", "streamsvd.cli"]
    plan = json.loads(subprocess.run([*cli, "plan", str(model), *common, "--json"], capture_output=True, text=True,
                                     check=True).stdout)
    minimum = plan["min_max_mem_bytes"]
    budgets = [parse_size(b) for b in args.budgets] if args.budgets else [int(minimum * f) for f in args.factors]
    for budget in budgets:
        out = args.work / f"budget-{budget}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [*cli, "run", str(model), str(out), *common, "--max-mem", str(budget), "--no-progress"]
        start = time.time()
        log = args.work / f"budget-{budget}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as sink:
            proc = subprocess.Popen(cmd, stdout=sink, stderr=sink)
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: its peak RSS alone
        proc.returncode = os.waitstatus_to_exitcode(status)
        stderr = log.read_text()
        wall = time.time() - start
        row = {"model": model.name, "layers": args.layers, "calib_samples": args.calib_samples, "seqlen": args.seqlen, "ratio": args.ratio,
               "extra": " ".join(args.extra), "max_mem_bytes": budget, "plan_min_max_mem_bytes": minimum,
               "exit": proc.returncode, "wall_s": round(wall, 1), "child_maxrss_bytes": usage.ru_maxrss * 1024}
        if proc.returncode == 0:
            run = last_run(out)
            measured = max(run["peak_rss_bytes"], usage.ru_maxrss * 1024)
            row.update(batch_size=run["batch_size"], planned_peak_bytes=run["planned_peak_bytes"],
                       measured_peak_bytes=measured, measured_over_budget=round(measured / budget, 3),
                       within_budget=measured <= budget, peak_rss_by_stage=run["peak_rss_by_stage"])
        else:
            row["error"] = stderr.strip().splitlines()[-2:]
        print(json.dumps(row), flush=True)
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
