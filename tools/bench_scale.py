#!/usr/bin/env python
"""A whole job on a large checkpoint under a small budget, block by block: peak RSS, time split and disk.

Issue 6's proof at scale: the 32-layer 7B-shape checkpoint of tools/make_synthetic.py compressed
with `--max-mem` at most a quarter of its weights' bytes (the default budget here), and one block of
70B shapes under 24G or less. The job runs in this process (`CompressionJob`, the same defaults as
`streamsvd run`); it is resumable like any job, so a run stopped by Ctrl-C, a kill or the end of a
session goes on from its last finished block when the same command is given again.

    python tools/make_synthetic.py llama2-7b /data/synth-7b
    nohup python tools/bench_scale.py /data/synth-7b --out /data/scale-7b > /data/scale-7b.jsonl &
    python tools/make_synthetic.py llama3-70b /data/synth-70b --layers 1
    python tools/bench_scale.py /data/synth-70b --out /data/scale-70b --max-mem 24G

One JSON line per row, printed and appended to OUT/../<OUT's name>.bench.jsonl (kept across resumes):
- `setup`: the weights' bytes, the budget and its fraction of them, the plan (minimum budget, planned
  peak, disk, estimated seconds), the batch size, and the block this run starts from;
- `block` (one per block finished by this run): wall seconds, split into `read_s` (the checkpoint's
  weight reads and their checksums), `forward_s` (the block forwards of the statistics, propagate and
  refine stages, less their other parts), `statistics_s` (the statistics' arithmetic), `factorize_s`,
  `activation_io_s` (the on-disk activations), `write_s` and `other_s` (the rest: quantisation, the
  state file, ...); the peak RSS during the block (sampled every 20 ms, as the job's own sampler),
  the peak over the budget, and the bytes on disk in OUT (work files included) at its end;
- `total`: this run's sums, the process's peak RSS as the kernel counts it (VmHWM) and the job's
  measured peak against the budget, the output's bytes, and the largest OUT size seen.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from streamsvd import assets, timing  # noqa: E402  (first: it sets torch's allocator up before torch allocates)
from streamsvd.errors import StreamSVDError  # noqa: E402
from streamsvd.io.checkpoint import Checkpoint  # noqa: E402
from streamsvd.job.device import peak_bytes  # noqa: E402
from streamsvd.job.memory import parse_size  # noqa: E402
from streamsvd.job.peak import PeakSampler, high_water_bytes  # noqa: E402
from streamsvd.job.pipeline import CompressionJob, JobConfig  # noqa: E402
from streamsvd.job.state import read_state  # noqa: E402

FORWARD_STAGES = ("statistics", "propagate", "refine")


class BlockPeak:
    """The job's own RSS sampler (job/peak.py PeakSampler, every 20 ms in a thread), one stage per block:
    `take()` gives the peak since the last take."""

    def __init__(self):
        self.sampler, self.blocks = PeakSampler("block 0").start(), 0

    def take(self) -> int:
        done = f"block {self.blocks}"
        self.blocks += 1
        self.sampler.stage(f"block {self.blocks}")  # samples the end of the block that ended, then the next one's start
        return self.sampler.peaks.pop(done)

    def stop(self) -> None:
        self.sampler.stop()


def tree_bytes(path: Path) -> int:
    """Bytes of the files under `path` as allocated on disk (sparse activation files count what they hold)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:  # removed while walking (a temporary file renamed into place)
                continue
            total += min(st.st_size, st.st_blocks * 512)
    return total


def split(stages: dict[str, float], inside: dict[str, float], wall: float) -> dict[str, float]:
    """Wall seconds by kind of work, from the job's stage seconds and the timed parts inside them."""
    read, accumulate, io = (inside.get(k, 0.0) for k in ("read", "accumulate", "activation io"))
    forward = sum(stages.get(s, 0.0) for s in FORWARD_STAGES) - read - accumulate - io
    parts = {"read_s": read, "forward_s": forward, "statistics_s": accumulate, "factorize_s": stages.get("factorize", 0.0),
             "activation_io_s": io, "write_s": stages.get("write", 0.0)}
    parts["other_s"] = wall - sum(parts.values())
    return {k: round(v, 2) for k, v in parts.items()}


