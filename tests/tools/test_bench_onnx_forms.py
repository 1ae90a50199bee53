"""tools/bench_onnx_forms.py: one JSON line per workload, a positive time for every export, and their bytes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime", reason="the onnx extra is part of the test extra: pip install -e '.[test]'")

from streamsvd.cli import main  # noqa: E402

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_onnx_forms.py"


def test_every_export_is_timed_on_every_workload(tiny_checkpoints, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    out = tmp_path / "out"
    assert main(["run", str(tiny_checkpoints("llama")), str(out), "--ratio", "0.4", "--calib", str(text),
                 "--calib-samples", "4", "--seqlen", "32", "--no-progress", "--no-plots"]) == 0
    for form in ("rows", "columns"):
        assert main(["export", "onnx", str(out), str(tmp_path / form), "--onnx-pivoted", form]) == 0
    proc = subprocess.run([sys.executable, str(TOOL), str(tmp_path / "rows"), str(tmp_path / "columns"), "--reps", "2",
                           "--threads", "1", "--past", "5", "--prompt", "7"], capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["batch"], r["seq"], r["past"]) for r in rows] == [(1, 1, 5), (8, 1, 5), (1, 7, 0), (8, 7, 0)]
    for r in rows:
        assert r["rows"] > 0 and r["columns"] > 0
        assert r["bytes"]["rows"] == pytest.approx(r["bytes"]["columns"], rel=0.01)  # the same numbers, arranged
