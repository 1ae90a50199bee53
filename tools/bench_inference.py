#!/usr/bin/env python
"""Inference speed and memory: original vs compressed models, prefill and decode (issue 9 item 6).

For each model directory (an original checkpoint or a streamsvd OUT_DIR) and each batch size, one
fresh subprocess loads the model (`streamsvd.load`: the stored factors, or the original layers),
then times, with the KV cache as generate() uses it:

- prefill: one forward over `--prompt` tokens per sequence (median of --reps), tokens/s = batch x prompt / s;
- decode: `--new` single-token forwards after that prefill, feeding the cache (greedy), tokens/s =
  batch x new / s (median of --reps runs);
- peak memory: the subprocess's peak RSS (ru_maxrss) after all of it, and the weights' bytes.

`--runtime onnx` times the same through onnxruntime on a `streamsvd export onnx` of each model
(exported once into --onnx-cache by a separate process, so the peak RSS is the runtime's alone),
when the onnx extra is installed.

Prints one JSON line per (model, runtime, batch). Take timings on an otherwise idle machine.

    python tools/bench_inference.py MODEL OUT_0.2 OUT_0.4 OUT_0.6 --batch 1 8 --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout


def _median_time(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_torch(path: str, batch: int, prompt: int, new: int, reps: int, threads: int) -> dict:
    import torch

    import streamsvd

    torch.set_num_threads(threads)
    model = streamsvd.load(path)
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    vocab = model.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, prompt), generator=gen)

    @torch.no_grad()
    def prefill():
        return model(input_ids=ids, use_cache=True)

    @torch.no_grad()
    def decode():
        out = model(input_ids=ids, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(new):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return time.perf_counter() - start

    t_prefill = _median_time(prefill, reps)
    decode()  # warm-up
    t_decode = statistics.median(decode() for _ in range(reps))
    return {"params": params, "weight_bytes": weight_bytes, "prefill_s": t_prefill, "prefill_tok_s": batch * prompt / t_prefill,
            "decode_s": t_decode, "decode_tok_s": batch * new / t_decode}


def measure_onnx(path: str, batch: int, prompt: int, new: int, reps: int, threads: int, cache_dir: Path) -> dict:
    import numpy as np

    from streamsvd.export.onnx import OnnxDecoder  # the onnx extra

    target = cache_dir / Path(path).name  # exported by the parent, so the peak RSS is the runtime's alone
    decoder = OnnxDecoder(target, threads=threads)
    vocab = json.loads((target / "config.json").read_text()).get("vocab_size", 1000)
    ids = np.random.default_rng(0).integers(0, vocab, (batch, prompt))
    positions = np.broadcast_to(np.arange(prompt), (batch, prompt))

    def prefill():
        return decoder.step(ids, np.ones((batch, prompt), dtype=np.int64), positions, decoder.empty_cache(batch))

    def decode():
        logits, cache = prefill()
        token = logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for i in range(new):
            total = prompt + i + 1
            logits, cache = decoder.step(token, np.ones((batch, total), dtype=np.int64), np.full((batch, 1), total - 1), cache)
            token = logits[:, -1:].argmax(-1)
        return time.perf_counter() - start

    t_prefill = _median_time(prefill, reps)
    decode()
    t_decode = statistics.median(decode() for _ in range(reps))
    onnx_bytes = sum(f.stat().st_size for f in target.iterdir() if f.name.startswith("model.onnx"))
    return {"onnx_bytes": onnx_bytes, "prefill_s": t_prefill, "prefill_tok_s": batch * prompt / t_prefill,
            "decode_s": t_decode, "decode_tok_s": batch * new / t_decode}


def _child(args) -> None:
    if args.runtime[0] == "torch":
        row = measure_torch(args.models[0], args.batch[0], args.prompt, args.new, args.reps, args.threads)
    else:
        row = measure_onnx(args.models[0], args.batch[0], args.prompt, args.new, args.reps, args.threads, Path(args.onnx_cache))
    row["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("ROW " + json.dumps(row))


def _describe(path: str) -> dict:
    config = json.loads((Path(path) / "config.json").read_text())
    section = config.get("streamsvd")
    return {"model": str(path), "compressed": section is not None,
            "ratio": section.get("ratio") if section else 0.0, "factors": section.get("factors") if section else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="checkpoint or OUT_DIR folders (the original first, by convention)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens per sequence")
    p.add_argument("--new", type=int, default=32, help="decoded tokens per sequence")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runtime", nargs="+", default=["torch"], choices=["torch", "onnx"])
    p.add_argument("--onnx-cache", default="/tmp/streamsvd-bench-onnx", help="where the ONNX exports are kept")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args)
        return
    Path(args.onnx_cache).mkdir(parents=True, exist_ok=True)
    for runtime in args.runtime:
        for model in args.models:
            target = Path(args.onnx_cache) / Path(model).name
            if runtime == "onnx" and not (target / "model.onnx").exists():
                subprocess.run([sys.executable, "-m", "streamsvd", "export", "onnx", model, str(target)], check=True,
                               stdout=subprocess.DEVNULL)
            for batch in args.batch:
                cmd = [sys.executable, __file__, model, "--child", "--runtime", runtime, "--batch", str(batch),
                       "--prompt", str(args.prompt), "--new", str(args.new), "--reps", str(args.reps),
                       "--threads", str(args.threads), "--onnx-cache", args.onnx_cache]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                line = next((l for l in proc.stdout.splitlines() if l.startswith("ROW ")), None)
                row = {**_describe(model), "runtime": runtime, "batch": batch, "prompt": args.prompt, "new": args.new,
                       "threads": args.threads}
                if line is None:
                    row["error"] = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                else:
                    row.update(json.loads(line[4:]))
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
