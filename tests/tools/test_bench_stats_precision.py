"""tools/bench_stats_precision.py: the statistics' product precision against float64, each loss measured from the factors."""

import json
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_stats_precision.py"


def test_synthetic_rows_show_float32_products_at_round_off_and_bfloat16_ones_far_from_it():
    run = subprocess.run([sys.executable, str(TOOL), "--synthetic", "64", "--tokens", "4096"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    assert [(r["shape"], r["side"]) for r in rows] == [([32, 64], "output"), ([128, 64], "input")]
    for r in rows:
        assert r["loss_f64"] > 0 and min(r["chunk_s_f64"], r["chunk_s_f32"], r["chunk_s_bf16"]) > 0
        # the job's float32 products: the factors' loss within 1e-5 of float64's
        assert abs(r["loss_increase_f32"]) < 1e-5 and r["gram_rel_f32"] < 1e-6
        # a bfloat16 product rounds each chunk's sum: on these ill-conditioned inputs it costs far more
        assert r["loss_increase_bf16"] > 100 * max(abs(r["loss_increase_f32"]), 1e-9)
        assert r["gram_rel_bf16"] > r["gram_rel_bf16in"] > r["gram_rel_f32"]
