"""Nothing silently wrong (issue 10): locks, validated state, --restart, trusted scratch, checks before the
first write, verify and repair, identity by content. Fault injection is in test_fault_injection.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import streamsvd
from streamsvd.cli import main
from streamsvd.errors import StreamSVDError
from streamsvd.io.checkpoint import INDEX_NAME
from streamsvd.io.output import RUN_LOG
from streamsvd.job.lock import LOCK_NAME
from streamsvd.job.pipeline import JobConfig, run_job
from streamsvd.job.state import STATE_NAME, JobState
from tiny_models import make_tiny_checkpoint, record_edits

FAST = ["--calib-samples", "4", "--seqlen", "32", "--no-progress"]
VOLATILE = {RUN_LOG, STATE_NAME, "profile_log.json"}  # the profile's wall times vary too
CLI = [sys.executable, "-m", "streamsvd.cli"]


def files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name not in VOLATILE}


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("rel") / "model", num_hidden_layers=4)


@pytest.fixture(scope="module")
def straight(model, tmp_path_factory):
    """The uninterrupted run every other output is compared with."""
    out = tmp_path_factory.mktemp("straight") / "out"
    assert main(["run", str(model), str(out), *FAST]) == 0
    return out


def cfg(model, out, **kw):
    return JobConfig(**{**dict(model_dir=model, out_dir=out, ratio=0.4, calib_samples=4, seqlen=32, progress=False), **kw})


def interrupt_after(block, config):
    def stop(index):
        if index == block:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_job(config, on_block_done=stop)


def cli(argv) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:
        return e.code
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"`streamsvd {' '.join(map(str, argv))}` raised {type(e).__name__}: {e} (a traceback for the user)")


def clean_error(capsys, rc, *needles) -> str:
    captured = capsys.readouterr()
    assert rc == 2, captured.err
    assert "Traceback" not in captured.err
    assert captured.err.count("error: ") == 1, captured.err
    assert "fix: " in captured.err, captured.err
    assert "done:" not in captured.out
    for needle in needles:
        assert needle in captured.err, f"{needle!r} not in {captured.err}"
    return captured.err


def no_scratch(out: Path) -> None:
    assert not (out / ".streamsvd-work").exists()
    assert not (out / LOCK_NAME).exists()
    assert not list(out.rglob(".*.tmp-*"))


# ------------------------------------------------------------------------------------------ 1. locks
def _frozen_job(model, out, *extra):
    """A real `streamsvd run` that stops itself (SIGSTOP) after its first block's state is saved, holding its locks."""
    env = {**os.environ, "STREAMSVD_FAULT": "state-saved:2:stop"}
    proc = subprocess.Popen(CLI + ["run", str(model), str(out), *FAST, *extra], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        with open(f"/proc/{proc.pid}/stat") as f:
            if f.read().split(")")[-1].split()[0] == "T":
                return proc
        assert proc.poll() is None, "the job ended before it stopped itself"
        time.sleep(0.05)
    proc.kill()
    pytest.fail("the job never reached its stop point")


def test_second_run_into_the_same_out_dir_is_refused_naming_the_first(model, straight, tmp_path):
    out = tmp_path / "out"
    first = _frozen_job(model, out)
    try:
        second = subprocess.run(CLI + ["run", str(model), str(out), *FAST], capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert second.stderr.count("error: ") == 1 and "Traceback" not in second.stderr
        assert f"process {first.pid}" in second.stderr and "in use" in second.stderr and "fix:" in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The kernel dropped the dead process's lock: the rerun is not blocked by a stale lock and finishes the job.
    assert (out / LOCK_NAME).exists()
    done = subprocess.run(CLI + ["run", str(model), str(out), *FAST], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert files(out) == files(straight)
    no_scratch(out)


def test_two_out_dirs_sharing_a_work_dir_are_refused(model, tmp_path):
    scratch = tmp_path / "scratch"
    first = _frozen_job(model, tmp_path / "a", "--work-dir", scratch)
    try:
        second = subprocess.run(CLI + ["run", str(model), str(tmp_path / "b"), *FAST, "--work-dir", str(scratch)],
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert "--work-dir" in second.stderr and f"process {first.pid}" in second.stderr
        assert second.stderr.count("error: ") == 1 and "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert not (tmp_path / "b").exists()  # the OUT_DIR it made to lock was left behind, empty


def test_the_lock_is_released_when_the_job_ends(model, tmp_path):
    from streamsvd.job.lock import DirLock

    out = tmp_path / "out"
    run_job(cfg(model, out))
    no_scratch(out)
    lock = DirLock(out, "OUT_DIR").acquire()  # nobody holds it any more
    with pytest.raises(StreamSVDError, match=f"process {os.getpid()}"):
        DirLock(out, "OUT_DIR").acquire()  # a second holder is refused, even within one process
    lock.release()


def test_a_run_with_other_settings_into_a_running_jobs_out_dir_is_refused_by_its_lock_not_as_another_job(model, tmp_path,
                                                                                                      capsys):
    """The settings were compared before the lock: "holds a different streamsvd job ... add --restart", whose rerun
    only then met the lock of the job still running (a probe, 2026-12-07)."""
    from streamsvd.job.lock import DirLock

    out = tmp_path / "out"
    interrupt_after(0, cfg(model, out))
    running = DirLock(out, "OUT_DIR").acquire()  # that job, running again
    try:
        clean_error(capsys, cli(["run", model, out, *FAST, "--alloc", "uniform", "--ratio", "0.5"]),
                    f"OUT_DIR {out} is in use by another streamsvd job: process {os.getpid()}", "wait for that job")
    finally:
        running.release()
    clean_error(capsys, cli(["run", model, out, *FAST, "--alloc", "uniform", "--ratio", "0.5"]),
                "holds a different streamsvd job", "--restart")  # nobody runs there: the settings speak


# ------------------------------------------------------------------------------------------ 2. validated state
@pytest.fixture(scope="module")
def interrupted_base(model, tmp_path_factory):
    """OUT_DIR of a job interrupted after block 1 (made once; tests work on copies)."""
    out = tmp_path_factory.mktemp("interrupted") / "out"
    interrupt_after(1, cfg(model, out))
    return out


def _interrupted(base, out):
    shutil.copytree(base, out)
    return json.loads((out / STATE_NAME).read_text())


def _resign(state: dict) -> dict:
    """Recompute the state's own digest, so the schema (not the digest) has to catch the edit."""
    fields = {k: v for k, v in state.items() if k != "digest"}
    try:
        state["digest"] = JobState(**fields).content_digest()
    except TypeError:
        pass
    return state


def _module(state):
    return next(iter(state["modules"]))


CORRUPTIONS = {
    "truncated": lambda s, raw: raw[: len(raw) // 2],
    "empty": lambda s, raw: b"",
    "binary": lambda s, raw: b"\x00\xff\xfe" * 50,
    "not_an_object": lambda s, raw: b"[1, 2, 3]",
    "hand_edited_batch_size": lambda s, raw: {**s, "batch_size": 1},  # valid value, digest no longer matches
    "hand_edited_module": lambda s, raw: {**s, "modules": {**s["modules"], _module(s): {**s["modules"][_module(s)], "rank": 1}}},
    "unknown_key": lambda s, raw: _resign({**s, "resume_from": 0}),
    "missing_key": lambda s, raw: _resign({k: v for k, v in s.items() if k != "files"}),
    "blocks_done_string": lambda s, raw: _resign({**s, "blocks_done": "2"}),
    "blocks_done_float": lambda s, raw: _resign({**s, "blocks_done": 2.0}),
    "blocks_done_negative": lambda s, raw: _resign({**s, "blocks_done": -1}),
    "blocks_done_huge": lambda s, raw: _resign({**s, "blocks_done": 10**9}),
    "blocks_done_beyond_records": lambda s, raw: _resign({**s, "blocks_done": 3}),
    "blocks_done_bool": lambda s, raw: _resign({**s, "blocks_done": True}),
    "inputs_file_outside_work_dir": lambda s, raw: _resign({**s, "inputs_file": "../../etc/passwd"}),
    "inputs_file_absolute": lambda s, raw: _resign({**s, "inputs_file": "/tmp/acts-0.bin"}),
    "inputs_without_digest": lambda s, raw: _resign({**s, "inputs_digest": None}),
    "batch_size_zero": lambda s, raw: _resign({**s, "batch_size": 0}),
    "batch_size_beyond_samples": lambda s, raw: _resign({**s, "batch_size": 5}),
    "complete_not_bool": lambda s, raw: _resign({**s, "complete": "yes"}),
    "complete_but_unfinished": lambda s, raw: _resign({**s, "complete": True}),
    "fingerprint_not_hex": lambda s, raw: _resign({**s, "fingerprint": "x" * 64}),
    "modules_a_list": lambda s, raw: _resign({**s, "modules": []}),
    "module_rank_negative": lambda s, raw: _resign(
        {**s, "modules": {**s["modules"], _module(s): {**s["modules"][_module(s)], "rank": -3}}}),
    "module_outside_blocks": lambda s, raw: _resign({**s, "modules": {**s["modules"], "lm_head": s["modules"][_module(s)]}}),
    "file_record_outside_out_dir": lambda s, raw: _resign(
        {**s, "files": {**s["files"], "../elsewhere.safetensors": {"size": 1, "sha256": "0" * 64}}}),
    "weights_of_unfinished_block": lambda s, raw: _resign({**s, "weights": {**s["weights"], "3": "0" * 64}}),
    "model_file_record_malformed": lambda s, raw: _resign({**s, "model_files": {"a.safetensors": "big"}}),
    "digest_missing": lambda s, raw: {**s, "digest": None},
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_a_corrupted_state_file_is_refused_with_one_error_naming_restart(model, interrupted_base, tmp_path, capsys, case):
    out = tmp_path / "out"
    state = _interrupted(interrupted_base, out)
    raw = (out / STATE_NAME).read_bytes()
    bad = CORRUPTIONS[case](state, raw)
    (out / STATE_NAME).write_bytes(bad if isinstance(bad, bytes) else json.dumps(bad).encode())
    before = snapshot(out)
    rc = cli(["run", model, out, *FAST])
    clean_error(capsys, rc, str(out / STATE_NAME), "--restart")
    assert snapshot(out) == before  # refused before anything was written
    assert not (out / INDEX_NAME).exists()


def test_restart_after_a_refused_state_removes_only_streamsvd_files_and_ends_byte_identical(model, straight, interrupted_base,
                                                                                           tmp_path, capsys):
    out = tmp_path / "out"
    _interrupted(interrupted_base, out)
    (out / "notes.txt").write_text("mine")
    (out / STATE_NAME).write_text("{ not json")
    assert cli(["run", model, out, *FAST]) == 2
    capsys.readouterr()
    assert cli(["run", model, out, *FAST, "--restart"]) == 0
    err = capsys.readouterr().err
    assert "--restart removes" in err and STATE_NAME in err and "notes.txt" not in err
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    assert files(out) == files(straight)
    no_scratch(out)


def test_restart_of_another_jobs_out_dir(model, straight, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(["run", model, out, *FAST, "--ratio", "0.5"]) == 0
    assert cli(["run", model, out, *FAST]) == 2
    assert "--restart" in capsys.readouterr().err
    assert cli(["run", model, out, *FAST, "--restart"]) == 0
    assert files(out) == files(straight)


# ------------------------------------------------------------------------------------------ 3. scratch
def test_a_damaged_activation_file_is_not_trusted(model, straight, interrupted_base, tmp_path, capsys):
    out = tmp_path / "out"
    state = _interrupted(interrupted_base, out)
    acts = out / ".streamsvd-work" / state["inputs_file"]
    data = bytearray(acts.read_bytes())
    data[len(data) // 2 + 3] ^= 0x40  # same size, one flipped bit: the old size check trusted this
    acts.write_bytes(bytes(data))
    assert cli(["run", model, out, *FAST]) == 0
    assert "cannot be trusted" in capsys.readouterr().err
    assert files(out) == files(straight)


def test_a_kill_during_the_rebuild_of_lost_activations_leaves_nothing_trusted(model, straight, tmp_path):
    """The issue's case: killed while rebuilding, the next resume must not trust the half-rebuilt file."""
    out = tmp_path / "out"
    interrupt_after(2, cfg(model, out))
    shutil.rmtree(out / ".streamsvd-work")
    env = {**os.environ, "STREAMSVD_FAULT": "rebuild-block:2"}
    killed = subprocess.run(CLI + ["run", str(model), str(out), *FAST], env=env, capture_output=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    state = json.loads((out / STATE_NAME).read_text())
    assert state["inputs_file"] is None and state["blocks_done"] == 3  # the record was cleared before the overwrite
    done = subprocess.run(CLI + ["run", str(model), str(out), *FAST], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert files(out) == files(straight)
    no_scratch(out)


# ------------------------------------------------------------------------------------------ 4. before the first write
def _assert_rerun_works(model, out, straight, capsys, *extra):
    assert cli(["run", model, out, *FAST, *extra]) == 0, capsys.readouterr().err
    assert files(out) == files(straight)


def test_work_dir_that_is_a_file(model, straight, tmp_path, capsys):
    out, work = tmp_path / "out", tmp_path / "work"
    work.write_text("a file")
    clean_error(capsys, cli(["run", model, out, *FAST, "--work-dir", work]), "--work-dir", "is a file")
    assert not out.exists() and work.read_text() == "a file"
    _assert_rerun_works(model, out, straight, capsys, "--work-dir", tmp_path / "work2")


def test_out_dir_below_a_file(model, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    clean_error(capsys, cli(["run", model, tmp_path / "f" / "out", *FAST]), "is a file")


def test_read_only_filesystem(model, straight, tmp_path, capsys, monkeypatch):
    import streamsvd.job.preflight as preflight

    real = os.statvfs

    class ReadOnly:
        def __init__(self, st):
            self.f_flag = st.f_flag | os.ST_RDONLY

    monkeypatch.setattr(preflight.os, "statvfs", lambda p: ReadOnly(real(p)))
    out = tmp_path / "sub" / "out"
    clean_error(capsys, cli(["run", model, out, *FAST]), "read-only")
    assert not (tmp_path / "sub").exists()
    monkeypatch.undo()
    _assert_rerun_works(model, out, straight, capsys)


def test_no_write_permission(model, straight, tmp_path, capsys, monkeypatch):
    """As root, chmod does not stop writes, so the permission answer is injected; the check is what is tested."""
    import streamsvd.job.preflight as preflight

    parent = tmp_path / "locked"
    parent.mkdir()
    monkeypatch.setattr(preflight.os, "access", lambda p, mode: Path(p) != parent)
    clean_error(capsys, cli(["run", model, parent / "out", *FAST]), "no permission", str(parent))
    assert list(parent.iterdir()) == []
    monkeypatch.undo()
    _assert_rerun_works(model, parent / "out", straight, capsys)


def test_model_dir_that_is_a_streamsvd_output(straight, tmp_path, capsys):
    clean_error(capsys, cli(["run", straight, tmp_path / "again", *FAST]), "is a streamsvd output")
    assert not (tmp_path / "again").exists()


def test_out_dir_that_is_model_dir(model, capsys):
    before = snapshot(model)
    clean_error(capsys, cli(["run", model, model, *FAST]), "is MODEL_DIR")
    assert snapshot(model) == before


def test_an_output_without_its_state_needs_restart(model, straight, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(straight, out)
    (out / STATE_NAME).unlink()
    clean_error(capsys, cli(["run", model, out, *FAST]), "--restart")
    _assert_rerun_works(model, out, straight, capsys, "--restart")


def test_a_kill_before_the_state_exists_leaves_no_blocking_debris(model, straight, tmp_path):
    """Killed right after the lock was taken: OUT_DIR holds only the lock file; the rerun is not refused."""
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text('{"pid": 1}')
    (out / ".x.tmp-123").write_text("")
    assert run_job(cfg(model, out))
    assert files(out) == files(straight)


# ------------------------------------------------------------------------------------------ 5. verify and repair
def test_verify_a_finished_output(straight, capsys):
    assert cli(["verify", straight, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] and result["complete"] and result["damaged"] == []
    # every output file is recorded (the job's own profile, what its ranks came from, is an input in OUT_DIR/profile)
    assert result["files_checked"] == len([f for f in files(straight) if not f.startswith("profile/")])


def _copy_with_a_flipped_byte(output: Path, dest: Path) -> tuple[Path, Path]:
    """A copy of `output` with one bit of a shard's data flipped (its size and header intact): dest and that shard."""
    shutil.copytree(output, dest)
    shard = dest / "model-00002-of-00005.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x01
    shard.write_bytes(bytes(data))
    return dest, shard


def test_verify_imports_no_torch(straight, tmp_path):
    """`streamsvd verify` read headers through io/checkpoint (torch at import) and joined torchrun's world through
    job/distributed (torch again): 2 s before it checked anything, now about 0.2 s. A damaged copy is still found."""
    damaged, _ = _copy_with_a_flipped_byte(straight, tmp_path / "damaged")
    code = ("import sys\nfrom streamsvd.cli import main\nrc = main(sys.argv[1:])\n"
            "print(rc, sorted(m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules))")
    for where, expected in ((straight, "0 []"), (damaged, "2 []")):
        done = subprocess.run([sys.executable, "-c", code, "verify", str(where)], capture_output=True, text=True,
                              timeout=120)
        assert done.stdout.strip().splitlines()[-1] == expected, done.stdout[-500:] + done.stderr[-500:]
    assert "sha256 mismatch" in done.stdout and "error:" in done.stderr


@pytest.mark.parametrize("damage", ["truncate_shard", "remove_shard", "remove_spectra", "remove_index", "remove_tokenizer",
                                    "truncate_extra_shard", "remove_report"])
def test_run_on_a_damaged_finished_output_redoes_it(model, straight, tmp_path, capsys, damage):
    out = tmp_path / "out"
    shutil.copytree(straight, out)
    target = {
        "truncate_shard": "model-00003-of-00005.safetensors", "remove_shard": "model-00004-of-00005.safetensors",
        "remove_spectra": "spectra/block-00001.safetensors", "remove_index": INDEX_NAME,
        "remove_tokenizer": "tokenizer.json", "truncate_extra_shard": "model-00001-of-00005.safetensors",
        "remove_report": "streamsvd_report.md",
    }[damage]
    if damage.startswith("truncate"):
        os.truncate(out / target, 100)
    else:
        (out / target).unlink()
    assert cli(["verify", out]) == 2
    assert target in capsys.readouterr().out
    if damage == "remove_index":  # load's fix line fits an output: rerun, not re-download
        with pytest.raises(StreamSVDError) as info:
            streamsvd.load(out)
        assert "streamsvd run" in info.value.fix and "download" not in info.value.fix
    assert cli(["run", model, out, *FAST]) == 0
    captured = capsys.readouterr()
    assert "already complete" not in captured.out and "done:" in captured.out
    assert "damaged" in captured.err and target in captured.err
    assert files(out) == files(straight)
    assert cli(["verify", out]) == 0
    no_scratch(out)


def test_verify_finds_a_flipped_byte_that_the_cheap_check_cannot(model, straight, tmp_path, capsys):
    out, shard = _copy_with_a_flipped_byte(straight, tmp_path / "out")
    rc = cli(["verify", out])
    captured = capsys.readouterr()
    assert rc == 2 and "sha256 mismatch" in captured.out and shard.name in captured.out
    assert captured.err.count("error: ") == 1 and "streamsvd run" in captured.err
    # and the fix it names works: the rerun sees what verify saw (it said "already complete" and left the damage)
    assert cli(["run", model, out, *FAST]) == 0
    captured = capsys.readouterr()
    assert "already complete" not in captured.out and "damaged" in captured.err and shard.name in captured.err
    assert files(out) == files(straight)
    assert cli(["verify", out]) == 0


def test_load_eval_export_and_quantize_refuse_a_flipped_byte(straight, tmp_path, capsys):
    """They used such an output silently (only verify and a rerun checked the contents): a silently wrong model.
    --no-verify (verify=False) skips the sha256 and keeps the cheap check; an intact output passes both ways."""
    import streamsvd

    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question. " * 40)
    out = tmp_path / "out"
    shutil.copytree(straight, out)
    shard = out / "model-00002-of-00005.safetensors"
    flip_first_byte_of(shard, ".out_factor")  # a float's lowest mantissa bits: a slightly other model
    commands = [["eval", out, "--text", text, "--seqlen", "16", "--max-windows", "2", "--no-progress"],
                ["eval", out, "--text", text, "--seqlen", "16", "--max-windows", "2", "--no-progress", "--in-memory"],
                ["export", "dense", out, tmp_path / "dense"],
                ["quantize", out, tmp_path / "quant"]]
    for argv in commands:
        assert cli(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("error: ") == 1 and "sha256 mismatch" in err and shard.name in err and "streamsvd run" in err
    assert not (tmp_path / "dense").exists() and not (tmp_path / "quant").exists()
    with pytest.raises(StreamSVDError, match="damaged streamsvd output"):
        streamsvd.load(out)
    assert streamsvd.load(out, verify=False) is not None  # the caller's choice: sizes and headers only
    assert cli([*commands[0], "--no-verify"]) == 0
    capsys.readouterr()
    assert streamsvd.load(straight) is not None and cli(commands[0][:1] + [straight] + commands[0][2:]) == 0
    # pivots that are no permutation are refused even unverified (a RuntimeError from the forward, or a wrong model)
    shutil.copy(straight / shard.name, shard)
    flip_first_byte_of(shard, ".pivots", 0x40)
    with pytest.raises(StreamSVDError, match="not a permutation"):
        streamsvd.load(out, verify=False)
    assert cli([*commands[0], "--no-verify"]) == 2 and "not a permutation" in capsys.readouterr().err


def test_readers_refuse_an_output_without_its_state_and_wrong_kinds_of_tensor_unverified(straight, tmp_path, capsys):
    """Without its state an output was read unchecked (a flipped byte: another model, silently); with verify off a
    factor's header relabelled F32 -> I32 at the same size was cast into the model's floats, and a quantised output's
    bit width edited 8 -> 4 unpacked into other numbers (a probe, 2026-12-07)."""
    import streamsvd
    from streamsvd.io.checkpoint import read_safetensors_header

    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question. " * 40)
    stateless = tmp_path / "stateless"
    shutil.copytree(straight, stateless)
    (stateless / STATE_NAME).unlink()
    flip_first_byte_of(stateless / "model-00002-of-00005.safetensors", ".out_factor")
    evaluate = ["eval", stateless, "--text", text, "--seqlen", "16", "--max-windows", "2", "--no-progress"]
    for argv in (evaluate, [*evaluate, "--in-memory"], ["quantize", stateless, tmp_path / "q"]):
        assert cli(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("error: ") == 1 and f"without its {STATE_NAME}" in err and "--no-verify" in err
    with pytest.raises(StreamSVDError, match=f"without its {STATE_NAME}"):
        streamsvd.load(stateless)
    assert streamsvd.load(stateless, verify=False) is not None  # the caller's choice, said
    assert "read unchecked" in capsys.readouterr().err
    saved = tmp_path / "saved"  # save_pretrained of a loaded output (its factors fine-tuned, say): never had a state
    streamsvd.load(straight).save_pretrained(saved)
    assert streamsvd.load(saved) is not None and "unchecked" not in capsys.readouterr().err

    relabelled = tmp_path / "relabelled"
    shutil.copytree(straight, relabelled)
    shard = relabelled / "model-00002-of-00005.safetensors"
    raw = shard.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = raw[8:8 + size].decode()
    name = min(k for k in read_safetensors_header(shard) if k.endswith(".out_factor"))
    at = header.index(f'"{name}"')
    header = header[:at] + header[at:].replace('"F32"', '"I32"', 1)
    shard.write_bytes(raw[:8] + header.encode() + raw[8 + size:])
    with pytest.raises(StreamSVDError, match="not as floating-point numbers"):
        streamsvd.load(relabelled, verify=False)
    assert cli([*evaluate[:1], relabelled, *evaluate[2:], "--no-verify"]) == 2
    assert "not as floating-point numbers" in capsys.readouterr().err

    packed = tmp_path / "packed"
    assert cli(["quantize", straight, packed, "--quant", "int8", "--group-size", "16"]) == 0
    config = json.loads((packed / "config.json").read_text())
    config["streamsvd"]["quantization"]["num_bits"] = 4
    (packed / "config.json").write_text(json.dumps(config))
    record_edits(packed, "config.json")  # as if edited at the same size: the sha256 is what catches it verified
    with pytest.raises(StreamSVDError, match="do not hold"):
        streamsvd.load(packed, verify=False)


def flip_first_byte_of(shard: Path, suffix: str, bit: int = 0x01) -> None:
    """XOR `bit` into the first data byte of the shard's first tensor whose name ends with `suffix`."""
    from streamsvd.io.checkpoint import read_safetensors_header

    header = read_safetensors_header(shard)
    name = min(k for k in header if k.endswith(suffix))
    data = bytearray(shard.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little") + header[name]["data_offsets"][0]
    data[start] ^= bit
    shard.write_bytes(bytes(data))


def test_outputs_are_not_written_inside_the_output_they_read(straight, tmp_path, capsys):
    """quantize OUT OUT/sub copied OUT's folders into themselves (OUT/sub/sub/...); export dense OUT OUT/d was taken."""
    out = tmp_path / "out"
    shutil.copytree(straight, out)
    before = snapshot(out)
    for argv in (["quantize", out, out / "sub"], ["export", "dense", out, out / "d"]):
        assert cli(argv) == 2
        err = capsys.readouterr().err
        assert "inside the streamsvd output" in err and "fix:" in err
    assert snapshot(out) == before


def test_export_of_an_unfinished_job_says_unfinished(interrupted_base, tmp_path, capsys):
    """It said "not a streamsvd output" (config.json comes last), which sends the user the wrong way."""
    out = tmp_path / "out"
    shutil.copytree(interrupted_base, out)
    for argv in (["export", "dense", out, tmp_path / "d"], ["quantize", out, tmp_path / "q"]):
        assert cli(argv) == 2
        err = capsys.readouterr().err
        assert "unfinished" in err and "not a streamsvd output" not in err and "streamsvd run" in err


def test_resuming_a_profiled_job_with_alloc_uniform_is_refused_as_another_job(interrupted_base, model, tmp_path, capsys):
    """The job profiled for itself (--alloc global, the default); a resume with --alloc uniform is another job and is
    refused as one, not with an error about a --profile-samples the user never gave (the resume's recorded one)."""
    out = tmp_path / "out"
    shutil.copytree(interrupted_base, out)
    before = snapshot(out)
    err = clean_error(capsys, cli(["run", model, out, *FAST, "--alloc", "uniform"]), "holds a different streamsvd job",
                      "global")
    assert "--profile-samples" not in err
    assert snapshot(out) == before


def test_verify_fails_an_unfinished_job_whose_files_check_out(interrupted_base, tmp_path, capsys):
    """`streamsvd verify OUT && deploy` must not pass a killed job: its files are intact but most of the model is not
    there (exit 2, one error naming the resume), and --json says ok false with files_ok true."""
    out = tmp_path / "out"
    shutil.copytree(interrupted_base, out)
    err = clean_error(capsys, cli(["verify", out]), "unfinished job (2 blocks done)", "streamsvd run")
    assert "damaged" not in err
    assert cli(["verify", out, "--json"]) == 2
    result = json.loads(capsys.readouterr().out)
    assert result["files_ok"] and not result["complete"] and not result["ok"] and result["files_checked"] > 0


def test_verify_refuses_a_directory_without_a_job(model, capsys):
    clean_error(capsys, cli(["verify", model]), "no streamsvd job state")


def test_an_unfinished_job_never_has_an_index(model, tmp_path):
    """The state says complete before the index is written: a kill between leaves no index, never the reverse."""
    out = tmp_path / "out"
    env = {**os.environ, "STREAMSVD_FAULT": "finish-file:4"}
    killed = subprocess.run(CLI + ["run", str(model), str(out), *FAST], env=env, capture_output=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    assert not json.loads((out / STATE_NAME).read_text())["complete"] and not (out / INDEX_NAME).exists()


# ------------------------------------------------------------------------------------------ 6. identity by content
def _rewrite_shard(model: Path, tensor: str, change) -> None:
    index = json.loads((model / INDEX_NAME).read_text())
    shard = model / index["weight_map"][tensor]
    tensors = load_file(str(shard))
    change(tensors[tensor])
    size = shard.stat().st_size
    save_file(tensors, str(shard), metadata={"format": "pt"})
    assert shard.stat().st_size == size  # the old fingerprint (config + shard sizes) cannot see this


def test_a_resume_after_the_weights_changed_is_refused(model, tmp_path, capsys):
    m = Path(shutil.copytree(model, tmp_path / "model"))
    out = tmp_path / "out"
    interrupt_after(1, cfg(m, out))
    _rewrite_shard(m, "model.layers.0.mlp.down_proj.weight", lambda t: t.mul_(1.01))
    before = snapshot(out)
    clean_error(capsys, cli(["run", m, out, *FAST]), "changed since this job started", "block 0", "--restart")
    assert snapshot(out) == before


def test_a_resume_after_the_embeddings_changed_is_refused(model, tmp_path, capsys):
    """The extra shard is stream-copied rather than read as tensors; its digest must still be recorded."""
    m = Path(shutil.copytree(model, tmp_path / "model"))
    out = tmp_path / "out"
    interrupt_after(1, cfg(m, out))
    _rewrite_shard(m, "model.embed_tokens.weight", lambda t: t.mul_(1.01))
    before = snapshot(out)
    clean_error(capsys, cli(["run", m, out, *FAST]), "changed since this job started", "embeddings", "--restart")
    assert snapshot(out) == before


def test_a_touched_but_unchanged_checkpoint_resumes(model, straight, tmp_path):
    m = Path(shutil.copytree(model, tmp_path / "model"))
    out = tmp_path / "out"
    interrupt_after(1, cfg(m, out))
    _rewrite_shard(m, "model.layers.0.mlp.down_proj.weight", lambda t: None)  # same bytes, new mtime
    run_job(cfg(m, out, model_dir=m))
    assert {k: v for k, v in files(out).items() if not k.startswith("streamsvd_report")} == \
        {k: v for k, v in files(straight).items() if not k.startswith("streamsvd_report")}


def test_a_resume_on_other_weights_before_any_block_is_finished_profiles_again(model, tmp_path, capsys):
    """Killed after its own profile, before block 0 was finished: no block digest can tell other weights of the same
    shapes (a fine-tune) from a copy. The resume made the ranks from the old weights' profile (11 of 28 differed) and
    its block 0 inputs from the old embeddings; now both are made again, and the output is other weights' own."""
    other = make_tiny_checkpoint("llama", tmp_path / "other", seed=1, num_hidden_layers=4)
    straight_other = tmp_path / "straight-other"
    assert main(["run", str(other), str(straight_other), *FAST]) == 0
    out = tmp_path / "out"
    env = {**os.environ, "STREAMSVD_FAULT": "activation-batch:1"}
    killed = subprocess.run(CLI + ["run", str(model), str(out), *FAST], env=env, capture_output=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    state = json.loads((out / STATE_NAME).read_text())
    assert state["blocks_done"] == 0 and state["profile_digest"] and (out / "profile").is_dir()
    capsys.readouterr()
    assert main(["run", str(other), str(out), *FAST]) == 0
    assert "profiling again" in capsys.readouterr().err
    same = lambda d: {k: v for k, v in files(d).items() if not k.startswith("streamsvd_report")}  # noqa: E731
    assert same(out) == same(straight_other)


def test_a_resume_after_a_later_blocks_weights_changed_is_refused_at_that_block(model, tmp_path, capsys):
    """Killed after block 1 with its own profile; then block 3's weights changed (same shard sizes). The finished
    blocks' digests could not see it, and the job finished with block 3's ranks from the old weights' spectra. Now the
    block is refused against the profile's record of every tensor, before it is written; the blocks before it are kept."""
    m = Path(shutil.copytree(model, tmp_path / "model"))
    out = tmp_path / "out"
    interrupt_after(1, cfg(m, out))
    _rewrite_shard(m, "model.layers.3.self_attn.o_proj.weight", lambda t: t.mul_(1.01))
    clean_error(capsys, cli(["run", m, out, *FAST]), "block 3", "differ from those this job profiled", "o_proj", "--restart")
    state = json.loads((out / STATE_NAME).read_text())
    assert state["blocks_done"] == 3 and not state["complete"] and not (out / INDEX_NAME).exists()


def test_a_given_profile_of_other_weights_with_the_same_shapes_is_refused(model, tmp_path, capsys):
    """A fine-tune of the same shapes has the same checkpoint fingerprint (config and shard sizes), so its profile was
    taken: ranks from another model's spectra. Refused at the embeddings (before block 0), naming the profile."""
    other = make_tiny_checkpoint("llama", tmp_path / "other", seed=1, num_hidden_layers=4)
    prof = tmp_path / "prof"
    assert cli(["profile", other, prof, "--calib-samples", "4", "--seqlen", "32", "--no-progress"]) == 0
    out = tmp_path / "out"
    capsys.readouterr()
    clean_error(capsys, cli(["run", model, out, *FAST, "--profile", prof]), "the embeddings and head", str(prof),
                "streamsvd profile")
    assert not out.exists()  # before anything is written (it held a state, work files and a shard: a probe, 12-07)
    assert cli(["plan", model, *FAST, "--profile", prof]) == 0  # plan reads no weights: it cannot tell
    same = tmp_path / "prof-same"  # the same weights' own profile is taken
    assert cli(["profile", model, same, "--calib-samples", "4", "--seqlen", "32", "--no-progress"]) == 0
    assert cli(["run", model, tmp_path / "out2", *FAST, "--profile", same]) == 0


@pytest.mark.parametrize("tensor", ["model.embed_tokens.weight", "lm_head.weight"])
def test_a_given_profile_of_a_model_differing_only_outside_the_blocks_is_refused(model, tmp_path, capsys, tensor):
    """The embeddings (block 0's inputs) and the final norm and head (the sensitivity pass's) are measured by a
    profile too, but only the decoder blocks' digests were checked: the profile of a model differing only there (same
    shapes, same shard sizes) was taken, "profile reused", ranks from another model's measurements."""
    other = Path(shutil.copytree(model, tmp_path / "other"))
    _rewrite_shard(other, tensor, lambda t: t.mul_(2))
    prof = tmp_path / "prof"
    assert cli(["profile", other, prof, "--calib-samples", "4", "--seqlen", "32", "--no-progress"]) == 0
    out = tmp_path / "out"
    capsys.readouterr()
    clean_error(capsys, cli(["run", model, out, *FAST, "--profile", prof]), "the embeddings and head", tensor, str(prof),
                "streamsvd profile")
    assert not out.exists()


def test_a_given_profile_of_a_model_differing_in_a_later_block_is_refused_with_restart_in_the_fix(model, tmp_path, capsys):
    """Same embeddings, block 2 changed (a fine-tune that froze the rest): the job wrote blocks 0 and 1 before it saw
    it, and the fix's commands then met 'holds a different streamsvd job' in that OUT_DIR. The fix says --restart."""
    other = Path(shutil.copytree(model, tmp_path / "other"))
    _rewrite_shard(other, "model.layers.2.mlp.down_proj.weight", lambda t: t.mul_(3))
    prof = tmp_path / "prof"
    assert cli(["profile", other, prof, "--calib-samples", "4", "--seqlen", "32", "--no-progress"]) == 0
    out = tmp_path / "out"
    capsys.readouterr()
    clean_error(capsys, cli(["run", model, out, *FAST, "--profile", prof]), "block 2's weights", str(prof),
                "streamsvd profile", "add --restart")
    assert json.loads((out / STATE_NAME).read_text())["blocks_done"] == 2
    own = tmp_path / "own"
    assert cli(["profile", model, own, "--calib-samples", "4", "--seqlen", "32", "--no-progress"]) == 0
    assert cli(["run", model, out, *FAST, "--profile", own, "--restart"]) == 0  # what the fix says


def test_the_state_records_a_digest_of_every_finished_blocks_weights(model, interrupted_base, tmp_path):
    out = tmp_path / "out"
    state = _interrupted(interrupted_base, out)
    assert sorted(state["weights"]) == ["0", "1", "extra"]
    assert set(state["model_files"]) == {p.name for p in model.glob("*.safetensors")}


@pytest.mark.parametrize("stray", ["original weights", "junk"])
def test_a_model_safetensors_the_job_did_not_write_is_refused_by_every_reader(model, straight, tmp_path, capsys, stray):
    """The checkpoint reader (like transformers) reads model.safetensors in place of the index: a copy of the original
    weights beside an output was evaluated as the output (exactly the original's perplexity) and `verify` said ok;
    a junk one was a traceback (a probe, 2026-12-07)."""
    import torch

    out = Path(shutil.copytree(straight, tmp_path / "out"))
    if stray == "junk":
        save_file({"junk": torch.zeros(3)}, str(out / "model.safetensors"))
    else:
        weights = {}
        for shard in sorted(model.glob("*.safetensors")):
            weights.update(load_file(str(shard)))
        save_file(weights, str(out / "model.safetensors"))
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question. " * 200)
    assert cli(["verify", out]) == 2
    said = capsys.readouterr()
    assert "damaged: model.safetensors: not written by the job" in said.out, said.out
    assert f"fix: remove {out / 'model.safetensors'}" in said.err and "Traceback" not in said.err
    for argv in (["eval", out, "--text", text, "--seqlen", "32", "--max-windows", "4"],
                 ["eval", out, "--text", text, "--seqlen", "32", "--max-windows", "4", "--no-verify"],
                 ["export", "dense", out, tmp_path / "dense"]):
        err = clean_error(capsys, cli(argv), "model.safetensors", "not written by the job")
        assert f"fix: remove {out / 'model.safetensors'}" in err, err
    with pytest.raises(StreamSVDError, match="not written by the job"):
        streamsvd.load(out)
    (out / "model.safetensors").unlink()
    assert cli(["verify", out]) == 0  # what the fix says was all
