#!/usr/bin/env python
"""How close `streamsvd run` is to the floor: one plain forward pass of the decoder over the same windows.

In one process, taking turns so that a busy or throttled machine slows every row alike:
1. the floor: the calibration windows through every original decoder block, one block in memory at a
   time and the hidden states kept in RAM (what any job must do at least once), split into reading
   the block and its forward;
2. each job variant (`streamsvd run` with the variant's flags, in this process), split by stage from
   the job's own figures (OUT_DIR/streamsvd_runs.jsonl: `seconds_by_stage`, `seconds_in`): the
   block forwards (statistics and propagate stages, less the statistics' arithmetic and the
   activation files), the statistics' arithmetic, factorisation, activation I/O, writing;
then the floor twice (at the first variant's batch size); the floor is the faster of the two. One JSON line per row; `x_forward` is
the row's wall time over the floor, `x_forward_without_profile` the same less the job's own profile (the default's global
allocation profiles the model first: a statistics pass, every matrix's spectrum and the sensitivity backward pass).

Variants: `default` (no flags); `plain` (compressed propagation without compensation, uniform ranks: the default when
issue 6 set its 2.5x target); `propagate-original` (the same calibrated on the original model's activations).

    python tools/bench_speed.py                                    # SmolLM2, 64 x 512, every variant
    python tools/bench_speed.py --calib-samples 16 --layers 4      # a shorter look (the first 4 blocks)
    python tools/bench_speed.py --model DIR --calib-samples 8 --layers 2   # e.g. make_synthetic.py's 7B shapes

Calibration text: the CALIB_PLAYS (streamsvd.assets), as in bench_quality.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from streamsvd import assets  # noqa: E402  (first: it sets torch's allocator up before torch allocates)
import torch  # noqa: E402
from streamsvd.cli import main as streamsvd_main  # noqa: E402
from streamsvd.io.calibration import load_texts, load_tokenizer, sample_windows  # noqa: E402
from streamsvd.io.checkpoint import Checkpoint  # noqa: E402
from streamsvd.io.output import last_run  # noqa: E402
from streamsvd.model.architecture import decoder_layers, empty_model, load_config, load_layer  # noqa: E402
from streamsvd.model.capture import capture_layer_kwargs, first_layer_inputs, run_layer  # noqa: E402
from streamsvd.model.embedding import materialize_base_mapped  # noqa: E402

VARIANTS = {
    "default": [],
    # the default when issue 6 was written: compressed propagation, no compensation, uniform ranks (no profile)
    "plain": ["--no-compensate", "--calibrate", "block", "--anchor", "0", "--alloc", "uniform"],
    "propagate-original": ["--propagate", "original", "--no-compensate", "--calibrate", "block", "--anchor", "0",
                           "--alloc", "uniform"],
}
FORWARD_STAGES = ("statistics", "propagate", "refine")


@torch.no_grad()
def forward_floor(model_dir: Path, calib: Path, samples: int, seqlen: int, seed: int, batch: int) -> dict:
    """The windows through every original block once, hidden states in RAM: read / forward seconds."""
    started = time.perf_counter()
    ckpt = Checkpoint(model_dir)
    config = load_config(ckpt)
    text, _ = load_texts([str(calib)])
    windows = sample_windows(load_tokenizer(ckpt.dir), text, samples, seqlen, seed)
    model = empty_model(config, torch.float32)
    materialize_base_mapped(model, ckpt, torch.float32)
    layer_args = capture_layer_kwargs(model, windows[:1])
    hidden = [first_layer_inputs(model, windows[a:a + batch]) for a in range(0, samples, batch)]
    setup = time.perf_counter() - started
    read = forward = 0.0
    for index in range(len(decoder_layers(model))):
        t = time.perf_counter()
        layer = load_layer(model, index, ckpt, torch.float32)
        read += time.perf_counter() - t
        t = time.perf_counter()
        args, kwargs = layer_args[index]
        hidden = [run_layer(layer, h, args, kwargs) for h in hidden]
        forward += time.perf_counter() - t
        decoder_layers(model)[index] = torch.nn.Identity()  # one block in memory at a time, as the job
        del layer
    return {"row": "forward", "setup_s": round(setup, 2), "read_s": round(read, 2), "forward_s": round(forward, 2),
            "seconds": round(read + forward, 2), "batch": batch}


def run_variant(name: str, flags: list[str], model_dir: Path, calib: Path, args, work: Path) -> dict:
    out = work / f"out-{name}"
    shutil.rmtree(out, ignore_errors=True)
    argv = ["run", str(model_dir), str(out), "--ratio", str(args.ratio), "--max-mem", args.max_mem, "--calib", str(calib),
            "--calib-samples", str(args.calib_samples), "--seqlen", str(args.seqlen), "--no-progress", "--no-plots", *flags]
    started = time.perf_counter()
    code = streamsvd_main(argv)
    wall = time.perf_counter() - started
    if code != 0:
        sys.exit(f"streamsvd {' '.join(argv)} exited with {code}")
    run = last_run(out)
    stages, inside = run.get("seconds_by_stage", {}), run.get("seconds_in", {})
    accumulate, io = inside.get("accumulate", 0.0), inside.get("activation io", 0.0)
    in_forward_stages = sum(stages.get(s, 0.0) for s in FORWARD_STAGES)
    row = {"row": name, "flags": " ".join(flags) or "(defaults)", "seconds": round(wall, 2), "batch": run.get("batch_size"),
           "block_forward_s": round(in_forward_stages - accumulate - io, 2), "statistics_math_s": round(accumulate, 2),
           "factorize_s": round(stages.get("factorize", 0.0), 2), "activation_io_s": round(io, 2),
           "write_s": round(stages.get("write", 0.0), 2),
           "other_s": round(wall - in_forward_stages - stages.get("factorize", 0.0) - stages.get("write", 0.0), 2),
           "seconds_by_stage": stages, "seconds_in": inside, "peak_rss_bytes": run.get("peak_rss_bytes")}
    shutil.rmtree(out, ignore_errors=True)
    return row


def first_blocks_view(model: Path, layers: int, work: Path) -> Path:
    from bench_memory import first_blocks

    return first_blocks(model, layers, work / f"{model.name}-first-{layers}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2, gemma3, or a checkpoint directory")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--max-mem", default="8G")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=None, help="only the first N decoder blocks")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=sorted(VARIANTS))
    p.add_argument("--calib", type=Path, default=None, help="calibration text (default: the CALIB_PLAYS)")
    p.add_argument("--work", type=Path, default=Path("/tmp/streamsvd-bench-speed"))
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = {"smollm2": assets.smollm2_checkpoint, "gemma3": assets.gemma3_checkpoint}.get(args.model)
    model = model() if model else Path(args.model)
    if args.layers:
        model = first_blocks_view(model, args.layers, args.work)
    calib = args.calib or assets.shakespeare_text(assets.CALIB_PLAYS)
    rows = []
    for name in args.variants:
        rows.append(run_variant(name, VARIANTS[name], model, calib, args, args.work))
        print(json.dumps(rows[-1]), flush=True)
    batch = rows[0]["batch"] or 8
    floors = []
    for _ in range(2):
        floors.append(forward_floor(model, calib, args.calib_samples, args.seqlen, args.seed, batch))
        print(json.dumps(floors[-1]), flush=True)
    floor = min(f["seconds"] for f in floors)
    for row in rows:
        profile = row["seconds_by_stage"].get("profile", 0.0)  # a job's own profile (global allocation), 0 without
        print(json.dumps({"row": row["row"], "x_forward": round(row["seconds"] / floor, 2), "seconds": row["seconds"],
                          "profile_s": round(profile, 2), "x_forward_without_profile": round((row["seconds"] - profile) / floor, 2),
                          "forward_floor_s": floor, "model": str(model), "calib_samples": args.calib_samples,
                          "seqlen": args.seqlen, "ratio": args.ratio}), flush=True)


if __name__ == "__main__":
    main()