def delta(now: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in now.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path, help="checkpoint directory (e.g. from tools/make_synthetic.py)")
    p.add_argument("--out", type=Path, required=True, help="the job's OUT_DIR (give the same one to resume)")
    p.add_argument("--max-mem", default=None, help="budget (default: a quarter of the checkpoint's weights' bytes)")
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--calib", type=Path, default=None, help="calibration text (default: the CALIB_PLAYS)")
    p.add_argument("--no-compensate", action="store_true",
                   help="streamsvd run --no-compensate: one stream, down_proj on its output side (a smaller minimum budget)")
    p.add_argument("--alloc", choices=["uniform", "global"], default="uniform",
                   help="uniform (default here: the rows time the compression pass alone) or global, streamsvd run's "
                   "default, which first runs a profile pass (its time lands in the first block's row)")
    p.add_argument("--precision", choices=["float64", "float32"], default="float64",
                   help="streamsvd run --precision: the factorisation's arithmetic (default float64)")
    p.add_argument("--device", default="cpu", help="streamsvd run --device: where the factorisations run (cpu or cuda)")
    p.add_argument("--max-gpu-mem", default=None, help="streamsvd run --max-gpu-mem, with --device cuda")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop (resumably) after N blocks of this run, e.g. to measure a few blocks of a long job")
    args = p.parse_args(argv)
    weights = sum(Checkpoint(args.model_dir).nbytes(k) for k in Checkpoint(args.model_dir).keys())
    budget = parse_size(args.max_mem) if args.max_mem else weights // 4
    calib = args.calib or assets.shakespeare_text(assets.CALIB_PLAYS)
    log = args.out.parent / f"{args.out.name}.bench.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)

    def emit(row: dict) -> None:
        line = json.dumps(row, sort_keys=True)
        print(line, flush=True)
        with open(log, "a") as f:
            f.write(line + "\n")

    cfg = JobConfig(model_dir=args.model_dir, out_dir=args.out, ratio=args.ratio, max_mem=budget, calib=[str(calib)],
                    calib_samples=args.calib_samples, seqlen=args.seqlen, progress=False,
                    compensate=False if args.no_compensate else None, alloc=args.alloc, precision=args.precision,
                    device=args.device, max_gpu_mem=parse_size(args.max_gpu_mem) if args.max_gpu_mem else None)
    cfg.plots = False
    try:
        job = CompressionJob(cfg)
    except StreamSVDError as e:  # e.g. a budget below the plan's minimum: the job's own error and fix lines
        print(f"error: {e.problem}", file=sys.stderr)
        if e.fix:
            print(f"  fix: {e.fix}", file=sys.stderr)
        return 2
    state = read_state(args.out, strict=False) if args.out.is_dir() else None
    plan = job.plan
    emit({"row": "setup", "model_dir": str(args.model_dir), "layers": plan.layers, "weights_bytes": weights,
          "max_mem_bytes": budget, "budget_over_weights": round(budget / weights, 4),
          "min_max_mem_bytes": plan.min_max_mem_bytes, "planned_peak_bytes": plan.peak_bytes,
          "plan_disk_bytes": plan.disk_bytes, "plan_seconds_estimate": round(plan.seconds_estimate),
          "batch_size": plan.batch_size, "calib_samples": args.calib_samples, "seqlen": args.seqlen,
          "ratio": args.ratio, "compensate": cfg.compensate, "starts_at_block": state.blocks_done if state else 0, "cpus": os.cpu_count(),
          "device": args.device, **({"planned_gpu_peak_bytes": plan.gpu_peak_bytes, "max_gpu_mem_bytes": plan.gpu_budget_bytes}
                                    if plan.gpu_peak_bytes is not None else {})})
    sampler, rows = BlockPeak(), []
    largest_out = [0]
    mark = {"t": time.perf_counter(), "inside": timing.snapshot(), "stages": {}}
    started = time.perf_counter()

    class Stop(Exception):
        pass

    def on_block_done(index: int) -> None:
        job.sampler.stage(job.sampler.current)  # charge the open stage's seconds up to now
        now, inside, stages = time.perf_counter(), timing.snapshot(), dict(job.sampler.seconds)
        wall = now - mark["t"]
        peak, disk = sampler.take(), tree_bytes(args.out)
        largest_out[0] = max(largest_out[0], disk)
        row = {"row": "block", "block": index, "seconds": round(wall, 2),
               **split(delta(stages, mark["stages"]), delta(inside, mark["inside"]), wall),
               "peak_rss_bytes": peak, "peak_over_budget": round(peak / budget, 4), "out_bytes": disk}
        gpu_peak = peak_bytes(cfg.torch_device)
        if gpu_peak is not None:  # torch's count on the GPU since the last block (the allocator's high-water mark)
            row["gpu_peak_bytes"] = gpu_peak
            import torch

            torch.cuda.reset_peak_memory_stats(cfg.torch_device)
        rows.append(row)
        emit(row)
        mark.update(t=time.perf_counter(), inside=timing.snapshot(), stages=dict(job.sampler.seconds))
        if args.stop_after is not None and len(rows) >= args.stop_after:
            raise Stop

    finished = True
    try:
        report = job.run(on_block_done=on_block_done)
    except Stop:
        finished, report = False, {}
    wall = time.perf_counter() - started
    sampler.stop()
    figures = report.get("this_run") or {}
    total = {"row": "total", "finished": finished, "blocks_this_run": len(rows), "seconds": round(wall, 2),
             **{k: round(sum(r[k] for r in rows), 2) for k in ("read_s", "forward_s", "statistics_s", "factorize_s",
                                                               "activation_io_s", "write_s")},
             "peak_rss_bytes": high_water_bytes(), "job_peak_rss_bytes": figures.get("peak_rss_bytes"),
             "max_mem_bytes": budget, "peak_over_budget": round(high_water_bytes() / budget, 4),
             "weights_bytes": weights, "largest_out_bytes": largest_out[0], "out_bytes": tree_bytes(args.out)}
    if finished:
        total["bytes_ratio_linear"] = report.get("bytes_ratio_linear")
    emit(total)
    return 0


if __name__ == "__main__":
    sys.exit(main())
