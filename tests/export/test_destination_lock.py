"""One writer per destination: `quantize` NEW_DIR, `export dense` DIR and `export onnx` DIR are locked while written.

Two at once into one folder took each other's partial files: a second quantize saw the first's unfinished state as a
stopped quantize and removed the folder's files under it; a second dense export finished the first's shards as its own.
And no reader of an output (quantize, export, eval, verify, streamsvd.load) overlaps a `run` rewriting it: an export or
quantize during `run --restart` wrote a silent mix of both jobs' shards, eval gave a mixed model's figure.
"""

import os
import shutil
from pathlib import Path

import pytest

import streamsvd
from streamsvd.cli import main
from streamsvd.errors import StreamSVDError
from streamsvd.io.calibration import default_text
from streamsvd.job.lock import LOCK_NAME, DirLock
from streamsvd.job.pipeline import JobConfig, run_job
from tiny_models import make_tiny_checkpoint

COMMANDS = {
    "quantize": (["quantize", "{out}", "{dest}", "--quant", "int8"], "NEW_DIR"),
    "dense": (["export", "dense", "{out}", "{dest}"], "DIR"),
    "onnx": (["export", "onnx", "{out}", "{dest}", "--no-check"], "DIR"),
}


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("locked")
    model = make_tiny_checkpoint("llama", tmp / "model", num_hidden_layers=2)
    run_job(JobConfig(model_dir=model, out_dir=tmp / "out", ratio=0.4, calib_samples=4, seqlen=32, alloc="uniform",
                      progress=False))
    return tmp / "out"


def _args(command, out, dest):
    args, what = COMMANDS[command]
    return [a.format(out=out, dest=dest) for a in args], what


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_second_writer_into_a_locked_destination_is_refused(command, out, tmp_path, capsys):
    if command == "onnx":
        pytest.importorskip("onnxruntime", reason="the onnx extra is part of the test extra: pip install -e '.[test]'")
    dest = tmp_path / "dest"
    dest.mkdir()
    held = DirLock(dest, "DIR").acquire()  # another command writing there (the lock is per open file)
    try:
        args, what = _args(command, out, dest)
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"{what} {dest} is in use by another streamsvd job" in err and f"choose another {what}" in err
        assert "Traceback" not in err and [p.name for p in dest.iterdir()] == [LOCK_NAME]
    finally:
        held.release()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_lock_file_a_killed_command_left_is_taken_and_gone_at_the_end(command, out, tmp_path, capsys):
    """A SIGKILL leaves the lock file (the kernel drops the lock itself): a DIR holding only it is as good as empty,
    and the file is not recorded among NEW_DIR's files (it is gone once the command ends)."""
    if command == "onnx":
        pytest.importorskip("onnxruntime", reason="the onnx extra is part of the test extra: pip install -e '.[test]'")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / LOCK_NAME).write_text('{"pid": 4194999}\n')
    args, _ = _args(command, out, dest)
    assert main(args) == 0, capsys.readouterr().err
    assert not (dest / LOCK_NAME).exists()
    if command == "quantize":
        streamsvd.load(dest)  # its files checked against the sha256 its state recorded


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_destination_that_cannot_be_made_is_one_error_before_any_work(command, out, capsys, monkeypatch):
    """Under /proc (or on a read-only file system) NEW_DIR / DIR could not be made: a FileNotFoundError traceback, for
    `export onnx` after the whole export (a probe, 2026-12-07)."""
    import torch

    if not Path("/proc/self").is_dir():
        pytest.skip("needs /proc (a folder no file or folder can be made in)")
    if command == "onnx":
        pytest.importorskip("onnxruntime", reason="the onnx extra is part of the test extra: pip install -e '.[test]'")
        monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: pytest.fail("exported before refusing DIR"))
    args, what = _args(command, out, "/proc/streamsvd-nope/x")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"error: {what} /proc/streamsvd-nope/x cannot be made" in err and "fix:" in err and "Traceback" not in err, err


def test_a_refused_command_leaves_no_folder_made_for_its_lock(out, tmp_path, capsys):
    dest = tmp_path / "a" / "b"
    assert main(["quantize", str(tmp_path / "missing"), str(dest), "--quant", "int8"]) == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert main(["export", "dense", str(out), str(out / "inside")]) == 2
    assert "is inside the streamsvd output" in capsys.readouterr().err and not (out / "inside").exists()


READERS = {
    "quantize": ["quantize", "{out}", "{dest}", "--quant", "int8"],
    "dense": ["export", "dense", "{out}", "{dest}"],
    "onnx": ["export", "onnx", "{out}", "{dest}", "--no-check"],
    "eval": ["eval", "{out}", "--text", "{text}", "--seqlen", "32", "--max-windows", "2"],
    "eval-in-memory": ["eval", "{out}", "--text", "{text}", "--seqlen", "32", "--max-windows", "2", "--in-memory"],
    "verify": ["verify", "{out}"],
}


@pytest.mark.parametrize("reader", sorted(READERS))
def test_a_reader_of_an_output_a_run_is_writing_is_refused(reader, out, tmp_path, capsys):
    from streamsvd.job.lock import JobLocks

    if reader == "onnx":
        pytest.importorskip("onnxruntime", reason="the onnx extra is part of the test extra: pip install -e '.[test]'")
    writing = JobLocks()
    writing.take(out, "OUT_DIR")
    writing.take_folder(out, "OUT_DIR")  # what `run` holds while it writes OUT_DIR
    try:
        (tmp_path / "text.txt").write_text(default_text()[:20_000])
        args = [a.format(out=out, dest=tmp_path / "dest", text=tmp_path / "text.txt") for a in READERS[reader]]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"{out} is being written by a streamsvd job: process" in err and "wait for that job to finish" in err
        assert "Traceback" not in err and not (tmp_path / "dest").exists()
        with pytest.raises(StreamSVDError, match="being written by a streamsvd job"):
            streamsvd.load(out)
    finally:
        writing.release()
    assert main(args) == 0, capsys.readouterr().err  # once the run has ended


def test_a_run_into_an_output_being_read_is_refused(out, tmp_path, capsys):
    from streamsvd.job.lock import reading_output

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    model = out.parent / "model"
    args = ["run", str(model), str(copy), "--ratio", "0.4", "--calib-samples", "4", "--seqlen", "32", "--alloc", "uniform",
            "--no-progress", "--restart"]
    before = {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()}
    with reading_output(copy), reading_output(copy):  # two readers at once are fine
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "is being read by another streamsvd command" in err and "Traceback" not in err
        if Path("/proc/locks").exists():  # the reader is named (it was not): here this very process
            assert f"process {os.getpid()} (" in err, err
    assert {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()} == before  # nothing was touched
    assert main(args) == 0
