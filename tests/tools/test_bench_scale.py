"""tools/bench_scale.py: a job block by block under a budget, its rows, and a stopped run that resumes."""

import json
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_scale.py"
PARTS = ("read_s", "forward_s", "statistics_s", "factorize_s", "activation_io_s", "write_s")


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True)


def test_a_stopped_run_resumes_and_every_block_is_a_row_under_the_budget(tiny_checkpoints, tmp_path):
    model = tiny_checkpoints("llama")
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    out = tmp_path / "scale"
    flags = ["--out", str(out), "--calib", str(text), "--calib-samples", "4", "--seqlen", "32", "--max-mem", "3G"]
    first = _bench(str(model), *flags, "--stop-after", "1")
    assert first.returncode == 0, first.stderr
    second = _bench(str(model), *flags)
    assert second.returncode == 0, second.stderr
    rows = [json.loads(line) for line in (tmp_path / "scale.bench.jsonl").read_text().splitlines()]
    # the log keeps both runs: setup, block 0, total (stopped); setup from block 1, blocks 1-2, total (finished)
    assert [r["row"] for r in rows] == ["setup", "block", "total", "setup", "block", "block", "total"]
    setups, blocks, totals = ([r for r in rows if r["row"] == kind] for kind in ("setup", "block", "total"))
    assert [s["starts_at_block"] for s in setups] == [0, 1] and setups[0]["layers"] == 3
    assert all(s["compensate"] is True for s in setups)  # streamsvd run's default
    assert [b["block"] for b in blocks] == [0, 1, 2]
    assert [t["finished"] for t in totals] == [False, True] and [t["blocks_this_run"] for t in totals] == [1, 2]
    budget = 3 << 30
    for s in setups:
        assert s["max_mem_bytes"] == budget and s["min_max_mem_bytes"] <= budget and s["weights_bytes"] > 0
    for b in blocks:
        assert all(b[k] >= 0 for k in PARTS) and b["factorize_s"] > 0 and b["forward_s"] > 0
        assert abs(sum(b[k] for k in PARTS) + b["other_s"] - b["seconds"]) < 0.05  # the parts add up to the wall time
        assert 0 < b["peak_rss_bytes"] <= budget and b["peak_over_budget"] == round(b["peak_rss_bytes"] / budget, 4)
        assert b["out_bytes"] > 0
    for t, run_blocks in zip(totals, (blocks[:1], blocks[1:])):
        for k in PARTS:  # a total is its own run's blocks, not the earlier run's
            assert abs(t[k] - sum(b[k] for b in run_blocks)) < 0.05
        assert t["peak_rss_bytes"] <= budget and t["largest_out_bytes"] >= max(b["out_bytes"] for b in run_blocks)
    assert 0.2 < totals[1]["bytes_ratio_linear"] < 0.6  # --ratio 0.4 (pivots and rounding aside)
    assert json.loads((out / "streamsvd_report.json").read_text())["ratio_requested"] == 0.4


def test_a_budget_below_the_plans_minimum_is_refused_with_the_jobs_own_lines(tiny_checkpoints, tmp_path):
    model = tiny_checkpoints("llama")
    proc = _bench(str(model), "--out", str(tmp_path / "scale"), "--calib-samples", "2", "--seqlen", "16", "--max-mem", "1M",
                  "--no-compensate")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and lines[1].strip().startswith("fix: ") and "Traceback" not in proc.stderr
    assert not (tmp_path / "scale").exists()  # refused before anything was written
