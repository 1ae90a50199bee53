#!/usr/bin/env python
"""Turn bench_quality.py's JSON lines (stdin) into the markdown table kept in docs/RESULTS.md."""

import json
import sys


def main() -> None:
    rows = [json.loads(line) for line in sys.stdin if line.strip().startswith("{")]
    print("| method | calibration | ratio (linears) | ratio (whole model) | perplexity | x original | compress wall s | compress peak RSS GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["method"] == "original":
            print(f"| original | - | 0 | 0 | {r['ppl']:.2f} | 1.00 | - | - |")
            continue
        calib = "Shakespeare" if r["calib_text"] != "pydoc_data.topics" else "pydoc (default)"
        print(f"| {r['method']} | {calib} | {r['ratio_linear']:.3f} | {r['ratio_model']:.3f} | {r['ppl']:.2f} | "
              f"{r['ppl'] / r['ppl_before']:.2f} | {r['compress_wall_s']:.0f} | {r['compress_peak_rss_bytes'] / 2**30:.2f} |")


if __name__ == "__main__":
    main()
