"""tools/bench_distributed.py: one job on 1 and 2 processes, each process's figures, and the byte comparison."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "bench_distributed.py"


def test_one_and_two_processes_give_rows_per_process_and_the_same_bytes(tiny_checkpoints, tmp_path):
    model = tiny_checkpoints("llama")
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(TOOL), "--model", str(model), "--calib", str(text), "--calib-samples", "8",
                           "--seqlen", "32", "--batch-size", "2", "--max-mem", "3G", "--work", str(tmp_path / "w")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["row"] for r in rows] == ["run", "run", "summary"]
    one, two, summary = rows
    assert (one["procs"], two["procs"]) == (1, 2) and one["blocks"] == 3
    assert [p["rank"] for p in one["processes"]] == [0] and [p["rank"] for p in two["processes"]] == [0, 1]
    assert [p["windows"] for p in two["processes"]] == [[0, 4], [4, 8]]
    assert two["identical_to"] == {"procs": 1, "identical": True, "differing": []}
    for p in two["processes"]:
        assert 0 < p["peak_rss_bytes"] < 3 << 30
        assert "profile" in p["stage_s"] and "factorize" in p["stage_s"]  # the default job profiles for itself
        assert p["reductions"] > 0 and p["reduced_bytes"] > 0 and p["reduce_s"] > 0
        assert p["reduced_bytes_per_block"] == round(p["reduced_bytes"] / 3)
        assert p["factor_bytes_sent"] > 0  # each process factored its share and sent it
    # both processes contribute the same statistics (the same shapes) to each reduction
    assert two["processes"][0]["reduced_bytes"] == two["processes"][1]["reduced_bytes"]
    assert one["processes"][0]["reduced_bytes"] == 0 and one["processes"][0]["reductions"] == 0
    assert set(summary["speedup_over_1"]) == {"2"} and summary["wall_s"]["1"] == one["wall_s"]
    assert not (tmp_path / "w" / "procs-2").exists()  # outputs removed unless --keep-outputs
