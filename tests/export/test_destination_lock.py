"""One writer per destination: `quantize` NEW_DIR, `export dense` DIR and `export onnx` DIR are locked while written.

Two at once into one folder took each other's partial files: a second quantize saw the first's unfinished state as a
stopped quantize and removed the folder's files under it; a second dense export finished the first's shards as its own.
"""

import pytest

import streamsvd
from streamsvd.cli import main
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


def test_a_refused_command_leaves_no_folder_made_for_its_lock(out, tmp_path, capsys):
    dest = tmp_path / "a" / "b"
    assert main(["quantize", str(tmp_path / "missing"), str(dest), "--quant", "int8"]) == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert main(["export", "dense", str(out), str(out / "inside")]) == 2
    assert "is inside the streamsvd output" in capsys.readouterr().err and not (out / "inside").exists()
