"""tools/bench_sensitivity.py: per matrix type, the profile's two predictions beside the measured NLL increase."""

import json
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_sensitivity.py"
TYPES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _rows(model, text, work, ratio):
    done = subprocess.run([sys.executable, str(TOOL), "--model", str(model), "--calib", str(text), "--calib-samples", "6",
                           "--seqlen", "32", "--ratio", str(ratio), "--work", str(work)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return {r["type"]: r for r in map(json.loads, done.stdout.splitlines())}


def test_one_row_per_type_and_nothing_lost_at_nearly_full_rank(tiny_checkpoints, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    model = tiny_checkpoints("llama")
    cut = _rows(model, text, tmp_path / "work", 0.6)
    kept = _rows(model, text, tmp_path / "work", 0.02)  # the same profile, reused; ranks near full
    assert set(cut) == set(kept) == TYPES
    for kind in TYPES:
        assert cut[kind]["single_weight"] >= 0 and cut[kind]["token_weighted"] >= 0
        # truncating along the profile's own directions: next to nothing at nearly full rank, more at 0.6
        assert kept[kind]["token_weighted"] <= cut[kind]["token_weighted"]
        assert abs(kept[kind]["measured"]) < 0.05 * max(abs(cut[kind]["measured"]), 1e-3) + 1e-3
    assert sum(r["token_weighted"] for r in cut.values()) > 0
