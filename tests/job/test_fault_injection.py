"""Fault injection as a test, not a claim (issue 10).

A real `streamsvd run` subprocess SIGKILLs itself at a named fault point (`streamsvd.faults`,
STREAMSVD_FAULT=NAME:N) chosen from a seeded random schedule: mid-activation file, after a shard,
after a state save, during the rebuild of lost activations, between the final writes, after the
index. After each kill the schedule either leaves OUT_DIR alone or damages a scratch or state file
(lost work folder, a flipped bit in the trusted activation file, a removed finished shard, a
truncated or hand-edited state), then reruns. Every run must end in one of two ways: a finished
output byte-identical to an uninterrupted run (reports included; only the state file and the run log
differ) with no scratch left behind, or a refusal with exactly one `error:` line (then the schedule
goes on with --restart). Invariants checked after every kill: an index exists only when the state
says complete, and the state file always passes its schema unless the schedule damaged it.

Bounded for CI: a tiny model, 8 kills (about 20 subprocess runs; 6 minutes on the 2 shared, heavily loaded
development cores, where a plain tiny run takes 10-15 s).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from streamsvd.io.calibration import default_text
from streamsvd.io.checkpoint import INDEX_NAME
from streamsvd.io.output import RUN_LOG
from streamsvd.job.lock import LOCK_NAME
from streamsvd.job.pipeline import JobConfig, run_job
from streamsvd.job.state import STATE_NAME, read_state
from tiny_models import make_tiny_checkpoint

SEED = 20261124
KILLS = 8
FLAGS = ["--calib-samples", "4", "--seqlen", "32", "--no-progress"]  # + --calib, a short text (tokenized in each process)
CLI = [sys.executable, "-m", "streamsvd.cli", "run"]
# (fault point, highest hit worth trying) for a 4-block job; a hit that is never reached lets the run finish.
POINTS = [
    ("activation-batch", 6),
    ("shard-written", 9),
    ("state-saved", 8),
    ("rebuild-block", 4),
    ("original-inputs-read", 12),  # compensation's later passes (o, gate/up, down) of 4 blocks
    ("finish-file", 6),
    ("index-written", 1),
    ("profile-block", 8),  # the default job's own profile first: its backward walk, then its statistics pass, per block
]
DAMAGES = ["none", "none", "remove_work", "flip_activation", "remove_finished_shard", "truncate_state", "edit_state"]
VOLATILE = {RUN_LOG, STATE_NAME, "profile_log.json"}  # the profile's wall times vary too


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name not in VOLATILE}


def _damage(kind: str, out: Path, rng: random.Random) -> bool:
    """Apply one damage; True if it was applied (some need a file that is not there)."""
    state_path = out / STATE_NAME
    if kind == "remove_work":
        if (out / ".streamsvd-work").is_dir():
            shutil.rmtree(out / ".streamsvd-work")
            return True
    elif kind == "flip_activation":
        state = json.loads(state_path.read_text())
        acts = out / ".streamsvd-work" / (state.get("inputs_file") or "-")
        if acts.is_file() and acts.stat().st_size:
            data = bytearray(acts.read_bytes())
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            acts.write_bytes(bytes(data))
            return True
    elif kind == "remove_finished_shard":
        state = json.loads(state_path.read_text())
        if state["blocks_done"]:
            block = rng.randrange(state["blocks_done"])
            (out / f"model-{block + 2:05d}-of-00005.safetensors").unlink(missing_ok=True)
            return True
    elif kind == "truncate_state":
        raw = state_path.read_bytes()
        state_path.write_bytes(raw[: rng.randrange(len(raw))])
        return True
    elif kind == "edit_state":
        state = json.loads(state_path.read_text())
        state["batch_size"] = 1 if state["batch_size"] != 1 else 2
        state_path.write_text(json.dumps(state))
        return True
    return False


def test_random_kills_and_damage_end_byte_identical_or_refused(tmp_path):
    model = make_tiny_checkpoint("llama", tmp_path / "model", num_hidden_layers=4)
    calib = tmp_path / "calib.txt"  # every run is a new process: the built-in text cost each a second to tokenize
    calib.write_text(default_text()[:40_000])
    flags = FLAGS + ["--calib", str(calib)]
    straight = tmp_path / "straight"
    run_job(JobConfig(model_dir=model, out_dir=straight, ratio=0.4, calib=[str(calib)], calib_samples=4, seqlen=32,
                      progress=False))
    expected = _files(straight)

    rng = random.Random(SEED)
    log: list[str] = []
    outputs, kills, completed, refused = 0, 0, 0, 0
    out = tmp_path / f"out{outputs}"
    restart = state_damaged = False

    def finished_ok(where: Path) -> None:
        assert _files(where) == expected, f"output differs from an uninterrupted run after: {log}"
        assert not (where / ".streamsvd-work").exists() and not (where / LOCK_NAME).exists(), log
        assert not list(where.rglob(".*.tmp-*")), f"scratch left behind after: {log}"

    while kills < KILLS:
        name, top = rng.choice(POINTS)
        fault = f"{name}:{rng.randint(1, top)}"
        args = CLI + [str(model), str(out)] + flags + (["--restart"] if restart else [])
        proc = subprocess.run(args, env={**os.environ, "STREAMSVD_FAULT": fault}, capture_output=True, text=True, timeout=300)
        log.append(f"{fault}{' --restart' if restart else ''} -> {proc.returncode}")
        restart = False
        if proc.returncode == -signal.SIGKILL:
            kills += 1
            if (out / STATE_NAME).exists():
                state = read_state(out)  # an atomic state file always passes its schema after a kill
                assert state.complete or not (out / INDEX_NAME).exists(), f"an unfinished job has an index: {log}"
                damage = rng.choice(DAMAGES)
                if _damage(damage, out, rng):
                    log.append(damage)
                    state_damaged = state_damaged or damage in ("truncate_state", "edit_state")
            else:
                assert not (out / INDEX_NAME).exists()
        elif proc.returncode == 0:
            completed += 1
            state_damaged = False
            finished_ok(out)
            outputs += 1
            out = tmp_path / f"out{outputs}"
        elif proc.returncode == 2:
            refused += 1
            assert proc.stderr.count("error: ") == 1 and "Traceback" not in proc.stderr, proc.stderr
            assert state_damaged, f"refused without a damaged state: {proc.stderr} {log}"
            assert "--restart" in proc.stderr
            restart = True
        else:
            pytest.fail(f"unexpected exit {proc.returncode}: {proc.stderr[-2000:]} after {log}")

    # However the last kill left it, a plain rerun (with --restart after a refusal) finishes it byte-identical.
    for _ in range(2):
        proc = subprocess.run(CLI + [str(model), str(out)] + flags + (["--restart"] if restart else []),
                              capture_output=True, text=True, timeout=300)
        log.append(f"final{' --restart' if restart else ''} -> {proc.returncode}")
        if proc.returncode == 2 and not restart:
            assert proc.stderr.count("error: ") == 1 and "--restart" in proc.stderr, proc.stderr
            restart = True
            continue
        assert proc.returncode == 0, f"{proc.stderr[-2000:]} after {log}"
        break
    finished_ok(out)
    print("\n".join(log))
    assert kills == KILLS and completed + 1 >= 1
