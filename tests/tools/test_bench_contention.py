"""tools/bench_contention.py: a job alone and beside a busy process, per OpenMP variant; nothing left running."""

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "bench_contention.py"


def _busy_loops() -> list[int]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if (p.info["cmdline"] or [])[-1:] == ["while True: pass"]:
            found.append(p.pid)
    return found


def test_every_condition_and_variant_is_a_row_and_the_busy_processes_are_gone(tiny_checkpoints, tmp_path):
    # one variant (a busy loop here also slows the suite's other worker): the default, whose environment must lose
    # the OMP_NUM_THREADS this worker runs with
    model = tiny_checkpoints("llama")
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    before = _busy_loops()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(TOOL), "--model", str(model), "--layers", "0", "--calib", str(text),
                           "--calib-samples", "4", "--seqlen", "32", "--variants", "default"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(r["row"], r["condition"], r["variant"]) for r in rows if r["row"] != "mean"] == [
        (kind, c, "default") for c in ("alone", "1 busy") for kind in ("eigh", "job")]
    unset = {k: v for k, v in env.items() if k != "OMP_NUM_THREADS"}
    own = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=unset,
                         capture_output=True, text=True, check=True)
    for r in rows:
        if r["row"] == "eigh":  # the default's environment: the worker's OMP_NUM_THREADS (tests/conftest.py) taken out
            assert r["threads"] == int(own.stdout.strip())
            assert 0 < r["best_s"] <= r["worst_s"]
        if r["row"] == "job":
            assert r["wall_s"] > 0 and {"statistics", "factorize"} <= set(r["seconds_by_stage"])
            assert r["threads"] == int(own.stdout.strip()) and 0 < r["cpu_seconds"] and 0 < r["seconds"] <= r["wall_s"]
    means = {(r["condition"], r["variant"]): r["wall_s"] for r in rows if r["row"] == "mean"}
    assert len(means) == 2 and all(w > 0 for w in means.values())
    assert _busy_loops() == before  # no busy loop outlives the tool
