"""onnxruntime against PyTorch on a real model: the figures of docs/RESULTS.md's "ONNX check".

    python tools/onnx_check.py OUT_DIR ONNX_DIR [ONNX_DIR ...] --text held_out.txt --seqlen 128 --windows 4

For each export of OUT_DIR (made by `streamsvd export onnx`): the largest logit difference over
`--windows` windows of held-out text (prefill on an empty cache), the same after one cached decode
step, perplexity of those windows in both runtimes, and whether greedy generation from a prompt in
onnxruntime (feeding the cache back) gives generate()'s tokens. Prints one JSON line per export.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

import streamsvd  # noqa: E402
from streamsvd.export.onnx import OnnxDecoder  # noqa: E402
from streamsvd.io.calibration import load_texts, load_tokenizer  # noqa: E402
from streamsvd.job.evaluate import eval_windows  # noqa: E402


def nll(logits: np.ndarray, ids: torch.Tensor) -> float:
    return float(F.cross_entropy(torch.from_numpy(logits[:, :-1]).reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                 reduction="sum"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("onnx_dirs", nargs="+")
    p.add_argument("--text", required=True)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args()

    model = streamsvd.load(args.out_dir, dtype=torch.float32)
    tok = load_tokenizer(Path(args.out_dir))
    text, _ = load_texts([args.text])
    windows = eval_windows(tok, text, args.seqlen, args.windows)
    with torch.no_grad():
        ref = [model(w[None], use_cache=True) for w in windows]
        nxt = [r.logits[:, -1].argmax(-1, keepdim=True) for r in ref]
        ref_step = [model(n, cache=r.cache, use_cache=True).logits.numpy() for n, r in zip(nxt, ref)]
        prompt = tok(args.prompt, return_tensors="pt").input_ids
        model.generation_config.eos_token_id = None
        want = model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0).numpy()
    ref_logits = [r.logits.numpy() for r in ref]
    ref_nll = sum(nll(lg, w[None]) for lg, w in zip(ref_logits, windows))
    count = windows.shape[0] * (windows.shape[1] - 1)
    for onnx_dir in args.onnx_dirs:
        record = json.loads((Path(onnx_dir) / "streamsvd_onnx.json").read_text())
        session = OnnxDecoder(onnx_dir)
        prefill, step, total, agree = 0.0, 0.0, 0.0, []
        started = time.perf_counter()
        for w, want_logits, n, want_step in zip(windows, ref_logits, nxt, ref_step):
            L = w.shape[0]
            got, cache = session.step(w[None].numpy(), np.ones((1, L), np.int64), np.arange(L)[None], session.empty_cache(1))
            prefill = max(prefill, float(np.abs(got - want_logits).max()))
            agree.append(float((got.argmax(-1) == want_logits.argmax(-1)).mean()))
            total += nll(got, w[None])
            got_step, _ = session.step(n.numpy(), np.ones((1, L + 1), np.int64), np.full((1, 1), L), cache)
            step = max(step, float(np.abs(got_step - want_step).max()))
        seconds = time.perf_counter() - started
        got_gen = session.generate(prompt.numpy(), args.new_tokens)
        print(json.dumps({
            "onnx_dir": onnx_dir, "int4": record["int4"], "bytes": record["bytes"],
            "max_abs_logit": float(max(np.abs(lg).max() for lg in ref_logits)),
            "prefill_max_abs_diff": prefill, "decode_max_abs_diff": step, "argmax_agreement": float(np.mean(agree)),
            "ppl_torch": math.exp(ref_nll / count), "ppl_onnx": math.exp(total / count),
            "greedy_equal": bool((got_gen == want).all()),
            "greedy_first_diff": None if (got_gen == want).all() else int(np.argmax(got_gen[0] != want[0]) - prompt.shape[1]),
            "onnx_text": tok.decode(got_gen[0, prompt.shape[1]:]), "windows": int(windows.shape[0]), "seqlen": args.seqlen,
            "onnx_eval_seconds": round(seconds, 2),
        }), flush=True)


if __name__ == "__main__":
    main()
