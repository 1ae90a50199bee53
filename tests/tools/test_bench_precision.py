"""tools/bench_precision.py: float32 against float64 factorisation, each loss measured from the factors."""

import json
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_precision.py"


def _rows(*flags):
    run = subprocess.run([sys.executable, str(TOOL), "--skip-real", "--large", "--shapes", "192x256", "256x128",
                          "--ratios", "0.2", "0.6", *flags], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return [json.loads(line) for line in run.stdout.splitlines()]


def test_rows_per_shape_ratio_and_route_within_the_tolerance():
    rows = _rows()
    # the wide 192 x 256 has its output side too; the tall one only the input side
    assert [(r["shape"], r["route"], r["ratio"]) for r in rows] == [
        ([192, 256], "input", 0.2), ([192, 256], "input", 0.6), ([192, 256], "output", 0.2), ([192, 256], "output", 0.6),
        ([256, 128], "input", 0.2), ([256, 128], "input", 0.6)]
    for r in rows:
        assert r["loss_f64"] > 0 and r["f64_s"] > 0 and r["f32_s"] > 0
        assert r["f32_kept"]  # these power laws drop enough energy for float32 (the rerun: tests/math/test_precision.py)
        assert -1e-9 <= r["loss_increase"] <= 1e-3


def test_device_rows_say_where_they_ran_and_a_gpu_is_checked_against_its_plan():
    import torch

    rows = _rows("--device", "cpu")
    assert {r["device"] for r in rows} == {"cpu"} and not any("gpu_peak_f64_bytes" in r for r in rows)
    run = subprocess.run([sys.executable, str(TOOL), "--skip-real", "--large", "--shapes", "192x256", "--ratios", "0.4",
                          "--device", "cuda"], capture_output=True, text=True)
    if not torch.cuda.is_available():
        assert run.returncode != 0 and run.stderr.startswith("error: --device cuda") and "fix:" in run.stderr
        return
    gpu = [json.loads(line) for line in run.stdout.splitlines()]
    assert {r["device"] for r in gpu} == {"cuda:0"}
    for r in gpu:
        assert r["gpu_peak_f64_bytes"] > 0 and -1e-9 <= r["loss_increase"] <= 1e-3
        if r["route"] == "input":  # the plan's count of this step holds what torch measured on the GPU
            assert r["gpu_peak_f64_bytes"] <= r["planned_bytes"]
