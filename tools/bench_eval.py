"""Streaming vs in-memory `streamsvd eval`: the same perplexity, with peak RSS and wall time.

    python tools/bench_eval.py [--model smollm2|gemma3|DIR] [--windows 20] [--seqlen 512] [--max-mem 2G]

Each path runs in its own process (peak RSS from getrusage). Held-out text: the four tragedies of
assets.EVAL_PLAYS, never calibration text. Prints one JSON line per path.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from streamsvd import assets  # noqa: E402

CHILD = r"""
import json, sys
from streamsvd.cli import main
from streamsvd.job.memory import parse_size
argv = json.loads(sys.argv[1])
import io, contextlib
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    rc = main(argv)
res = json.loads(buf.getvalue())
from streamsvd.job.peak import high_water_bytes
res["peak_rss_bytes"] = high_water_bytes()
print(json.dumps(res))
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--max-mem", default="2G")
    args = ap.parse_args()
    model = {"smollm2": assets.smollm2_checkpoint, "gemma3": assets.gemma3_checkpoint}.get(args.model, lambda: Path(args.model))()
    text = assets.shakespeare_text(assets.EVAL_PLAYS)
    base = ["eval", str(model), "--text", str(text), "--seqlen", str(args.seqlen), "--max-windows", str(args.windows),
            "--json", "--no-progress"]
    rows = []
    for path, extra in (("in-memory", ["--in-memory"]), ("streaming", ["--max-mem", args.max_mem])):
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(base + extra)], capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row.update(path=path, model=args.model, command="streamsvd " + " ".join(base + extra))
        rows.append(row)
        print(json.dumps(row), flush=True)
    rel = abs(rows[1]["perplexity"] - rows[0]["perplexity"]) / rows[0]["perplexity"]
    print(json.dumps({"model": args.model, "relative_difference": rel, "rss_ratio": rows[1]["peak_rss_bytes"] / rows[0]["peak_rss_bytes"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
