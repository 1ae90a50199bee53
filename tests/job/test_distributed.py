"""`torchrun --nproc-per-node 2 -m streamsvd run ...` (job/distributed.py) on a tiny model, two gloo processes.

Every job here is a subprocess with one BLAS thread, the one-process reference included, so that both
compute with the same threads. The claim tested: a job on N processes writes, byte for byte, what the
one-process job with the same batch size writes (every file but the run log and the state, which
record the number of processes); docs/DESIGN.md, "Distributed runs", says why and when.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from streamsvd.io.output import RUN_LOG
from streamsvd.job.distributed import COLLECTIVE_TIMEOUT_S
from streamsvd.job.lock import LOCK_NAME
from streamsvd.job.state import STATE_NAME

REPO = Path(__file__).resolve().parents[2]
# 8 windows in batches of 2: 2 batches per rank; 4 blocks.
FLAGS = ["--calib-samples", "8", "--seqlen", "32", "--batch-size", "2", "--no-progress", "--no-plots", "--alloc", "uniform"]
BLOCK = ["--no-compensate", "--calibrate", "block", "--anchor", "0"]
VOLATILE = {RUN_LOG, STATE_NAME, "profile_log.json"}  # the profile's wall times vary too
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
ENV.pop("STREAMSVD_FAULT", None)
ENV.pop("STREAMSVD_FAULT_RANK", None)


def _one(model: Path, out: Path, *flags: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamsvd", "run", str(model), str(out), *FLAGS, *flags],
                          env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=300, **kw)


def _torchrun(model: Path, out: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "streamsvd", "run", str(model), str(out), *FLAGS, *flags]


def _two(model: Path, out: Path, *flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(_torchrun(model, out, *flags), env={**ENV, **(env or {})}, capture_output=True, text=True,
                          timeout=300)


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name not in VOLATILE}


def _ours(stderr: str) -> list[str]:
    """Our processes' `error:` and `fix:` lines (torchrun adds its own failure summary after them)."""
    return [line for line in stderr.splitlines() if line.startswith("error:") or line.startswith("  fix:")]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from tiny_models import make_tiny_checkpoint

    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama") / "model")


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    """settings name -> the one-process job's OUT_DIR files."""
    made = {}

    def get(name: str, flags: list[str]) -> dict[str, bytes]:
        if name not in made:
            out = tmp_path_factory.mktemp("one") / name
            done = _one(model, out, *flags)
            assert done.returncode == 0, done.stderr
            made[name] = _files(out)
        return made[name]

    return get


GLOBAL = ["--alloc", "global"]  # the default allocation: the job profiles for itself first, over both processes
# a perplexity target: 2 held-out windows are one batch, so rank 0 holds them and rank 1 none (in the profile too)
PPL = ["--max-ppl-increase", "0.5", "--heldout-samples", "2", "--alloc", "global"]  # (FLAGS' uniform is refused with a target)


# plain block calibration alone ("block") is in "shrink" and "refine-block": its own case cost 20 s of CI
@pytest.mark.parametrize("name, flags", [("default", []), ("shrink", BLOCK + ["--shrink", "0.3"]),
                                         ("global", GLOBAL), ("quant", ["--quant", "int4"]),
                                         ("refine", ["--refine-steps", "6"]), ("refine-block", BLOCK + ["--refine-steps", "6"]),
                                         ("ppl", PPL)])
def test_two_processes_write_the_one_process_output_byte_for_byte(model, reference, tmp_path, name, flags):
    """Compensation and sequential calibration, plain block calibration, --shrink (which reads the output
    Grams' input diagonals: float64 terms whose sum depends on the grouping; before they were added up term by
    term in the global order, a truncation loss in the report differed in its last bit), and the default
    allocation (global), whose own profile (OUT_DIR/profile, compared too) is made by both processes, and
    --quant int4 (GPTQ rounding by the rank that factored the linear, with the input Gram it holds), and
    --refine-steps (each step's gradients from the rank holding its batch, the held-out figures gathered; with
    compensation the target is the original stream's outputs, without it the original block's on each rank), and
    --max-ppl-increase (its own profile's and the job's held-out perplexity gathered in window order)."""
    out = tmp_path / "two"
    done = _two(model, out, *flags)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("done: ") == 1  # rank 0's summary only
    assert not _ours(done.stderr) and "Traceback" not in done.stderr
    run = json.loads((out / RUN_LOG).read_text().splitlines()[-1])
    assert run["processes"] == 2 and run["windows_per_process"] == [[0, 4], [4, 8]] and run["batch_size"] == 2
    if name.startswith("refine"):  # both ranks held steps' batches (train [0, 7): 4 batches) and sent their gradients
        assert all(r["steps"] >= 1 for r in run["refinement"].values()), run["refinement"]
        assert all(p["gradient_bytes_sent"] > 0 for p in run["per_process"]), run["per_process"]
    state = json.loads((out / STATE_NAME).read_text())
    assert state["settings"]["processes"] == 2 and state["complete"]
    assert not (out / ".streamsvd-work").exists()  # every rank's scratch is gone
    files = _files(out)
    assert any(k.startswith("model-") for k in files)
    assert ("profile/spectra.safetensors" in files) == (name in ("global", "ppl"))
    if name == "ppl":
        report = json.loads(files["streamsvd_report.json"])
        assert report["allocation"]["heldout_samples"] == 2 and report["allocation"]["measured_ppl"] > 0
    assert files == reference(name, flags)


