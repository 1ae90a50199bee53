"""tools/bench_speed.py: the floor and every job variant timed in one process, with the job's own stage split."""

import json
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_speed.py"


def test_every_variant_is_timed_against_the_forward_floor(tiny_checkpoints, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    proc = subprocess.run([sys.executable, str(TOOL), "--model", str(tiny_checkpoints("llama")), "--calib", str(text),
                           "--calib-samples", "4", "--seqlen", "32", "--max-mem", "4G", "--work", str(tmp_path / "w")],
                          capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    jobs = {r["row"]: r for r in rows if "flags" in r}
    floors = [r for r in rows if r["row"] == "forward"]
    summary = {r["row"]: r for r in rows if "x_forward" in r}
    assert set(jobs) == set(summary) == {"default", "plain", "propagate-original"} and len(floors) == 2
    for name, job in jobs.items():
        stages = job["seconds_by_stage"]
        assert {"statistics", "factorize", "write"} <= set(stages) and all(v >= 0 for v in stages.values())
        assert job["block_forward_s"] > 0 and job["factorize_s"] > 0
        assert job["seconds_in"]["accumulate"] > 0 and job["seconds_in"]["activation io"] > 0
        assert 0 < sum(stages.values()) <= job["seconds"]  # the setup before the first stage is in neither
        floor = min(f["seconds"] for f in floors)
        assert summary[name]["x_forward"] == round(job["seconds"] / floor, 2)
        profile = job["seconds_by_stage"].get("profile", 0.0)
        assert summary[name]["x_forward_without_profile"] == round((job["seconds"] - profile) / floor, 2)
    assert jobs["default"]["seconds_by_stage"]["profile"] > 0  # global allocation profiles first
    assert "profile" not in jobs["plain"]["seconds_by_stage"]  # uniform ranks need no profile
    assert "propagate" in jobs["default"]["seconds_by_stage"]  # the compressed block's pass
    assert not list((tmp_path / "w").glob("out-*"))  # the outputs are removed after each row
