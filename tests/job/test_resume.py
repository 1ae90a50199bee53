"""A killed or interrupted job resumes at the first unfinished block and ends byte-identical."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streamsvd.job.pipeline import JobConfig, run_job
from streamsvd.io.output import RUN_LOG
from streamsvd.job.state import STATE_NAME
from tiny_models import make_tiny_checkpoint

# Every output file's bytes must not depend on interruptions, the reports included; only the state
# file and the log of runs (wall time, peak RSS) differ.
VOLATILE = {RUN_LOG, STATE_NAME, "profile_log.json"}  # the profile's wall times vary too


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name not in VOLATILE}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("m") / "model", num_hidden_layers=5)


def _cfg(model_dir, out, **overrides):
    return JobConfig(**{**dict(model_dir=model_dir, out_dir=out, ratio=0.4, calib_samples=8, seqlen=40, progress=False), **overrides})


def _interrupt_after(block, cfg):
    """Run cfg as if Ctrl-C came right after `block` finished."""
    def stop(index):
        if index == block:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_job(cfg, on_block_done=stop)


def test_interrupted_job_resumes_byte_identical(model_dir, tmp_path):
    run_job(_cfg(model_dir, tmp_path / "straight"))
    out = tmp_path / "interrupted"
    _interrupt_after(2, _cfg(model_dir, out))
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


@pytest.mark.parametrize("propagate", ["compressed", "original"])
def test_lost_activation_files_are_rebuilt_from_finished_blocks(model_dir, tmp_path, propagate):
    """A cleaned scratch disk costs a replay of the finished blocks, not the job, and changes no byte."""
    run_job(_cfg(model_dir, tmp_path / "straight", propagate=propagate))
    out = tmp_path / "interrupted"
    _interrupt_after(2, _cfg(model_dir, out, propagate=propagate))
    shutil.rmtree(out / ".streamsvd-work")

    resumed_blocks = []
    run_job(_cfg(model_dir, out, propagate=propagate), on_block_done=resumed_blocks.append)
    assert resumed_blocks == [3, 4]
    assert _files(out) == _files(tmp_path / "straight")


def test_a_removed_finished_shard_is_redone(model_dir, tmp_path):
    run_job(_cfg(model_dir, tmp_path / "straight"))
    out = tmp_path / "interrupted"
    _interrupt_after(3, _cfg(model_dir, out))
    index = json.loads((tmp_path / "straight" / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.layers.2.mlp.down_proj.out_factor"]
    (out / shard).unlink()

    resumed_blocks = []
    run_job(_cfg(model_dir, out), on_block_done=resumed_blocks.append)
    assert resumed_blocks == [2, 3, 4]  # from the damaged block on, not from the start
    assert _files(out) == _files(tmp_path / "straight")


def test_work_dir_elsewhere_gives_the_same_output_and_leaves_other_files_alone(model_dir, tmp_path):
    run_job(_cfg(model_dir, tmp_path / "straight"))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "keep.txt").write_text("not streamsvd's")
    seen = []

    def look(index):
        seen.extend(p.name for p in scratch.rglob("acts-*.bin"))

    out = tmp_path / "out"
    run_job(_cfg(model_dir, out, work_dir=scratch), on_block_done=look)
    assert seen, "the activations were not kept under --work-dir"
    assert not (out / ".streamsvd-work").exists()
    assert sorted(p.name for p in scratch.iterdir()) == ["keep.txt"]
    assert _files(out) == _files(tmp_path / "straight")


def test_a_state_without_recorded_settings_still_resumes_and_a_mismatch_names_the_old_defaults(tmp_path):
    """States written before the state recorded the job's settings: same job resumes (and records them
    from then on); another job is refused with the flags of the pre-compensation defaults in the fix."""
    import json

    from streamsvd.errors import JobMismatch
    from streamsvd.job.pipeline import CompressionJob, JobConfig, run_job
    from streamsvd.job.state import STATE_NAME, JobState
    from tiny_models import make_tiny_checkpoint

    model = make_tiny_checkpoint("llama", tmp_path / "model", num_hidden_layers=2)
    out = tmp_path / "out"

    def cfg(**kw):
        return JobConfig(**{**dict(model_dir=model, out_dir=out, ratio=0.4, calib_samples=4, seqlen=16, progress=False), **kw})

    def stop(index):
        if index == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_job(cfg(), on_block_done=stop)
    path = out / STATE_NAME
    data = json.loads(path.read_text())
    assert data["settings"]["compensate"] is True and data["settings"]["ratio"] == 0.4
    del data["settings"]  # as an older streamsvd wrote it
    data["digest"] = JobState(**data).content_digest()
    path.write_text(json.dumps(data))
    with pytest.raises(JobMismatch) as e:
        CompressionJob(cfg(ratio=0.5))
    assert "--no-compensate --calibrate block --anchor 0" in e.value.fix
    run_job(cfg())  # the same job resumes
    assert json.loads(path.read_text())["settings"]["ratio"] == 0.4


@pytest.mark.parametrize("alloc", ["uniform", "global"])
def test_a_tokenizer_changed_before_the_resume_is_another_job(model_dir, tmp_path, alloc):
    """MODEL_DIR's tokenizer replaced between a kill and the resume: the same text gave other windows, the resumed
    job reused the activation files of the old ones, and the output (shipping the new tokenizer) was neither job's
    (a probe, 2026-12-07). The windows' digest is in the identity: refused, and --restart makes the new job's bytes.
    (With its own profile the profile's own check used to meet it first, with a fix for a given --profile.)"""
    from streamsvd.errors import JobMismatch
    from streamsvd.job.pipeline import CompressionJob
    from tiny_models import tiny_tokenizer

    model = Path(shutil.copytree(model_dir, tmp_path / "model"))
    out = tmp_path / "out"
    _interrupt_after(0, _cfg(model, out, alloc=alloc))
    tiny_tokenizer(add_bos=True).save_pretrained(model)  # the same vocabulary, a BOS before every window
    with pytest.raises(JobMismatch) as e:
        CompressionJob(_cfg(model, out, alloc=alloc))
    assert "another tokenizer" in e.value.problem and "another calibration text" not in e.value.problem
    assert "--restart" in e.value.fix
    run_job(_cfg(model, out, alloc=alloc, restart=True))
    run_job(_cfg(model, tmp_path / "straight", alloc=alloc))
    assert _files(out) == _files(tmp_path / "straight")


def test_a_state_recorded_before_the_windows_digest_resumes_under_its_own_fingerprint(model_dir, tmp_path):
    """The identity gained `windows_digest`: a job's state recorded before it (its fingerprint without the key) still
    resumes, byte for byte, and keeps its fingerprint; another job there is still refused."""
    from streamsvd.errors import JobMismatch
    from streamsvd.job.pipeline import CompressionJob
    from streamsvd.job.state import JobState, fingerprint

    out = tmp_path / "out"
    _interrupt_after(1, _cfg(model_dir, out))
    path = out / STATE_NAME
    data = json.loads(path.read_text())
    del data["settings"]["windows_digest"]  # as the state of a job started before the key was written
    data["fingerprint"] = fingerprint(data["settings"])
    data["digest"] = JobState(**data).content_digest()
    path.write_text(json.dumps(data))
    with pytest.raises(JobMismatch):
        CompressionJob(_cfg(model_dir, out, ratio=0.5))
    resumed = []
    run_job(_cfg(model_dir, out), on_block_done=resumed.append)
    assert resumed == [2, 3, 4]
    assert json.loads(path.read_text())["fingerprint"] == data["fingerprint"]
    run_job(_cfg(model_dir, tmp_path / "straight"))
    assert _files(out) == _files(tmp_path / "straight")


def test_a_resume_at_a_lower_budget_before_any_block_was_finished_plans_the_batch_again(model_dir, tmp_path, monkeypatch,
                                                                                         capsys):
    """No block was made with the killed run's batch, so a budget it does not fit gets its own batch (and the output of
    an uninterrupted run at that batch); it was refused as "kept so the output does not change". After a finished
    block the refusal stands (the batch's sums are in that block's bits)."""
    import streamsvd.faults as faults
    import streamsvd.job.pipeline as pipeline
    from streamsvd.errors import StreamSVDError

    run_job(_cfg(model_dir, tmp_path / "straight", alloc="uniform", batch_size=2))
    hits = []

    def kill_in_block_0(name):
        hits.append(name)
        if name == "activation-batch" and hits.count(name) == 2:
            raise KeyboardInterrupt

    out = tmp_path / "out"
    monkeypatch.setattr(faults, "point", kill_in_block_0)
    with pytest.raises(KeyboardInterrupt):
        run_job(_cfg(model_dir, out, alloc="uniform"))
    monkeypatch.undo()
    state = json.loads((out / STATE_NAME).read_text())
    assert state["blocks_done"] == 0 and state["batch_size"] == 8

    real = pipeline.build_plan

    def lower_budget(cfg, ckpt, fixed_batch=None, **kw):  # this budget's batch is 2, and 8 no longer fits it
        plan = real(cfg, ckpt, fixed_batch=2 if fixed_batch is None else fixed_batch, **kw)
        if fixed_batch == 8:
            plan.peak_bytes = plan.budget_bytes + 1
        return plan

    monkeypatch.setattr(pipeline, "build_plan", lower_budget)
    run_job(_cfg(model_dir, out, alloc="uniform"))
    assert "planning the batch again" in capsys.readouterr().err
    assert json.loads((out / STATE_NAME).read_text())["batch_size"] == 2
    assert _files(out) == _files(tmp_path / "straight")

    later = tmp_path / "later"  # killed after block 0: the batch is in its bits, so the refusal stands
    monkeypatch.setattr(pipeline, "build_plan", real)
    _interrupt_after(0, _cfg(model_dir, later, alloc="uniform"))
    monkeypatch.setattr(pipeline, "build_plan", lower_budget)
    with pytest.raises(StreamSVDError, match="too small for this interrupted job"):
        run_job(_cfg(model_dir, later, alloc="uniform"))


def test_sigterm_stops_the_job_as_ctrl_c_does_and_the_rerun_ends_byte_identical(model_dir, tmp_path):
    """SIGTERM (`kill`, a scheduler's stop) took Python's default action: the job died without a word, its lock and
    temporaries left to the next run. It now ends as Ctrl-C does: one line, exit 143, the finished blocks kept; a
    second SIGTERM still ends it at once."""
    run_job(_cfg(model_dir, tmp_path / "straight"))
    out = tmp_path / "terminated"
    script = ("import os, signal, sys\n"
              "import streamsvd.job.pipeline as p\n"
              "real = p.CompressionJob._compress_block\n"
              "def block(self, index):\n"
              "    if index == 2:\n"
              "        os.kill(os.getpid(), signal.SIGTERM)\n"
              "    return real(self, index)\n"
              "p.CompressionJob._compress_block = block\n"
              "from streamsvd.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    args = ["run", str(model_dir), str(out), "--ratio", "0.4", "--calib-samples", "8", "--seqlen", "40", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 143, done.stderr
    assert done.stderr.strip().splitlines()[-1] == ("stopped (SIGTERM): finished blocks are kept; run the same command "
                                                    "again to resume")
    assert "Traceback" not in done.stderr
    state = json.loads((out / STATE_NAME).read_text())
    assert state["blocks_done"] == 2 and not state["complete"]
    from streamsvd.cli import main

    before = signal.getsignal(signal.SIGTERM)
    assert main(args) == 0
    assert _files(out) == _files(tmp_path / "straight")
    assert signal.getsignal(signal.SIGTERM) is before  # main() in process gave the handler back
