#!/usr/bin/env python
"""ONNX Runtime forward latency of several exports of a model, interleaved (issue 9 item 6).

Each argument is a `streamsvd export onnx` folder (e.g. the original model and one compressed model
exported with each `--onnx-pivoted` form). All sessions live in one process and take turns, rep by
rep, for each workload, so machine noise hits them alike; medians in milliseconds per forward:

- decode: one new token per sequence on a random KV cache of --past tokens (batch 1 and 8);
- prefill: --prompt tokens per sequence on an empty cache (batch 1 and 8).

Prints one JSON line per workload: {"batch", "seq", "past", "<folder name>": ms, ...}.

    python tools/bench_onnx_forms.py ORIG_ONNX OUT_ROWS OUT_COLUMNS OUT_FOLDED --threads 2 --reps 25
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout


def _feeds(decoder, batch: int, seq: int, past: int, vocab: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {"input_ids": rng.integers(0, vocab, (batch, seq)).astype(np.int64),
             "attention_mask": np.ones((batch, past + seq), np.int64),
             "position_ids": np.broadcast_to(np.arange(past, past + seq), (batch, seq)).astype(np.int64)}
    for name, (kv, head_dim) in zip(decoder.past_names, decoder.past_dims):
        feeds[name] = rng.standard_normal((batch, kv, past, head_dim)).astype(np.float32)
    return feeds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("exports", nargs="+", help="`streamsvd export onnx` folders")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=25)
    p.add_argument("--past", type=int, default=128, help="cached tokens for the decode step")
    p.add_argument("--prompt", type=int, default=128, help="tokens per sequence for the prefill")
    args = p.parse_args()

    from streamsvd.export.onnx import OnnxDecoder  # the onnx extra

    decoders = {Path(e).name: OnnxDecoder(e, threads=args.threads) for e in args.exports}
    vocab = min(json.loads((Path(e) / "config.json").read_text()).get("vocab_size", 1000) for e in args.exports)
    sizes = {name: sum(f.stat().st_size for f in Path(e).iterdir() if f.name.startswith("model.onnx"))
             for name, e in zip(decoders, args.exports)}
    for batch, seq, past in [(1, 1, args.past), (8, 1, args.past), (1, args.prompt, 0), (8, args.prompt, 0)]:
        feeds = {name: _feeds(d, batch, seq, past, vocab, seed=batch + seq) for name, d in decoders.items()}
        for name, d in decoders.items():
            d.session.run(None, feeds[name])  # warm-up
        times = {name: [] for name in decoders}
        for _ in range(args.reps):
            for name, d in decoders.items():
                start = time.perf_counter()
                d.session.run(None, feeds[name])
                times[name].append(time.perf_counter() - start)
        row = {"batch": batch, "seq": seq, "past": past, "threads": args.threads, "reps": args.reps}
        row.update({name: round(1e3 * statistics.median(t), 2) for name, t in times.items()})
        row["bytes"] = sizes
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
