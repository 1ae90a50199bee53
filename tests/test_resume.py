"""A killed or interrupted job resumes at the first unfinished block and ends byte-identical."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streamsvd.pipeline import JobConfig, run_job
from streamsvd.state import STATE_NAME
from tiny_models import make_tiny_checkpoint

# Files whose bytes must not depend on interruptions (the report carries timings, so it is excluded).
VOLATILE = {"streamsvd_report.json", "streamsvd_report.md", STATE_NAME}


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name not in VOLATILE}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("m") / "model", num_hidden_layers=5)


def _cfg(model_dir, out):
    return JobConfig(model_dir=model_dir, out_dir=out, ratio=0.4, calib_samples=8, seqlen=40, progress=False)


def test_interrupted_job_resumes_byte_identical(model_dir, tmp_path):
    run_job(_cfg(model_dir, tmp_path / "straight"))

    def stop_after_block_2(index):
        if index == 2:
            raise KeyboardInterrupt

    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        run_job(_cfg(model_dir, out), on_block_done=stop_after_block_2)
    state = json.loads((out / STATE_NAME).read_text())
    assert state["blocks_done"] == 3 and not state["complete"]
    assert not (out / "model.safetensors.index.json").exists()

    resumed_blocks = []
    run_job(_cfg(model_dir, out), on_block_done=resumed_blocks.append)
    assert resumed_blocks == [3, 4]  # did not start over
    assert _files(out) == _files(tmp_path / "straight")


def test_rerunning_a_finished_job_does_nothing(model_dir, tmp_path):
    out = tmp_path / "out"
    first = run_job(_cfg(model_dir, out))
    blocks = []
    again = run_job(_cfg(model_dir, out), on_block_done=blocks.append)
    assert blocks == [] and again == first


def test_sigkill_mid_job_then_resume_is_byte_identical(tmp_path):
    model = make_tiny_checkpoint("llama", tmp_path / "model", num_hidden_layers=12, hidden_size=128, intermediate_size=352)
    args = [str(model), "--calib-samples", "24", "--seqlen", "128", "--no-progress"]
    cli = [sys.executable, "-m", "streamsvd.cli", "run"]
    subprocess.run(cli + [str(model), str(tmp_path / "straight")] + args[1:], check=True, capture_output=True)

    out = tmp_path / "killed"
    proc = subprocess.Popen(cli + [str(model), str(out)] + args[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state_file = out / STATE_NAME
    deadline = time.time() + 120
    blocks_done = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            blocks_done = json.loads(state_file.read_text())["blocks_done"]
        except (OSError, ValueError):
            blocks_done = 0
        if blocks_done >= 2:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the job finished before it could be killed; make it slower"
    assert not (out / "model.safetensors.index.json").exists()

    done = subprocess.run(cli + [str(model), str(out)] + args[1:], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert _files(out) == _files(tmp_path / "straight")