def _profile(model: Path, out: Path, *flags: str, two: bool) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"] if two
                else [sys.executable])
    return subprocess.run([*launcher, "-m", "streamsvd", "profile", str(model), str(out), "--calib-samples", "8",
                           "--seqlen", "32", "--batch-size", "2", "--no-progress", *flags],
                          env=ENV, capture_output=True, text=True, timeout=300)


def test_streamsvd_profile_on_two_processes_writes_the_one_process_profile(model, tmp_path):
    """Each process streams half the windows (and walks half the sensitivity windows backwards); the spectra,
    sensitivity weights and token-weighted energies are the one process's, byte for byte."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert _profile(model, one, two=False).returncode == 0
    done = _profile(model, two, two=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("profile: ") == 1  # rank 0's summary only
    assert not (two / ".profile-work").exists()  # every rank's scratch is gone
    made = {p.name: p.read_bytes() for p in two.iterdir() if p.name != "profile_log.json"}
    assert set(made) == {"profile.json", "spectra.safetensors", "weighted.safetensors"}
    assert made == {name: (one / name).read_bytes() for name in made}
    # the same command again finds it made (every process agrees)
    again = _profile(model, two, two=True)
    assert again.returncode == 0 and "made earlier: reused" in again.stdout, again.stderr


def test_the_original_heldout_perplexity_of_a_two_process_profile_is_the_one_process_one(model, tmp_path):
    """--heldout-samples 6 in batches of 2: rank 0 holds one batch, rank 1 two; their per-window NLLs are added in
    window order, so profile.json (with the held-out figures) is the one process's, byte for byte."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert _profile(model, one, "--heldout-samples", "6", two=False).returncode == 0
    done = _profile(model, two, "--heldout-samples", "6", two=True)
    assert done.returncode == 0, done.stderr
    assert json.loads((two / "profile.json").read_text())["heldout"]["samples"] == 6
    for name in ("profile.json", "spectra.safetensors", "weighted.safetensors"):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name


@pytest.mark.parametrize("flags, says", [
    (["--calib-samples", "2"], "fewer than the 2 processes"),
    # each process takes cuda:LOCAL_RANK: refused by both where torch sees no GPU, and on one GPU by rank 1
    *([(["--device", "cuda"], "--device cuda")] if torch.cuda.device_count() < 2 else []),
])
def test_what_does_not_run_under_torchrun_is_refused_with_one_error(model, tmp_path, flags, says):
    out = tmp_path / "out"
    done = _two(model, out, *flags)
    assert done.returncode != 0
    ours = _ours(done.stderr)
    assert len(ours) == 2 and ours[0].startswith("error:") and says in ours[0] and ours[1].startswith("  fix:"), done.stderr
    assert "[rank0]: Traceback" not in done.stderr and "[rank1]: Traceback" not in done.stderr
    assert not (out / STATE_NAME).exists()  # refused before anything was written


def test_a_killed_rank_stops_the_job_with_one_error_and_the_rerun_resumes_to_the_same_bytes(model, reference, tmp_path):
    out = tmp_path / "out"
    started = time.time()
    # rank 1 SIGKILLs itself at its 6th activation batch: during block 1, after block 0 was committed
    killed = _two(model, out, env={"STREAMSVD_FAULT": "activation-batch:6", "STREAMSVD_FAULT_RANK": "1"})
    assert time.time() - started < COLLECTIVE_TIMEOUT_S + 60
    assert killed.returncode != 0
    ours = _ours(killed.stderr)
    assert len(ours) == 2 and ours[0].startswith("error: rank 1 of 2 was lost"), killed.stderr
    state = json.loads((out / STATE_NAME).read_text())
    assert 1 <= state["blocks_done"] < 4 and not state["complete"]

    done = _two(model, out)
    assert done.returncode == 0, done.stderr
    assert "rebuilding" not in done.stderr  # the ranks' activation files were trusted, not rebuilt
    assert _files(out) == reference("default", [])


