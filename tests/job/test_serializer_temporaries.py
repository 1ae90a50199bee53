"""A kill inside safetensors' save_file: its own `.tmpXXXXXX` (Rust's tempfile: `.tmp` and six letters or digits,
written beside the path it is given and renamed onto it at the end) stayed in OUT_DIR, the whole size of the shard,
after the resumed job finished; the same in OUT_DIR/spectra, a profile's folder and a dense export's folder.
Reproduced by SIGKILL of `streamsvd run` while `.tmpXXXXXX` was in OUT_DIR: the resume wrote the reference bytes
and kept the stray file beside them."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from streamsvd.cli import main
from streamsvd.io.fsutil import remove_temporaries
from streamsvd.io.output import RUN_LOG
from streamsvd.job.pipeline import JobConfig, run_job
from streamsvd.job.state import STATE_NAME
from tiny_models import make_tiny_checkpoint

FAST = ["--calib-samples", "4", "--seqlen", "32", "--no-progress"]


def files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in (RUN_LOG, STATE_NAME)}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("ser") / "model", num_hidden_layers=3)


@pytest.fixture(scope="module")
def straight(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "out"
    assert main(["run", str(model), str(out), *FAST, "--alloc", "uniform"]) == 0
    return out


def test_a_resumed_job_removes_what_a_kill_inside_save_file_left(model, straight, tmp_path):
    out = tmp_path / "out"
    config = JobConfig(model_dir=model, out_dir=out, ratio=0.4, calib_samples=4, seqlen=32, progress=False,
                       alloc="uniform")

    def stop(index):
        if index == 0:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run_job(config, on_block_done=stop)
    # what SIGKILL inside save_file leaves: safetensors' temporary, never renamed onto `.NAME.tmp-PID`
    (out / ".tmpQ3xZ9a").write_bytes(b"partial shard")
    (out / "spectra" / ".tmpR4yW0b").write_bytes(b"partial spectra")
    assert run_job(config)
    assert files(out) == files(straight)


def test_restart_removes_them_too(model, straight, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(straight, out)
    (out / ".tmpQ3xZ9a").write_bytes(b"partial shard")
    assert main(["run", str(model), str(out), *FAST, "--alloc", "uniform", "--restart"]) == 0
    assert files(out) == files(straight)


def test_remove_temporaries_takes_the_serializers_and_nothing_else(tmp_path):
    names = [".tmpQ3xZ9a", ".spectra.safetensors.tmp-123", ".index.json.tmp-9", ".tmpnotes.txt", ".tmp12345",
             "tmpQ3xZ9a", "keep.json", "a.tmp-1"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".folder.tmp-5").mkdir()
    removed = remove_temporaries(tmp_path, ["spectra.safetensors"])
    assert sorted(p.name for p in removed) == [".spectra.safetensors.tmp-123", ".tmpQ3xZ9a"]
    # without names: every `.NAME.tmp-PID` file, this process's own PID too (a reused PID's leftover); no folder
    (tmp_path / f".x.tmp-{os.getpid()}").write_bytes(b"x")
    removed = remove_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [".index.json.tmp-9", f".x.tmp-{os.getpid()}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".tmpnotes.txt", ".tmp12345", "tmpQ3xZ9a", "keep.json",
                                                                 "a.tmp-1", ".folder.tmp-5"])
    assert remove_temporaries(tmp_path / "missing") == []
