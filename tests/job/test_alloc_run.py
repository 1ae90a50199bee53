"""`run --alloc / --rank-multiple / --profile`: ranks from a profile, a profile reused, old jobs unchanged."""

import json

import pytest

import streamsvd
from streamsvd.cli import main
from streamsvd.errors import JobMismatch, StreamSVDError
from streamsvd.io.checkpoint import Checkpoint
from streamsvd.job import profile as profile_module
from streamsvd.job.pipeline import JobConfig, job_identity, run_job
from streamsvd.job.plan import block_linears, build_plan
from streamsvd.job.profile import ProfileConfig, make_profile
from streamsvd.math.allocate import allocate, budget_numel, step_cost, total_numel
from tiny_models import make_tiny_checkpoint

SAMPLES, SEQLEN = 6, 48


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama") / "model")


@pytest.fixture(scope="module")
def profiled(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("profile") / "prof"
    make_profile(ProfileConfig(tiny, path, calib_samples=SAMPLES, seqlen=SEQLEN, sensitivity_samples=4, progress=False))
    return path


def _job(model_dir, out_dir, **kw):
    return JobConfig(model_dir=model_dir, out_dir=out_dir, calib_samples=SAMPLES, seqlen=SEQLEN, progress=False, **{"alloc": "uniform", **kw})


def _no_profiling(monkeypatch):
    def refuse(self):
        raise AssertionError("profiled although a profile was given")

    monkeypatch.setattr(profile_module.Profiler, "run", refuse)


@pytest.mark.parametrize("alloc,multiple", [("global", 1), ("v2", 1), ("global", 8)])
def test_a_profile_reused_by_two_runs_at_other_ratios(tiny, profiled, tmp_path, monkeypatch, capsys, alloc, multiple):
    _no_profiling(monkeypatch)
    prof = profile_module.read_profile(profiled)
    mats = prof.matrices()
    for ratio in (0.3, 0.5):
        out = tmp_path / f"out-{ratio}"
        report = run_job(_job(tiny, out, ratio=ratio, alloc=alloc, rank_multiple=multiple, profile=profiled))
        assert "profile reused" in capsys.readouterr().err
        assert report["allocation"]["profile"]["profiling"] == "profile reused"
        ranks = {name: m["rank"] for name, m in report["modules"].items()}
        assert ranks == allocate(alloc, mats, ratio, multiple=multiple, tokens=prof.tokens)
        assert json.loads((out / "config.json").read_text())["streamsvd"]["ranks"] == ranks
        # The achieved ratio is the budget's, to within one rank step of any matrix not at full rank.
        left = budget_numel(mats, ratio) - total_numel(mats, ranks)
        assert 0 <= left < min(step_cost(a, ranks[a.name], multiple) for a in mats if ranks[a.name] < a.full)
        assert report["ratio_linear"] == pytest.approx(1 - total_numel(mats, ranks) / sum(a.m * a.n for a in mats))
        assert report["ratio_linear"] >= ratio
        assert len(set(ranks.values())) > 3  # not one ratio for all
        streamsvd.load(out)


def test_a_profile_from_before_token_weighting_still_allocates_and_says_so(tiny, profiled, tmp_path, capsys):
    """Without weighted.safetensors the ranks come from one weight per matrix, with a warning and a fix."""
    import shutil

    old = tmp_path / "old-profile"
    shutil.copytree(profiled, old)
    (old / profile_module.WEIGHTED_FILE).unlink()
    with pytest.raises(StreamSVDError, match="not the file the profile wrote"):  # a profile of today missing it: damaged
        profile_module.read_profile(old)
    meta = json.loads((old / profile_module.PROFILE_JSON).read_text())
    for key in ("files_sha256", "tensor_sha256", "meta_sha256"):  # what a profile of then did not record
        del meta[key]
    (old / profile_module.PROFILE_JSON).write_text(json.dumps(meta))
    prof = profile_module.read_profile(old)
    assert prof.weighted is None and all(a.weighted is None for a in prof.matrices())
    report = run_job(_job(tiny, tmp_path / "out", ratio=0.4, alloc="global", profile=old))
    err = capsys.readouterr().err
    assert "predates token-weighted sensitivity" in err and "fix: make the profile again" in err
    assert "records no checksums" in err  # an edit or another model's profile cannot be told from it: said
    ranks = {name: m["rank"] for name, m in report["modules"].items()}
    assert ranks == allocate("global", prof.matrices(), 0.4, tokens=prof.tokens)
    run_job(_job(tiny, tmp_path / "new", ratio=0.4, alloc="global", profile=profiled))
    err = capsys.readouterr().err
    assert "predates" not in err and "records no checksums" not in err


def test_run_without_a_profile_profiles_into_out_dir_and_resumes_with_it(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    report = run_job(_job(tiny, out, alloc="global"))
    assert report["allocation"]["profile"]["profiling"] == "profiled by this job"
    assert (out / "profile" / "profile.json").is_file()
    assert report["this_run"]["profile_seconds"] > 0  # the cost is in this run's figures, not in the report
    again = run_job(_job(tiny, out, alloc="global"))  # finished: nothing to do, same report
    assert {k: v for k, v in again.items() if k != "this_run"} == {k: v for k, v in report.items() if k != "this_run"}
    with pytest.raises(JobMismatch):
        run_job(_job(tiny, out, alloc="v2"))  # another allocation into the same OUT_DIR is another job


def test_a_job_profiling_for_itself_loads_one_tokenizer_and_plans_the_profiles_peak(tiny, tmp_path, monkeypatch):
    # `streamsvd plan` counts the profile at the plan process's baseline, which holds one tokenizer: a second copy
    # in the profile (Gemma 3's: 257 MiB) made `run` refuse the minimum that `plan` printed.
    loaded = []
    real = profile_module.load_tokenizer
    monkeypatch.setattr(profile_module, "load_tokenizer", lambda d: loaded.append(d) or real(d))
    report = run_job(_job(tiny, tmp_path / "out", alloc="global"))
    assert report["allocation"]["profile"]["profiling"] == "profiled by this job" and loaded == []
    assert "profile" in report["this_run"]["peak_rss_by_stage"]


def test_the_own_profile_takes_profile_samples_windows_and_another_count_is_another_job(tiny, tmp_path):
    """18 calibration windows, the job's own profile over the first 16 (the default) or 17: its tokens and identity
    say so, and resuming the job with another count is refused naming the flag (the ranks would change)."""
    def job(out, **kw):
        return JobConfig(model_dir=tiny, out_dir=out, calib_samples=18, seqlen=16, progress=False, alloc="global", **kw)

    out = tmp_path / "out"
    report = run_job(job(out))
    prof = profile_module.read_profile(out / "profile")
    assert prof.tokens == 16 * 16 and prof.meta["identity"]["profile_samples"] == 16
    assert report["allocation"]["profile"]["profile_samples"] == 16
    with pytest.raises(JobMismatch, match="it was --profile-samples 16, now 17"):
        run_job(job(out, profile_samples=17))
    assert run_job(job(out, profile_samples=16))["linear_params_after"] == report["linear_params_after"]  # the same job
    every = run_job(job(tmp_path / "every", profile_samples=18))
    assert profile_module.read_profile(tmp_path / "every" / "profile").tokens == 18 * 16
    assert every["allocation"]["profile"]["profile_samples"] == 18


def test_a_job_from_before_profile_samples_resumes_with_its_profile_over_every_window(tiny, tmp_path, capsys):
    """A job whose own profile took every calibration window (as every job did before --profile-samples: no key in
    its identity), killed after block 0, resumes from the command line without the flag: it keeps that profile and
    ends with the bytes of the uninterrupted job, instead of being refused as another job."""
    from test_resume import _files, _interrupt_after

    from streamsvd.job.profile import PROFILE_LOG

    def job(out, **kw):
        return JobConfig(model_dir=tiny, out_dir=out, calib_samples=18, seqlen=16, progress=False, alloc="global",
                         profile_samples=18, **kw)

    run_job(job(tmp_path / "straight"))
    _interrupt_after(0, job(tmp_path / "cut"))
    assert "profile_samples" not in json.loads((tmp_path / "cut" / "streamsvd_state.json").read_text())["settings"]
    assert main(["run", str(tiny), str(tmp_path / "cut"), "--calib-samples", "18", "--seqlen", "16", "--no-progress"]) == 0
    assert "with the profile it was started with: --profile-samples 18" in capsys.readouterr().err

    def files(out):
        return {k: v for k, v in _files(out).items() if not k.endswith(PROFILE_LOG)}

    assert files(tmp_path / "cut") == files(tmp_path / "straight")


def test_an_interrupted_job_that_profiles_for_itself_resumes_byte_identical(tiny, tmp_path):
    from test_resume import _files, _interrupt_after  # _files: every file but the state and the run log

    from streamsvd.job.profile import PROFILE_LOG

    run_job(_job(tiny, tmp_path / "straight", alloc="global"))
    _interrupt_after(0, _job(tiny, tmp_path / "cut", alloc="global"))
    assert (tmp_path / "cut" / "profile" / "profile.json").is_file()
    resumed = []
    run_job(_job(tiny, tmp_path / "cut", alloc="global"), on_block_done=resumed.append)
    assert resumed == [1, 2]

    def files(out):
        return {k: v for k, v in _files(out).items() if not k.endswith(PROFILE_LOG)}

    assert files(tmp_path / "cut") == files(tmp_path / "straight")
    assert "profile/spectra.safetensors" in files(tmp_path / "cut")


def test_a_fresh_job_whose_allocated_ranks_need_a_smaller_batch_takes_it(tiny, tmp_path, monkeypatch, capsys):
    """The batch is planned before the job's own profile, with uniform ranks. When the allocated ranks need more
    memory at that batch (a SmolLM2 default job at twice the plan's minimum did: 'too small for this interrupted
    job'), a job that has streamed nothing yet takes the largest batch that fits them, and records it; its shards
    are those of a run with that --batch-size and the same profile. (Here the budget is made to hold batch 3 of uniform ranks but only batch 1
    of the allocated ones.)"""
    import streamsvd.job.pipeline as pipeline

    real = pipeline.build_plan

    def tight(cfg, ckpt, fixed_batch=None, ranks=None, **kw):
        plan = real(cfg, ckpt, fixed_batch=fixed_batch, ranks=ranks, **kw)
        fits = 3 if ranks is None else 1
        if fixed_batch is None:
            plan.batch_size = fits
        if plan.batch_size > fits:
            plan.peak_bytes = plan.budget_bytes + 1
        return plan

    monkeypatch.setattr(pipeline, "build_plan", tight)
    out = tmp_path / "out"
    run_job(_job(tiny, out, alloc="global"))
    assert "batch 3 -> 1: the allocated ranks need more memory" in capsys.readouterr().err
    state = json.loads((out / "streamsvd_state.json").read_text())
    assert state["batch_size"] == 1 and state["complete"]
    monkeypatch.setattr(pipeline, "build_plan", real)
    # the same profile given (the job's own was made at the profile's planned batch, not at --batch-size 1)
    run_job(_job(tiny, tmp_path / "one", alloc="global", batch_size=1, profile=out / "profile"))
    from test_resume import _files

    def shards(o):
        return {k: v for k, v in _files(o).items() if k.startswith("model")}

    assert shards(out) and shards(out) == shards(tmp_path / "one")


def test_a_batch_size_the_allocated_ranks_cannot_hold_is_refused_as_the_flags_not_as_a_resume(tiny, tmp_path,
                                                                                             monkeypatch):
    """A fresh job's --batch-size that fits uniform ranks but not the ranks its own profile allocated was refused as
    'too small for this interrupted job ... kept so the output does not change'; it is --batch-size's refusal."""
    import streamsvd.job.pipeline as pipeline

    real = pipeline.build_plan

    def tight(cfg, ckpt, fixed_batch=None, ranks=None, **kw):
        plan = real(cfg, ckpt, fixed_batch=fixed_batch, ranks=ranks, **kw)
        if ranks is not None and plan.batch_size > 1:
            plan.peak_bytes = plan.budget_bytes + 1
        return plan

    monkeypatch.setattr(pipeline, "build_plan", tight)
    with pytest.raises(StreamSVDError) as refused:
        run_job(_job(tiny, tmp_path / "out", alloc="global", batch_size=2))
    assert refused.value.problem.startswith("--batch-size 2 needs") and "ranks allocated from the profile" in refused.value.problem
    assert "interrupted" not in refused.value.problem and "smaller --batch-size" in refused.value.fix


def test_a_profile_changed_between_a_kill_and_the_resume_is_refused(tiny, tmp_path):
    """The job records its own profile's digest once the profile is made; a resume that finds another profile in
    OUT_DIR/profile (here one sensitivity weight doubled, still a readable profile) refuses it rather than
    mixing ranks from two profiles."""
    out = tmp_path / "out"

    def stop(index):
        if index == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_job(_job(tiny, out, alloc="global"), on_block_done=stop)
    state = json.loads((out / "streamsvd_state.json").read_text())
    meta_path = out / "profile" / "profile.json"
    meta = json.loads(meta_path.read_text())
    assert state["profile_digest"] == profile_module.read_profile(out / "profile").digest
    name = meta["order"][0]
    meta["sensitivity"][name] *= 2
    del meta["meta_sha256"]  # another readable profile (one without that digest, as made before 2026-12-06)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StreamSVDError) as refused:
        run_job(_job(tiny, out, alloc="global"))
    assert "is not the one this job allocated its finished blocks from" in refused.value.problem
    assert "--restart" in refused.value.fix
    run_job(_job(tiny, out, alloc="global", restart=True))  # the fix works: profiled anew, finished
    assert json.loads((out / "streamsvd_state.json").read_text())["complete"]


def test_restart_removes_the_profile_the_job_made(tiny, tmp_path, capsys):
    run_job(_job(tiny, tmp_path / "out", alloc="global"))
    capsys.readouterr()
    run_job(_job(tiny, tmp_path / "out", alloc="global", restart=True))
    assert str(tmp_path / "out" / "profile") in capsys.readouterr().err
    assert (tmp_path / "out" / "profile" / "profile.json").is_file()  # made again


def test_run_with_an_own_profile_equals_run_with_the_same_profile_given(tiny, tmp_path):
    own = run_job(_job(tiny, tmp_path / "own", alloc="global", ratio=0.4))
    given = run_job(_job(tiny, tmp_path / "given", alloc="global", ratio=0.4, profile=tmp_path / "own" / "profile"))
    assert {n: m["rank"] for n, m in own["modules"].items()} == {n: m["rank"] for n, m in given["modules"].items()}


def test_the_default_allocation_is_global_and_profiles_for_itself(tiny, tmp_path):
    """Left out, --alloc is global (measured better than uniform, docs/RESULTS.md), under torchrun too
    (tests/job/test_distributed.py runs it on two processes)."""
    cfg = JobConfig(model_dir=tiny, out_dir=tmp_path / "out", calib_samples=SAMPLES, seqlen=SEQLEN, progress=False, plots=False)
    assert cfg.needs_profile and cfg.alloc == "global"
    report = run_job(cfg)
    assert report["allocation"]["alloc"] == "global" and (tmp_path / "out" / "profile" / "profile.json").exists()
    assert (tmp_path / "out" / "profile" / "weighted.safetensors").exists()


def test_a_job_started_uniform_resumes_uniform_when_alloc_is_left_out(tiny, tmp_path, capsys):
    """A job interrupted before `global` became the default (it was uniform, recorded without an "alloc" key)
    resumes with --alloc left out instead of being refused as another job; a new OUT_DIR takes global."""
    out = tmp_path / "out"

    def stop(index):
        if index == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_job(_job(tiny, out, alloc="uniform", plots=False), on_block_done=stop)
    flags = ["--calib-samples", str(SAMPLES), "--seqlen", str(SEQLEN), "--no-progress", "--no-plots"]
    capsys.readouterr()
    assert main(["run", str(tiny), str(out), *flags]) == 0
    err = capsys.readouterr().err
    assert "with the allocation it was started with: --alloc uniform" in err and "error:" not in err
    report = json.loads((out / "streamsvd_report.json").read_text())
    assert report.get("allocation") is None and not (out / "profile").exists()
    straight = run_job(_job(tiny, tmp_path / "straight", alloc="uniform", plots=False))
    assert {n: m["rank"] for n, m in report["modules"].items()} == {n: m["rank"] for n, m in straight["modules"].items()}
    assert main(["run", str(tiny), str(tmp_path / "new"), *flags]) == 0
    assert json.loads((tmp_path / "new" / "streamsvd_report.json").read_text())["allocation"]["alloc"] == "global"


def test_uniform_jobs_keep_the_old_identity(tiny):
    cfg = _job(tiny, "out")
    identity = job_identity(cfg, Checkpoint(tiny), "text")
    assert not {"alloc", "rank_multiple", "profile"} & set(identity)
    from streamsvd.job.state import mismatch

    said = mismatch(identity, job_identity(_job(tiny, "out", alloc="global"), Checkpoint(tiny), "text"))
    assert "--alloc uniform, now global" in said and "profile" not in said  # the job's own profile goes with --alloc
    identity = job_identity(_job(tiny, "out", alloc="global", rank_multiple=64), Checkpoint(tiny), "text", "abc")
    assert (identity["alloc"], identity["rank_multiple"], identity["profile"]) == ("global", 64, "abc")
    assert "alloc_floor" not in identity and "alloc_floor" not in job_identity(_job(tiny, "out", alloc_floor=0.5), Checkpoint(tiny), "t")
    assert job_identity(_job(tiny, "out", alloc="global", alloc_floor=0.5), Checkpoint(tiny), "t", "abc")["alloc_floor"] == 0.5


def test_alloc_floor_reaches_the_ranks_and_the_report(tiny, profiled, tmp_path, monkeypatch):
    _no_profiling(monkeypatch)
    prof = profile_module.read_profile(profiled)
    report = run_job(_job(tiny, tmp_path / "out", ratio=0.6, alloc="global", alloc_floor=0.75, profile=profiled))
    assert {n: m["rank"] for n, m in report["modules"].items()} == allocate("global", prof.matrices(), 0.6,
                                                                             tokens=prof.tokens, floor=0.75)
    assert report["allocation"]["alloc_floor"] == 0.75


def test_the_plan_counts_the_allocated_ranks(tiny, profiled):
    ckpt = Checkpoint(tiny)
    prof = profile_module.read_profile(profiled)
    ranks = allocate("global", prof.matrices(), 0.4, tokens=prof.tokens)
    shapes = block_linears(ckpt, "model.layers.1.", 0.4, "eig", ranks=ranks)
    assert {s.name: s.rank for s in shapes} == {n[len("model.layers.1."):]: r for n, r in ranks.items() if ".layers.1." in n}
    cfg = _job(tiny, "out")
    full = {n: min(prof.meta["shapes"][n]) for n in ranks}
    assert build_plan(cfg, ckpt, ranks=full).disk_bytes > build_plan(cfg, ckpt, ranks=ranks).disk_bytes


def test_bad_allocation_flags_end_with_one_error_and_a_fix(tiny, profiled, tmp_path, capsys):
    import shutil

    base = ["run", str(tiny), str(tmp_path / "out"), "--calib-samples", str(SAMPLES), "--seqlen", str(SEQLEN), "--no-progress"]
    edited = {}
    for what, edit in (("newer", {"version": 99}), ("unweighted", {"sensitivity": {}})):  # both ran on, unseen
        edited[what] = shutil.copytree(profiled, tmp_path / what)
        meta = json.loads((edited[what] / profile_module.PROFILE_JSON).read_text())
        (edited[what] / profile_module.PROFILE_JSON).write_text(json.dumps({**meta, **edit}))
    for extra, says in [(["--rank-multiple", "0"], "--rank-multiple 0"),
                        (["--alloc", "global", "--alloc-floor", "1.5"], "--alloc-floor 1.5 is out of range"),
                        (["--alloc", "global", "--profile", str(tmp_path / "none")], "not a finished streamsvd profile"),
                        (["--alloc", "global", "--profile", str(profiled), "--seed", "5"], "other settings than this run: --seed"),
                        (["--profile-samples", "5"], "--profile-samples 5 is out of range"),  # below the 6 sensitivity windows
                        (["--alloc", "uniform", "--profile-samples", "8"], "--profile-samples without a profile"),
                        (["--profile", str(profiled), "--profile-samples", "8"], "with --profile the run makes none"),
                        (["--alloc", "global", "--profile", str(profiled), "--ratio", "0.95", "--rank-multiple", "32"],
                         "smallest ranks allowed"),
                        (["--alloc", "global", "--profile", str(edited["newer"])], "written by streamsvd 99, newer"),
                        (["--alloc", "global", "--profile", str(edited["unweighted"])], "sensitivity weights are not one per")]:
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert "error: " in err and says in err and "fix: " in err and "Traceback" not in err
        assert not (tmp_path / "out").exists()  # refused before anything was written
    with pytest.raises(StreamSVDError):
        _job(tiny, tmp_path / "o", alloc="best").validate()


def test_a_rank_multiple_the_budget_cannot_hold_is_refused_before_profiling(tiny, profiled, tmp_path, monkeypatch, capsys):
    """The smallest ranks allowed above the --ratio budget were refused by the allocator, after the job's own profile
    (minutes on a real model); now from the shapes alone, by the same rule, before anything is read or written."""
    from streamsvd.job.pipeline import CompressionJob, model_matrices

    _no_profiling(monkeypatch)
    base = ["run", str(tiny), str(tmp_path / "out"), "--calib-samples", str(SAMPLES), "--seqlen", str(SEQLEN), "--no-progress"]
    for extra, says in [(["--rank-multiple", "1000"], "(multiples of 1000) need 129024 parameters"),
                        (["--alloc", "uniform", "--rank-multiple", "1000"], "(multiples of 1000)"),
                        (["--alloc", "v2", "--rank-multiple", "1000"], "(multiples of 1000)"),
                        (["--ratio", "0.999"], "(rank 1) need")]:
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert "error: the smallest ranks allowed " + says in err and "fix: " in err and "Traceback" not in err
        assert ("--rank-multiple" in err.split("fix: ")[1]) == ("--rank-multiple" in extra)  # no multiple to lower at 1
        assert not (tmp_path / "out").exists()  # no profile, nothing written
    # the matrices checked are the profile's, so the early refusal is the allocator's
    prof = profile_module.read_profile(profiled)
    shapes = {a.name: [a.m, a.n] for a in model_matrices(CompressionJob(_job(tiny, tmp_path / "o", alloc="global")).model)}
    assert shapes == prof.meta["shapes"]
    with pytest.raises(StreamSVDError, match="multiples of 1000"):
        allocate("global", prof.matrices(), 0.4, multiple=1000)


def test_max_loss_target_gives_the_smallest_model_that_meets_it(tiny, profiled, tmp_path, monkeypatch):
    _no_profiling(monkeypatch)
    sizes = []
    for target in (0.3, 0.05):
        report = run_job(_job(tiny, tmp_path / f"out-{target}", max_loss=target, profile=profiled))
        alloc = report["allocation"]
        assert alloc["max_loss"] == target and alloc["alloc"] == "global"
        assert alloc["relative_loss"] <= target + 1e-9
        sizes.append(report["linear_params_after"])
        md = (tmp_path / f"out-{target}" / "streamsvd_report.md").read_text()
        assert "predicted relative loss" in md
        # the size came from the target: no ratio was asked for (0.4, the unused default, was recorded)
        assert report["ratio_requested"] is None and "a quality target" in md and "requested ratio" not in md
        config = json.loads((tmp_path / f"out-{target}" / "config.json").read_text())
        assert config["streamsvd"]["ratio"] is None
    assert sizes[0] < sizes[1]  # a looser target, a smaller model
    with pytest.raises(StreamSVDError, match="max-loss"):
        _job(tiny, tmp_path / "o", max_loss=1.5).validate()
    with pytest.raises(StreamSVDError, match="v2"):
        _job(tiny, tmp_path / "o", max_loss=0.1, alloc="v2").validate()


def test_allocated_ranks_with_compensation_and_refinement(tiny, profiled, tmp_path, monkeypatch):
    """The grouped path (sequential calibration, compensation, refinement) factors at the allocated ranks too."""
    _no_profiling(monkeypatch)
    prof = profile_module.read_profile(profiled)
    report = run_job(_job(tiny, tmp_path / "out", ratio=0.4, alloc="global", profile=profiled, calibrate="sequential",
                          compensate=True, anchor=0.1, refine_steps=3))
    assert {n: m["rank"] for n, m in report["modules"].items()} == allocate("global", prof.matrices(), 0.4, tokens=prof.tokens)
    assert streamsvd.load(tmp_path / "out") is not None


def test_a_run_or_plan_reading_a_profile_being_made_is_refused_naming_the_maker(tiny, profiled, tmp_path, capsys):
    """`run --profile P` took no lock: a profile made again in P meanwhile was read half written and refused as damaged,
    with the fix to make it again (a probe, 2026-12-07). The maker's lock is now checked first."""
    from streamsvd.job.lock import DirLock

    making = DirLock(profiled, "PROFILE_DIR").acquire()  # what `streamsvd profile` holds while it writes P
    try:
        for command in (["run", str(tiny), str(tmp_path / "out")], ["plan", str(tiny)]):
            assert main([*command, "--profile", str(profiled), "--calib-samples", str(SAMPLES), "--seqlen", str(SEQLEN),
                         "--no-progress"]) == 2
            err = capsys.readouterr().err
            assert f"--profile {profiled} is being made by another streamsvd command: process" in err, err
            assert "Traceback" not in err and not (tmp_path / "out").exists()
    finally:
        making.release()
    assert main(["run", str(tiny), str(tmp_path / "out"), "--profile", str(profiled), "--calib-samples", str(SAMPLES),
                 "--seqlen", str(SEQLEN), "--no-progress", "--no-plots"]) == 0