def test_a_peer_that_dies_a_moment_after_the_collective_failed_is_still_named():
    """A killed rank's sockets close (and the survivor's collective fails) a moment before the kernel marks the
    process a zombie: the survivor looks again for a few seconds before calling the lost rank unknown. (A fresh-clone
    CI run once printed 'a rank of 2 (not one on this host) stopped answering' for a rank killed on this host.)"""
    import socket

    from streamsvd.job.distributed import World

    peer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])  # exits, unreaped: a zombie
    try:
        world = World(0, 2)
        world._peers = [(socket.gethostname(), os.getpid()), (socket.gethostname(), peer.pid)]
        assert world._lost() == []  # still running at the first look
        err = world._failed(RuntimeError("Connection reset by peer"))
        assert str(err).startswith("rank 1 of 2 was lost"), str(err)
    finally:
        peer.wait()


def test_a_rank_killed_in_the_jobs_own_profile_stops_the_job_and_the_rerun_gives_the_same_bytes(model, reference, tmp_path):
    out = tmp_path / "out"
    # rank 1 SIGKILLs itself after its 2nd profile block (of the backward walk): the profile is redone on the rerun
    killed = _two(model, out, *GLOBAL, env={"STREAMSVD_FAULT": "profile-block:2", "STREAMSVD_FAULT_RANK": "1"})
    assert killed.returncode != 0
    ours = _ours(killed.stderr)
    assert len(ours) == 2 and ours[0].startswith("error: rank 1 of 2 was lost") and "profile" in ours[0], killed.stderr
    assert not (out / "profile" / "profile.json").exists()
    done = _two(model, out, *GLOBAL)
    assert done.returncode == 0, done.stderr
    assert _files(out) == reference("global", GLOBAL)


def test_killing_every_rank_and_relaunching_gives_the_same_bytes(model, reference, tmp_path):
    out = tmp_path / "out"
    killed = _two(model, out, *BLOCK, env={"STREAMSVD_FAULT": "state-saved:3"})  # every rank, after block 0
    assert killed.returncode != 0
    assert json.loads((out / STATE_NAME).read_text())["blocks_done"] >= 1
    done = _two(model, out, *BLOCK)
    assert done.returncode == 0, done.stderr
    assert _files(out) == reference("block", BLOCK)
    # a finished shard lost: rank 0 sees it, every rank replays the finished blocks on its own windows
    next(out.glob("model-00002-of-*.safetensors")).unlink()
    repaired = _two(model, out, *BLOCK)
    assert repaired.returncode == 0 and "is damaged" in repaired.stderr, repaired.stderr
    assert _files(out) == reference("block", BLOCK)
    # the same command without torchrun is another job (its sums would be added in another order): refused
    plain = _one(model, out, *BLOCK)
    assert plain.returncode == 2 and "torchrun --nproc-per-node" in plain.stderr, plain.stderr


