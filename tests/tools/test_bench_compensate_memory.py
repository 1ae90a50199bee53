"""tools/bench_compensate_memory.py: one compensated linear's peak against what the plan counts for it."""

import json
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_compensate_memory.py"


def test_the_compensated_step_stays_within_the_plans_count():
    """A tall 4096 x 1024 linear (m x n float64 is 32 MiB, so the matrices, not the interpreter's noise, make
    the peak): the measured peak above the step's start is under the plan's count, and not far under it."""
    run = subprocess.run([sys.executable, str(TOOL), "--shape", "4096", "1024"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    row = json.loads(run.stdout.splitlines()[-1])
    assert (row["m"], row["n"]) == (4096, 1024) and row["error_is_finite"]
    assert "W C and W* held" in row["planned_step"]
    assert 8 * 4096 * 1024 < row["peak_above_start_bytes"] <= row["planned_bytes"]  # W C at least, within the plan
    assert row["planned_over_measured"] < 2.0
    assert set(row["peak_by_part_bytes"]) == {"wc", "factorize", "output error"}