def _wait_for(predicate, seconds: float, what: str):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _workers(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        return [p for p in psutil.Process(proc.pid).children(recursive=True) if "streamsvd" in " ".join(p.cmdline())]
    except psutil.Error:
        return []


def _kill_all(proc: subprocess.Popen) -> None:
    """torchrun and its workers (which run in sessions of their own), so no frozen rank outlives the test."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        family = []
    os.killpg(proc.pid, signal.SIGKILL)
    for p in family:
        try:
            p.kill()
        except psutil.Error:
            pass
    proc.wait()
    psutil.wait_procs(family, timeout=10)


def _stopped(proc) -> list[psutil.Process]:
    out = []
    for p in _workers(proc):
        try:
            if p.status() == psutil.STATUS_STOPPED:
                out.append(p)
        except psutil.Error:
            pass
    return out


def test_a_frozen_rank_ends_the_job_within_the_collective_timeout(model, tmp_path):
    """A rank that stops answering (SIGSTOP) makes the others stop within the bound, naming it."""
    timeout = 5
    proc = subprocess.Popen(_torchrun(model, tmp_path / "out"), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**ENV, "STREAMSVD_FAULT": "activation-batch:6:stop", "STREAMSVD_FAULT_RANK": "1",
                                 "STREAMSVD_COLLECTIVE_TIMEOUT_S": str(timeout)}, start_new_session=True)
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend((time.time(), ln) for ln in proc.stderr), daemon=True)
    reader.start()
    try:
        _wait_for(lambda: _stopped(proc), 120, "rank 1 to freeze")
        frozen = time.time()
        at, line = _wait_for(lambda: next(((t, ln) for t, ln in list(lines) if ln.startswith("error:")), None),
                             timeout + 30, "the error line")
        assert at - frozen < timeout + 10  # the collective timeout, and a little for a loaded machine
        assert line.startswith("error: rank 1 of 2 was lost"), line
    finally:
        _kill_all(proc)  # torchrun would wait 30 s for the frozen rank to take SIGTERM


def test_one_job_per_out_dir_whether_distributed_or_not(model, tmp_path):
    out = tmp_path / "out"
    # both ranks freeze at their 3rd activation batch (block 0's propagation), holding the job's locks
    proc = subprocess.Popen(_torchrun(model, out), stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True,
                            env={**ENV, "STREAMSVD_FAULT": "activation-batch:3:stop"})
    try:
        _wait_for(lambda: len(_stopped(proc)) == 2, 120, "both ranks to freeze")
        assert (out / LOCK_NAME).exists()
        # each rank's activation files hold its own 4 of the 8 windows, both streams (compensation)
        hidden = json.loads((model / "config.json").read_text())["hidden_size"]
        for r in (0, 1):
            assert (out / ".streamsvd-work" / f"rank-{r}-of-2" / "acts-0.bin").stat().st_size == 4 * 2 * 32 * hidden * 4
        # a plain job is another job (one process), but that job is running: its lock answers (the settings' mismatch
        # answered first, with a fix to add --restart, which the lock then refused)
        plain = _one(model, out)
        assert plain.returncode == 2 and f"OUT_DIR {out} is in use by another streamsvd job" in plain.stderr, plain.stderr
        assert "--restart" not in plain.stderr
        assert not (out / "model.safetensors.index.json").exists()
        second = _two(model, out)
        ours = _ours(second.stderr)
        assert second.returncode != 0 and len(ours) == 2 and "in use by another streamsvd job" in ours[0], second.stderr
    finally:
        _kill_all(proc)
    plain = _one(model, out)  # nobody runs there now: the state says whose job it is
    assert plain.returncode == 2 and "it was torchrun --nproc-per-node 2, now one process (no torchrun)" in plain.stderr, plain.stderr


REDUCE_SCRIPT = '''
import sys
from types import SimpleNamespace

import torch

from streamsvd.job.distributed import World
from streamsvd.math.compensate import CrossGramAccumulator
from streamsvd.math.gram import GramAccumulator, OutputGramAccumulator

torch.set_num_threads(1)
world = World.start()
gen = torch.Generator().manual_seed(0)
# 4 batches; rank r has batches [2r, 2r + 2). Scales 1e6 apart: a running float64 sum rounds differently
# from the per-rank sums added in rank order, so the order the reduction promises is visible.
batches = [torch.randn(3000, 24, generator=gen) * s for s in (1e3, 1e-3, 1e3, 1e-3)]
weight = torch.randn(8, 24, generator=gen)
mine = batches[2 * world.rank: 2 * world.rank + 2]
stats = SimpleNamespace(grams={"a": GramAccumulator(24)}, output_grams={"o": OutputGramAccumulator(weight)},
                        cross={"a": CrossGramAccumulator(24)}, e0={},
                        energy_terms={"w": [float(torch.sum(b * b, dtype=torch.float64)) for b in mine]})
for b in mine:
    stats.grams["a"].add_batch(b)
    stats.output_grams["o"].add_batch(b)
    stats.cross["a"].add_pair(b.flip(0), b)
world.reduce_statistics(stats)
torch.save({"gram": stats.grams["a"].sum, "out": stats.output_grams["o"].sum, "diag": stats.output_grams["o"].input_diag_sum,
            "cross": stats.cross["a"].sum, "tokens": stats.grams["a"].tokens, "e0": stats.e0["w"]},
           f"{sys.argv[1]}/rank{world.rank}.pt")
world.stop()
'''


def test_the_reduction_adds_the_ranks_partial_sums_in_rank_order_identically_on_every_rank(tmp_path):
    import torch

    from streamsvd.math.gram import GramAccumulator, OutputGramAccumulator

    script = tmp_path / "reduce.py"
    script.write_text(REDUCE_SCRIPT)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
                           str(tmp_path)], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for key in ("gram", "out", "diag", "cross"):
        assert torch.equal(r0[key], r1[key]), key  # bit-identical totals on every rank
    assert r0["tokens"] == r1["tokens"] == 12000 and r0["e0"] == r1["e0"]

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(3000, 24, generator=gen) * s for s in (1e3, 1e-3, 1e3, 1e-3)]
    weight = torch.randn(8, 24, generator=gen)
    out = OutputGramAccumulator(weight)
    for b in batches:
        out.add_batch(b)
    assert torch.equal(r0["diag"], out.input_diag_sum)  # the diagonal's terms: added in the one process's order
    partial = []
    for r in (0, 1):
        acc = GramAccumulator(24)
        for b in batches[2 * r: 2 * r + 2]:
            acc.add_batch(b)
        partial.append(acc.sum)
    assert torch.equal(r0["gram"], partial[0] + partial[1])  # exactly (p_0 + p_1), the documented order
    running = GramAccumulator(24)  # what one process sums: one running sum over the batches in order
    for b in batches:
        running.add_batch(b)
    # not the same bits here (the scales are chosen so), but within float64 rounding of the entries' scale
    scale = running.sum.abs().max()
    assert not torch.equal(r0["gram"], running.sum)
    assert float((r0["gram"] - running.sum).abs().max()) <= 1e-15 * float(scale)
    # the output energies are summed term by term in the global batch order, exactly as one process does (each
    # term with one thread, as the ranks make them: a float64 sum's bits depend on how many threads add it up)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        total = 0.0
        for b in batches:
            total += float(torch.sum(b * b, dtype=torch.float64))
    finally:
        torch.set_num_threads(threads)
    assert r0["e0"] == total / 12000


def test_plan_nproc_plans_one_process_share(model, capsys):
    from streamsvd.cli import main

    plans = {}
    for n in (1, 2):
        assert main(["plan", str(model), "--calib-samples", "8", "--seqlen", "32", "--nproc", str(n), "--json"]) == 0
        plans[n] = json.loads(capsys.readouterr().out)
    one, two = plans[1], plans[2]
    assert one["batch_size"] == 8 and two["batch_size"] == 4  # every process gets a batch
    assert two["disk"]["work files"] * 2 == one["disk"]["work files"]  # a process's work files hold its share
    assert two["disk"]["output"] == one["disk"]["output"]
    assert "reduction buffers" in two["components"]["statistics"] and "reduction buffers" not in one["components"]["statistics"]
    assert main(["plan", str(model), "--calib-samples", "1", "--seqlen", "32", "--nproc", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 1 calibration windows in batches of 1 make 1 batch(es), fewer than the 2 processes")


def test_batch_size_is_checked(model, tmp_path, capsys):
    from streamsvd.cli import main

    args = ["run", str(model), str(tmp_path / "out"), "--calib-samples", "8", "--seqlen", "32", "--no-progress", "--no-plots"]
    assert main(args + ["--batch-size", "0"]) == 2
    assert "error: --batch-size 0 is not positive" in capsys.readouterr().err
    for command in (args, ["plan", *args[1:2], *args[3:]]):  # planned as given: 14.7 TiB for 4 windows (a probe, 12-07)
        assert main(command + ["--batch-size", "9"]) == 2
        err = capsys.readouterr().err
        assert "error: --batch-size 9 is more than the 8 calibration windows" in err and "give at most 8" in err, err
    assert not (tmp_path / "out").exists()
    assert main(args + ["--batch-size", "3"]) == 0
    assert json.loads((tmp_path / "out" / RUN_LOG).read_text().splitlines()[-1])["batch_size"] == 3
    capsys.readouterr()
    # the job in OUT_DIR keeps the batch size it started with; another one is refused, naming it
    assert main(args + ["--batch-size", "2"]) == 2
    assert "error: --batch-size 2 differs from the interrupted job's 3" in capsys.readouterr().err


@pytest.mark.parametrize("route", ["input", "compensated", "output"])
def test_a_gram_off_by_float64_rounding_changes_the_stored_weights_only_at_float32_rounding(route):
    """The tolerance where the ranks' sums are not exact (docs/DESIGN.md, "Distributed runs"): totals whose
    entries are off by a few float64 units in the last place, as a regrouped float64 sum can be, give
    float64 factors that differ, but a compressed weight W' = out_factor @ in_factor, from the factors rounded
    to float32 as the shard stores them, within 1e-6 of its largest entry (measured: 0 to 5e-8 at 576 wide,
    a few float32 units in the last place of a handful of factor entries)."""
    import torch

    from streamsvd.math.compensate import compensated_whitening, factorize_compensated
    from streamsvd.math.factorize import factorize, factorize_output_side, whiten
    from streamsvd.math.gram import GramAccumulator, OutputGramAccumulator

    gen = torch.Generator().manual_seed(1)
    n = 384
    weight = torch.randn(n if route != "output" else n // 2, n, generator=gen) / 20
    x = torch.randn(8192, n, generator=gen) * torch.logspace(-3, 1, n)  # channels four decades apart
    acc = OutputGramAccumulator(weight) if route == "output" else GramAccumulator(n)
    acc.add_batch(x)
    gram = acc.gram
    noise = torch.randn(gram.shape, generator=gen, dtype=torch.float64) * 4 * 2.0**-52 * gram.abs()
    other = gram + (noise + noise.T) / 2  # about 4 float64 ulps per entry, still symmetric
    assert not torch.equal(gram, other)

    def factors(g):
        if route == "output":
            return factorize_output_side(weight, g, 64)
        if route == "compensated":
            white, q, inv, lam = compensated_whitening(g, 0.1)
            return factorize_compensated(weight, white, q, inv, lam, g * 0.9, 128)
        return factorize(weight, whiten(g, "eig"), 128, "eig")

    f, h = factors(gram), factors(other)
    assert not torch.equal(f.out_factor, h.out_factor)  # the float64 factors do move

    def stored(f):
        return (f.out_factor.to(torch.float32) @ f.in_factor.to(torch.float32)).double()

    a, b = stored(f), stored(h)
    assert float((a - b).abs().max()) <= 1e-6 * float(a.abs().max())


def test_restart_and_work_dir_under_torchrun(model, reference, tmp_path):
    out, work = tmp_path / "out", tmp_path / "scratch"
    work.mkdir()
    killed = _two(model, out, *BLOCK, "--work-dir", str(work), env={"STREAMSVD_FAULT": "state-saved:3"})
    assert killed.returncode != 0
    [job] = list(work.iterdir())
    assert sorted(p.name for p in job.iterdir()) == ["rank-0-of-2", "rank-1-of-2"]  # each rank's own files
    done = _two(model, out, *BLOCK, "--work-dir", str(work), "--restart")
    assert done.returncode == 0, done.stderr
    assert "--restart removes" in done.stderr
    assert _files(out) == reference("block", BLOCK)
    assert list(work.iterdir()) == []  # no scratch left behind, the ranks' folders' folder included


STEP_SCRIPT = """
from streamsvd.errors import StreamSVDError
from streamsvd.job.distributed import World

world = World.start()
try:
    if world.rank == 1:
        world.min_int(3)  # a rank taking another path than the others (a bug) ...
    world.all_true(True)
except StreamSVDError as e:
    # one write per line (atomic on a pipe): both ranks write to the same stdout, and print() writes the text and the
    # newline separately, so two ranks' lines could interleave ("...stoppedquiet error: ...")
    import os
    os.write(1, ((("quiet " if getattr(e, "quiet", False) else "") + "error: " + e.problem) + "\\n").encode())
world.stop()
"""


def test_ranks_out_of_step_are_an_error_not_a_mixed_result(tmp_path):
    script = tmp_path / "step.py"
    script.write_text(STEP_SCRIPT)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)],
                          env=ENV, capture_output=True, text=True, timeout=300)
    said = [line for line in done.stdout.splitlines() if "error:" in line]
    # ... is caught at the next gather, by both ranks, said by rank 0 only
    assert sorted(said) == sorted([
        "error: the processes fell out of step (rank 0 at gather 2 (all_true) in start, rank 1 at gather 2 (min_int) in "
        "start); the job stopped",
        "quiet error: the processes fell out of step (rank 0 at gather 2 (all_true) in start, rank 1 at gather 2 (min_int) "
        "in start); the job stopped"]), done.stdout + done.stderr


def _eval(out: Path, text: Path, *flags: str, two: bool) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"] if two
                else [sys.executable])
    return subprocess.run([*launcher, "-m", "streamsvd", "eval", str(out), "--text", str(text), "--seqlen", "32",
                           "--max-windows", "8", "--json", "--no-progress", *flags],
                          env=ENV, capture_output=True, text=True, timeout=300)


def test_streamsvd_eval_on_two_processes_gives_the_one_process_perplexity_exactly(model, tmp_path):
    """Each process streams half the windows through the blocks; the per-window figures are added in window
    order, so the perplexity is the one process's to the last bit (same batch size)."""
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    one = _eval(model, text, "--batch-size", "2", two=False)
    two = _eval(model, text, "--batch-size", "2", two=True)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert len(two.stdout.splitlines()) == 1  # rank 0 prints
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    assert (b["perplexity"], b["tokens_scored"], b["windows"]) == (a["perplexity"], a["tokens_scored"], a["windows"])
    refused = _eval(model, text, "--in-memory", two=True)
    ours = _ours(refused.stderr)
    assert refused.returncode != 0 and len(ours) == 2 and "--in-memory cannot run under torchrun" in ours[0], refused.stderr
    other = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            "-m", "streamsvd", "verify", str(tmp_path)], env=ENV, capture_output=True, text=True, timeout=300)
    ours = _ours(other.stderr)
    assert other.returncode != 0 and len(ours) == 2 and "`streamsvd verify` does not run under torchrun" in ours[0]


def test_streamsvd_eval_with_fewer_batches_than_processes_is_refused_in_evals_own_flags(model, tmp_path):
    """One window on two processes was refused as "1 calibration windows ... give at least 2 windows
    (--calib-samples)": a flag eval does not have. The refusal names the evaluation's windows and flags."""
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    refused = _eval(model, text, "--max-windows", "1", two=True)
    ours = _ours(refused.stderr)
    assert refused.returncode != 0 and len(ours) == 2, refused.stderr
    assert "evaluation window" in ours[0] and "--calib-samples" not in ours[1] and "--max-windows" in ours[1], ours


def test_two_torchrun_agents_as_two_nodes_write_the_one_process_output(model, reference, tmp_path):
    """`--nnodes 2` with a c10d rendezvous: two launchers (as on two machines sharing OUT_DIR's filesystem, here one
    host), one process each, make one job of 2 ranks that writes the one-process bytes."""
    import socket

    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                                "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                                "--rdzv-id", "streamsvd-test", "-m", "streamsvd", "run", str(model), str(out), *FLAGS],
                               env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    done = [a.communicate(timeout=300) for a in agents]
    assert [a.returncode for a in agents] == [0, 0], [err for _, err in done]
    run = json.loads((out / RUN_LOG).read_text().splitlines()[-1])
    assert run["processes"] == 2 and run["windows_per_process"] == [[0, 4], [4, 8]]
    assert sum(o.count("done: ") for o, _ in done) == 1  # one summary, from rank 0
    assert _files(out) == reference("default", [])


SIM_RUN = REPO / "tests" / "sim_run.py"


@pytest.mark.parametrize("name, flags", [("default", []), ("global", GLOBAL)])
def test_two_processes_on_simulated_gpus_write_the_one_process_cpu_output(model, reference, tmp_path, name, flags):
    """`--device cuda` under torchrun without a GPU: each rank's blocks, statistics and factorisations on the simulated
    device (tests/sim_run.py), whose partial sums cross to the host for gloo and back, and whose factors are sent to
    the other rank: the one-process CPU job's bytes (compensated; and with the job's own profile, whose per-token
    weights and energies are gathered too)."""
    out = tmp_path / "two"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(SIM_RUN), "run", str(model), str(out), *FLAGS, *flags],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not _ours(done.stderr) and "Traceback" not in done.stderr
    run = json.loads((out / RUN_LOG).read_text().splitlines()[-1])
    assert run["processes"] == 2 and run["device"] == "meta:1"  # the simulated device, on both ranks
    assert _files(out) == reference(name, flags)


def test_streamsvd_eval_on_two_simulated_gpus_gives_the_one_process_perplexity(model, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    one = _eval(model, text, "--batch-size", "2", two=False)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(SIM_RUN), "eval", str(model), "--text", str(text), "--seqlen", "32", "--max-windows", "8",
                          "--json", "--no-progress", "--batch-size", "2", "--device", "cuda"],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    assert b["perplexity"] == a["perplexity"] and b["device"] == "meta:1" and b["head_on_device"]


def test_a_two_process_profile_over_fewer_windows_than_the_calibration_is_the_one_process_one(model, tmp_path):
    """--profile-samples 4 of 8 windows in batches of 2: each process streams one batch of the statistics pass (the
    first 4 windows) and two of the sensitivity pass; the profile is the one process's, byte for byte."""
    one, two = tmp_path / "one", tmp_path / "two"
    flags = ("--profile-samples", "4", "--sensitivity-samples", "4")
    assert _profile(model, one, *flags, two=False).returncode == 0
    done = _profile(model, two, *flags, two=True)
    assert done.returncode == 0, done.stderr
    meta = json.loads((two / "profile.json").read_text())
    assert meta["identity"]["profile_samples"] == 4 and meta["tokens"] == 4 * 32
    for name in ("profile.json", "spectra.safetensors", "weighted.safetensors"):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_rank_of_an_earlier_launch_still_running_refuses_the_relaunch(model, tmp_path):
    # An earlier launch's rank 0 and launcher were killed, its rank 1 went on (a long factorisation, another node):
    # the relaunch was not refused (only rank 0 held a lock in OUT_DIR), and that rank 1 removed the relaunch's
    # activation files by their path on its way out (a FileNotFoundError traceback, or worse, files mixed).
    from streamsvd.job.lock import DirLock

    out = tmp_path / "out"
    rank1 = out / ".streamsvd-work" / "rank-1-of-2"
    rank1.mkdir(parents=True)
    (rank1 / "acts-0.bin").write_bytes(b"the earlier rank's")
    alive = DirLock(rank1, "OUT_DIR").acquire()  # that rank, still running
    try:
        again = _two(model, out)
    finally:
        alive.release()
    ours = _ours(again.stderr)
    assert again.returncode != 0 and len(ours) == 2, again.stderr
    assert "in use by another streamsvd job" in ours[0] and "rank-1-of-2" in ours[0], again.stderr
    assert _tree(out) == {".streamsvd-work/rank-1-of-2/acts-0.bin": b"the earlier rank's"}  # nothing else touched


def test_a_torchrun_run_refused_leaves_no_folder_in_work_dir(model, tmp_path):
    from streamsvd.job.lock import DirLock

    out, work = tmp_path / "out", tmp_path / "scratch"
    out.mkdir()
    work.mkdir()
    other = DirLock(out, "OUT_DIR").acquire()  # another job holds OUT_DIR: rank 0 is refused
    try:
        refused = _two(model, out, "--work-dir", str(work))
    finally:
        other.release()
    ours = _ours(refused.stderr)
    assert refused.returncode != 0 and len(ours) == 2 and "in use by another streamsvd job" in ours[0], refused.stderr
    assert list(work.iterdir()) == []  # rank 1 had made (and left) WORK/streamsvd-<job>/rank-1-of-2
    assert list(out.iterdir()) == []


def test_a_second_torchrun_profile_into_a_busy_folder_stops_on_every_rank_and_touches_nothing(model, tmp_path):
    # Only rank 0 took PROFILE_DIR's lock, outside the agreement: the second profile's rank 1 went on, failed when
    # rank 0 left, and removed the running profile's rank-1 activation files (the same folder name) on its way out.
    from streamsvd.job.lock import DirLock

    profile = tmp_path / "profile"
    running = profile / ".profile-work" / "rank-1-of-2"
    running.mkdir(parents=True)
    (running / "inputs-3.bin").write_bytes(b"the running profile's")
    held = DirLock(profile, "PROFILE_DIR").acquire()  # the running profile's rank 0
    try:
        second = _profile(model, profile, two=True)
    finally:
        held.release()
    ours = _ours(second.stderr)
    assert second.returncode != 0 and len(ours) == 2 and "is in use by another streamsvd job" in ours[0], second.stderr
    assert "was lost" not in second.stderr
    assert (running / "inputs-3.bin").read_bytes() == b"the running profile's"


def test_a_torchrun_ranks_work_folder_left_before_the_first_state_is_the_jobs_own_debris(tmp_path):
    # Killed before rank 0 saved the first state: rank 1's folder (its lock file, an activation file) was taken for
    # someone else's files, and the plain rerun was refused ("holds no streamsvd job").
    from streamsvd.job.state_schema import is_own_debris

    work = tmp_path / "out" / ".streamsvd-work"
    (work / "rank-1-of-2").mkdir(parents=True)
    (work / "rank-1-of-2" / LOCK_NAME).write_bytes(b"")
    (work / "rank-1-of-2" / "acts-0.bin").write_bytes(b"")
    assert is_own_debris(work)
    (work / "rank-1-of-2" / "notes.txt").write_text("mine")
    assert not is_own_debris(work)
    assert not is_own_debris(tmp_path / "out")
