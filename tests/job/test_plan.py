"""The memory planner (`streamsvd plan`, job/plan.py) and the budget as a checked promise."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from streamsvd.cli import main
from streamsvd.io.checkpoint import Checkpoint
from streamsvd.job.pipeline import CompressionJob, JobConfig
import streamsvd.job.plan as plan_module
from streamsvd.job.plan import OPTIONAL_STAGES, STAGES, PlanInputs, cpu_batch, keep_stage, make_plan
from tiny_models import make_tiny_checkpoint

FAST = ["--calib-samples", "4", "--seqlen", "32"]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("plan") / "model")


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 400)
    return path


def plan_json(capsys, model, *flags, status=0) -> dict:
    assert main(["plan", str(model), *map(str, flags), "--json"]) == status
    return json.loads(capsys.readouterr().out)


def test_plan_json_has_the_promised_figures(capsys, tiny, text):
    plan = plan_json(capsys, tiny, "--calib", text, *FAST, "--max-mem", "4G")
    for key in ("min_max_mem_bytes", "peak_bytes", "disk_bytes", "seconds_estimate", "batch_size", "routes", "stage_bytes"):
        assert key in plan, key
    assert set(plan["stage_bytes"]) == set(STAGES) - set(OPTIONAL_STAGES)
    assert plan["strict_min_bytes"] <= plan["peak_bytes"] <= plan["budget_bytes"] == 4 << 30
    assert plan["min_max_mem_bytes"] > plan["strict_min_bytes"]
    assert plan["batch_size"] == 4  # a roomy budget takes every sample in one batch
    assert plan["baseline_bytes"] > 50 << 20  # measured RSS of a process with torch loaded, not a constant
    assert plan["seconds_estimate"] > 0
    assert plan["cpu_threads"] == torch.get_num_threads()  # the speed was measured with them (torchrun: 1 each)
    # Compensated (the default), down_proj (64 x 160) needs its 160 x 160 statistics: the input side.
    down = next(v for k, v in plan["routes"].items() if k.startswith("mlp.down_proj"))
    assert down.startswith("input side")
    # Without compensation eig factors it on its output side; the q/k/v input is shared, so q/k/v stay on the input side.
    plain = plan_json(capsys, tiny, "--calib", text, *FAST, "--max-mem", "4G", "--no-compensate")
    routes = plain["routes"]
    assert next(v for k, v in routes.items() if k.startswith("mlp.down_proj")).startswith("output side")
    assert next(v for k, v in routes.items() if k.startswith("self_attn.q_proj")).startswith("input side")
    assert plain["disk"]["work files"] * 2 == plan["disk"]["work files"]  # compensation's second stream
    assert next(v for k, v in plan["routes"].items() if k.startswith("self_attn.k_proj")).startswith("input side")


def test_plan_text_names_every_stage(capsys, tiny, text):
    assert main(["plan", str(tiny), "--calib", str(text), *FAST]) == 0
    out = capsys.readouterr().out
    for stage in STAGES:
        assert (f"  {stage} " in out) == (stage not in OPTIONAL_STAGES), stage
    assert "ESTIMATE" in out and "smallest workable --max-mem" in out


def test_batch_grows_with_the_budget_and_is_one_at_the_minimum(tiny, monkeypatch):
    monkeypatch.setattr(plan_module, "CPU_BATCH_TOKENS", 1 << 30)  # the CPU's cap out of the way: the largest that fits
    ckpt = Checkpoint(tiny)
    settings = PlanInputs(calib_samples=64, seqlen=128, plots=False)  # for this tiny model the pictures would set the minimum
    base = 400 << 20
    low = make_plan(ckpt, "model.layers", settings, budget=1, baseline=base)
    assert low.batch_size == 1 and low.peak_bytes == low.strict_min_bytes  # the minimum is the peak at batch 1
    assert low.min_max_mem_bytes > low.strict_min_bytes  # plus the margin for another process's baseline
    at_min = make_plan(ckpt, "model.layers", settings, budget=low.strict_min_bytes, baseline=base)
    assert at_min.peak_bytes <= at_min.budget_bytes
    bigger = make_plan(ckpt, "model.layers", settings, budget=low.strict_min_bytes + (40 << 20), baseline=base)
    assert at_min.batch_size < bigger.batch_size < 64 and bigger.peak_bytes <= bigger.budget_bytes
    assert make_plan(ckpt, "model.layers", settings, budget=1 << 40, baseline=base).batch_size == 64


def test_the_cpu_takes_about_2048_tokens_a_batch_and_a_gpu_the_largest_that_fits(tiny):
    ckpt = Checkpoint(tiny)
    base = 400 << 20
    for seqlen, want in ((128, 16), (512, 4), (768, 3), (2048, 1), (4096, 1)):
        assert cpu_batch(seqlen) == want
        settings = PlanInputs(calib_samples=64, seqlen=seqlen, plots=False)
        assert make_plan(ckpt, "model.layers", settings, budget=1 << 40, baseline=base).batch_size == want, seqlen
    settings = PlanInputs(calib_samples=64, seqlen=128, plots=False)
    low = make_plan(ckpt, "model.layers", settings, budget=1, baseline=base)
    tight = make_plan(ckpt, "model.layers", settings, budget=low.strict_min_bytes, baseline=base)
    assert tight.batch_size < 16 and tight.peak_bytes <= tight.budget_bytes  # the budget still comes first
    assert make_plan(ckpt, "model.layers", settings, budget=1 << 40, baseline=base, fixed_batch=40).batch_size == 40
    gpu = PlanInputs(calib_samples=64, seqlen=128, plots=False, device="cuda")
    assert make_plan(ckpt, "model.layers", gpu, budget=1 << 40, baseline=base, gpu_budget=1 << 40).batch_size == 64


def test_a_replan_after_the_own_profile_keeps_the_profiles_planned_peak(tiny):
    # run's summary sets the planned peak beside the measured one; the profile's stage is the peak of a default job
    ckpt = Checkpoint(tiny)
    first = make_plan(ckpt, "model.layers", PlanInputs(plots=False), budget=1 << 40, baseline=0)
    first.stage_bytes = {"profile": first.peak_bytes + 1000, **first.stage_bytes}
    first.components = {"profile": {"the profile's own plan": first.peak_bytes + 1000}, **first.components}
    again = make_plan(ckpt, "model.layers", PlanInputs(plots=False), budget=1 << 40, baseline=0)
    keep_stage(again, first, "profile")
    assert again.peak_bytes == first.peak_bytes + 1000 and again.stage_bytes["profile"] == again.peak_bytes
    assert "profile" in again.components
    plain = make_plan(ckpt, "model.layers", PlanInputs(plots=False), budget=1 << 40, baseline=0)
    keep_stage(plain, dataclasses.replace(again, stage_bytes={}), "profile")  # no such stage: unchanged
    assert "profile" not in plain.stage_bytes


def test_cholesky_keeps_the_input_side(tiny):
    plan = make_plan(Checkpoint(tiny), "model.layers", PlanInputs(method="cholesky"), budget=1 << 40, baseline=0)
    assert all(v.startswith("input side") for v in plan.routes.values())


def test_plan_disk_figure_matches_what_the_job_writes(tiny, text, tmp_path):
    cfg = JobConfig(alloc="uniform", model_dir=tiny, out_dir=tmp_path / "out", calib=[str(text)], calib_samples=4, seqlen=32, progress=False)
    job = CompressionJob(cfg)
    assert job.plan.disk["work files"] == 2 * 2 * 4 * 32 * 64 * 4  # two files, each with both streams (compensation)
    job.run()
    written = sum(p.stat().st_size for p in cfg.out_dir.rglob("*") if p.is_file() and not p.name.startswith("streamsvd_"))
    assert 0.9 < written / job.plan.disk["output"] < 1.1


def test_plan_json_says_when_run_would_refuse(capsys, tiny, text):
    """`run_refuses`: empty where run would start, a reason where it would refuse (the text said so, the JSON not)."""
    roomy = plan_json(capsys, tiny, "--calib", text, *FAST, "--max-mem", "4G")
    assert roomy["run_refuses"] == []
    assert main(["plan", str(tiny), "--calib", str(text), *FAST, "--max-mem", str(roomy["strict_min_bytes"] - (8 << 20)),
                 "--json"]) == 2  # refused as run refuses it (it exited 0), the plan still printed for scripts
    out, err = capsys.readouterr()
    low = json.loads(out)
    assert [r for r in low["run_refuses"] if "below the smallest workable" in r]
    assert err.startswith("error: --max-mem ") and "is too small: this job needs at least" in err and "\n  fix: give --max-mem" in err
    assert main(["plan", str(tiny), "--calib", str(text), *FAST, "--max-mem", "1"]) == 2
    out, err = capsys.readouterr()
    assert "disk:" in out and "`run` would refuse it" in out and err.count("error:") == 1 and "Traceback" not in err
    import psutil

    beyond = plan_json(capsys, tiny, "--calib", text, *FAST, "--max-mem", str(2 * psutil.virtual_memory().total))
    assert beyond["budget_bytes"] == 2 * psutil.virtual_memory().total  # planned all the same: another machine's
    assert [r for r in beyond["run_refuses"] if "more than this machine's RAM" in r]


def test_windows_that_draw_the_text_many_times_over_are_warned_about(capsys, tiny, tmp_path):
    """A text far shorter than --calib-samples x --seqlen was taken silently (100000 windows of a 200 kB text ran
    579 s): the windows overlap, each token used many times."""
    short = tmp_path / "short.txt"
    short.write_text("The quick brown fox jumps over the lazy dog. " * 5)  # 165 tokens of the tiny tokenizer
    assert main(["plan", str(tiny), "--calib", str(short), "--calib-samples", "64", "--seqlen", "32"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "times" in err and "--calib-samples" in err
    assert main(["plan", str(tiny), "--calib", str(short), "--calib-samples", "2", "--seqlen", "32"]) == 0
    assert "warning:" not in capsys.readouterr().err


def test_plan_refuses_a_streamsvd_output_as_model_dir(capsys, tiny, text, tmp_path):
    out = tmp_path / "out"
    assert main(["run", str(tiny), str(out), "--calib", str(text), *FAST, "--no-progress", "--alloc", "uniform"]) == 0
    capsys.readouterr()
    assert main(["plan", str(out), "--calib", str(text), *FAST]) == 2
    err = capsys.readouterr().err
    assert "is a streamsvd output" in err and "fix:" in err and "Traceback" not in err


def test_budget_below_the_minimum_is_refused_before_anything_is_written(capsys, tiny, text, tmp_path):
    plan = plan_json(capsys, tiny, "--calib", text, *FAST)
    minimum = plan["min_max_mem_bytes"]
    out = tmp_path / "out"
    rc = main(["run", str(tiny), str(out), "--calib", str(text), *FAST, "--no-progress", "--max-mem",
               str(plan["strict_min_bytes"] - (8 << 20))])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("error: ") == 1 and "fix:" in err and "Traceback" not in err
    assert "too small" in err and "set by the" in err and "stage" in err
    named = int(re.search(r"needs at least [^(]*\((\d+) bytes", err).group(1))
    # The baseline is this process's RSS, re-measured by run: the same minimum up to a few MiB of drift.
    assert abs(named - minimum) < (4 << 20) and named > minimum - (8 << 20)
    assert not out.exists()


@pytest.mark.parametrize("flags", [[], ["--no-compensate", "--alloc", "uniform"]])
def test_measured_peak_stays_within_the_budget_in_a_subprocess(capsys, tiny, text, tmp_path, flags):
    """The sampler's figures in a real `streamsvd run` process at the planner's minimum budget."""
    minimum = plan_json(capsys, tiny, "--calib", text, *FAST, *flags)["min_max_mem_bytes"]
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "streamsvd.cli", "run", str(tiny), str(out), "--calib", str(text), *FAST, "--no-progress",
         "--max-mem", str(minimum), *flags],
        capture_output=True, text=True, cwd=REPO, env={**__import__("os").environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr
    run = json.loads((out / "streamsvd_runs.jsonl").read_text().splitlines()[-1])
    assert run["max_mem_bytes"] == minimum
    assert run["threads"] == torch.get_num_threads()  # the worker's share, through OMP_NUM_THREADS (tests/conftest.py)
    assert 0 < run["cpu_seconds"] <= run["seconds"] * __import__("os").cpu_count() + 1
    assert f"of {run['threads']} CPU threads busy on average" in proc.stdout
    assert set(run["peak_rss_by_stage"]) <= set(STAGES) and {"statistics", "factorize", "write"} <= set(run["peak_rss_by_stage"])
    assert 0 < run["peak_rss_bytes"] <= minimum, run
    assert max(run["peak_rss_by_stage"].values()) <= run["peak_rss_bytes"]
    assert "measured peak / budget" in proc.stdout
    # The report (byte-identical across interruptions) carries no run-dependent figure.
    assert "peak_rss" not in (out / "streamsvd_report.json").read_text()


def test_the_pictures_are_a_planned_stage_and_no_plots_drops_it(tiny):
    from streamsvd.job.plan import PLOT_BYTES

    ckpt, base = Checkpoint(tiny), 400 << 20
    on = make_plan(ckpt, "model.layers", PlanInputs(), budget=1 << 40, baseline=base)
    off = make_plan(ckpt, "model.layers", PlanInputs(plots=False), budget=1 << 40, baseline=base)
    assert on.components["plots"]["matplotlib and figures"] == PLOT_BYTES and on.components["plots"]["spectra"] > 0
    assert "matplotlib and figures" not in off.components["plots"]
    assert on.stage_bytes["plots"] > off.stage_bytes["plots"] + PLOT_BYTES // 2
    assert on.min_stage == "plots" and on.min_max_mem_bytes > off.min_max_mem_bytes  # tiny model: the pictures set it


def test_the_profiles_weighted_grams_are_planned(tiny):
    """`streamsvd profile` with sensitivity holds one token-weighted Gram per linear on its smaller side (float64)."""
    ckpt, base = Checkpoint(tiny), 400 << 20
    plain = make_plan(ckpt, "model.layers", PlanInputs(propagate="original", profile=True), budget=1 << 40, baseline=base)
    weighted = make_plan(ckpt, "model.layers", PlanInputs(propagate="original", weighted_energies=True, profile=True),
                         budget=1 << 40, baseline=base)
    shapes = [ckpt.shape(k) for k in ckpt.keys() if k.startswith("model.layers.0.") and k.endswith("proj.weight")]
    extra = sum(8 * min(shape) ** 2 for shape in shapes)
    assert weighted.components["statistics"]["statistics"] == plain.components["statistics"]["statistics"] + extra
    assert weighted.components["factorize"]["statistics"] == plain.components["factorize"]["statistics"] + extra


def test_the_profiles_backward_pass_and_the_heldout_windows_are_planned_stages(tiny, tmp_path):
    """The head is read only to score windows: its stored pages and float32 copy are in the `heldout` stage (a
    --max-ppl-increase job) and in the profile's `sensitivity (head)` stage, with a chunk of logits, never a
    whole window's; the blocks' backward walk holds every linear's per-token squared gradients, and under
    torchrun three more copies while they are summed over the processes."""
    from streamsvd.job.evaluate import LOGIT_CHUNK

    ckpt, base = Checkpoint(tiny), 400 << 20
    vocab, hidden = ckpt.shape("lm_head.weight") if "lm_head.weight" in ckpt else ckpt.shape("model.embed_tokens.weight")
    plain = make_plan(ckpt, "model.layers", PlanInputs(), budget=1 << 40, baseline=base)
    assert not set(OPTIONAL_STAGES) & set(plain.stage_bytes)
    held = make_plan(ckpt, "model.layers", PlanInputs(heldout_samples=8), budget=1 << 40, baseline=base)
    # a float32 head is used as it is stored; a bfloat16 one is converted (its pages and the copy)
    assert held.components["heldout"]["head (stored pages)"] == 4 * vocab * hidden
    assert "head (float32)" not in held.components["heldout"]
    assert held.components["heldout"]["logits"] == 3 * LOGIT_CHUNK * vocab * 4
    half = Checkpoint(make_tiny_checkpoint("llama", tmp_path / "bf16", dtype=torch.bfloat16))
    held = make_plan(half, "model.layers", PlanInputs(heldout_samples=8), budget=1 << 40, baseline=base).components["heldout"]
    assert held["head (stored pages)"] == 2 * vocab * hidden and held["head (float32)"] == 4 * vocab * hidden
    prof = [make_plan(ckpt, "model.layers", PlanInputs(propagate="original", seqlen=512, weighted_energies=True,
                                                      sensitivity_samples=16, processes=p), budget=1 << 40, baseline=base)
            for p in (1, 2)]
    head = prof[0].components["sensitivity (head)"]
    assert head["head (stored pages)"] == 4 * vocab * hidden and head["logits and their gradients"] == 4 * LOGIT_CHUNK * vocab * 4
    assert head["gradients"] == 16 * 512 * hidden * 4 == 2 * prof[1].components["sensitivity (head)"]["gradients"]
    blocks = [p.components["sensitivity (blocks)"] for p in prof]
    linears = sum(1 for k in ckpt.keys() if ".layers." in k and k.endswith("proj.weight"))
    assert blocks[0]["per-token weights"] == linears * 16 * 512 * 8
    assert "their sum over the processes" not in blocks[0] and blocks[1]["their sum over the processes"] == 3 * blocks[0]["per-token weights"]


def test_a_profile_plans_its_backward_pass(tiny):
    """ProfileConfig.plan passes its sensitivity windows (at most the calibration's) and held-out windows on."""
    from streamsvd.job.profile import ProfileConfig

    plan = ProfileConfig(tiny, Path("unused"), calib_samples=4, seqlen=32, sensitivity_samples=16, heldout_samples=2,
                         batch_size=1).plan(Checkpoint(tiny))
    assert plan.components["sensitivity (head)"]["gradients"] == 4 * 32 * Checkpoint(tiny).shape("model.embed_tokens.weight")[1] * 4
    assert "heldout" in plan.stage_bytes
    none = ProfileConfig(tiny, Path("unused"), calib_samples=4, seqlen=32, sensitivity_samples=0, batch_size=1).plan(Checkpoint(tiny))
    assert not set(OPTIONAL_STAGES) & set(none.stage_bytes)


def test_a_profile_process_stays_within_its_plan_stage_by_stage(tiny, text, tmp_path):
    """`streamsvd profile` samples its RSS per planned stage (profile_log.json): with sensitivity and held-out
    windows every stage it ran is a stage of its plan, and each stage's peak is at or under that stage's plan."""
    out = tmp_path / "prof"
    proc = subprocess.run(
        [sys.executable, "-m", "streamsvd.cli", "profile", str(tiny), str(out), "--calib", str(text), "--calib-samples", "4",
         "--seqlen", "32", "--sensitivity-samples", "2", "--heldout-samples", "2", "--no-progress"],
        capture_output=True, text=True, cwd=REPO, env={**__import__("os").environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr
    log = json.loads((out / "profile_log.json").read_text())
    measured, planned = log["peak_rss_by_stage"], log["planned_bytes_by_stage"]
    assert {"sensitivity (head)", "sensitivity (blocks)", "statistics", "factorize", "heldout"} <= set(measured) <= set(planned)
    for stage, peak in measured.items():
        assert 0 < peak <= planned[stage], (stage, peak, planned[stage])


def test_under_torchrun_the_rounded_tensors_travel_with_the_factors_and_are_planned(tiny):
    """--quant under torchrun: the owner of a linear sends its rounded tensors with its factors (World.spread)."""
    from streamsvd.math.factorize import stored_numel
    from streamsvd.math.quantize import QuantSpec, stored_linear_bytes
    from streamsvd.job.plan import block_linears

    ckpt, base = Checkpoint(tiny), 400 << 20
    spec = QuantSpec("int4", 32)
    plain = make_plan(ckpt, "model.layers", PlanInputs(processes=2), budget=1 << 40, baseline=base)
    quant = make_plan(ckpt, "model.layers", PlanInputs(processes=2, quant=spec), budget=1 << 40, baseline=base)
    one = make_plan(ckpt, "model.layers", PlanInputs(quant=spec), budget=1 << 40, baseline=base)
    linears = block_linears(ckpt, "model.layers.0.", 0.4, "eig")
    packed = sum(stored_linear_bytes(s.out_features, s.in_features, s.rank, s.factors, s.itemsize, spec) for s in linears)
    assert quant.components["factorize"]["broadcast factors"] == plain.components["factorize"]["broadcast factors"] + 2 * packed
    assert "broadcast factors" not in one.components["factorize"]


def test_under_torchrun_refinement_plans_its_gradient_broadcast(tiny):
    """--refine-steps under torchrun: each step's gradients travel as one flat tensor of the factors' size."""
    ckpt, base = Checkpoint(tiny), 400 << 20
    one = make_plan(ckpt, "model.layers", PlanInputs(refine_steps=5), budget=1 << 40, baseline=base).components["refine"]
    two = make_plan(ckpt, "model.layers", PlanInputs(refine_steps=5, processes=2), budget=1 << 40, baseline=base).components["refine"]
    assert "gradient broadcast" not in one and two["gradient broadcast"] == one["optimiser"] // 4 > 0


@pytest.mark.parametrize("extra", [{"compensate": False, "alloc": "uniform"}, {}])  # one pass; the default
def test_each_original_weight_is_gone_before_the_next_linear_is_factored(tiny, text, tmp_path, monkeypatch, extra):
    """The plan's factorize stage counts one linear's compute-dtype factors beside the stored ones, because each
    original weight is released as its factors replace it (job/stages.factor_block), not at the block's end; and
    one copy of the block's weights, because a compensated job's untouched block goes once its pass has run."""
    import gc
    import weakref

    import streamsvd.job.pipeline as pipeline
    import streamsvd.job.stages as stages
    import streamsvd.math.compensate as compensate

    seen, alive_at_call, originals_alive_at_call = [], [], []

    def watch(real):
        def wrapped(weight, *args, **kwargs):
            alive_at_call.append(sum(ref() is not None for ref in seen))
            originals_alive_at_call.append(sum(ref() is not None for ref in originals))
            result = real(weight, *args, **kwargs)
            seen.append(weakref.ref(weight))
            return result
        return wrapped

    monkeypatch.setattr(stages, "factorize", watch(stages.factorize))
    monkeypatch.setattr(stages, "factorize_output_side", watch(stages.factorize_output_side))
    monkeypatch.setattr(stages, "factorize_compensated", watch(stages.factorize_compensated))
    # compensating: the untouched block beside the compressed one is gone before the first factorisation too
    originals = []

    def collect(*args, original=None, **kwargs):
        if original is not None:
            originals.append(weakref.ref(original))
        return real_collect(*args, original=original, **kwargs)

    real_collect = pipeline.collect_group_statistics
    monkeypatch.setattr(pipeline, "collect_group_statistics", collect)

    gc.disable()  # refcounts alone must free them
    try:
        CompressionJob(JobConfig(model_dir=tiny, out_dir=tmp_path / "out", calib=[str(text)], calib_samples=4, seqlen=32,
                                 progress=False, **extra)).run()
    finally:
        gc.enable()
    assert len(alive_at_call) >= 14  # two blocks of seven linears
    assert alive_at_call == [0] * len(alive_at_call)  # no earlier weight (or compensated target W*) is alive
    assert bool(originals) == extra.get("compensate", True)  # one untouched block per block when compensating
    assert originals_alive_at_call == [0] * len(alive_at_call)


def test_a_compensated_linear_plans_w_c_and_w_star_beside_its_factorisation(tmp_path, monkeypatch):
    """Compensating, W C is held from before W* is made until the output error is taken, and W* through the
    factorisation (math/compensate.py: W* made a row chunk at a time, the output error from the factors). On a
    70B-shape block the plan that counted W* alone was 3 GiB under the measured factorize stage; the count per
    linear is measured against the peak by tools/bench_compensate_memory.py (docs/RESULTS.md)."""
    import dataclasses

    import streamsvd.job.plan as plan

    # as at 70B: down_proj's input over COMPENSATE_MAX_IN keeps the output side, so gate/up sets the workspace
    monkeypatch.setattr(plan, "COMPENSATE_MAX_IN", 256)
    model = make_tiny_checkpoint("llama", tmp_path / "model", hidden_size=256, intermediate_size=2048)
    ckpt = Checkpoint(model)
    m, n = 2048, 256  # gate_proj / up_proj (large enough that they, not down_proj's output side, set the workspace)
    comp = make_plan(ckpt, "model.layers", PlanInputs(compensate=True), budget=1 << 40, baseline=0)
    assert [v for k, v in comp.routes.items() if k.startswith("mlp.down_proj")][0].startswith("output side")
    gate = next(s for s in plan.block_linears(ckpt, "model.layers.0.", 0.4, "eig", compensated=True) if s.name == "mlp.gate_proj")
    assert (gate.out_features, gate.in_features) == (m, n)
    label, counted = plan.input_route_workspace(gate, "eig", compensated=True)
    _, route = plan.input_route_workspace(dataclasses.replace(gate), "eig")
    assert counted == 8 * 2 * m * n + route and "W C and W* held" in label
    assert comp.components["factorize"]["workspace"] == counted


def test_the_refusal_names_a_lighter_job_where_a_factorisation_sets_the_minimum(tiny):
    """--seqlen does not lower a minimum that a factorisation sets; the fix line says what does."""
    import dataclasses

    from streamsvd.errors import StreamSVDError
    from streamsvd.job.plan import refuse_if_too_small

    plan = make_plan(Checkpoint(tiny), "model.layers", PlanInputs(compensate=True), budget=1 << 40, baseline=0)
    hints = {}
    for stage in ("factorize", "statistics"):
        with pytest.raises(StreamSVDError) as err:
            refuse_if_too_small(dataclasses.replace(plan, budget_bytes=1, min_stage=stage))
        hints[stage] = err.value.fix
    assert "--no-compensate" in hints["factorize"] and "--seqlen" not in hints["factorize"]
    assert "--seqlen" in hints["statistics"]


def _flags(command: str) -> set[str]:
    from streamsvd.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    return {o for a in sub._actions for o in a.option_strings}


def test_plan_takes_every_flag_of_run_and_plans_those_that_change_a_plan(capsys, tiny, text, tmp_path):
    """Issue 6 item 1: 'same arguments as run'. plan lacked --batch-size, --profile, --max-ppl-increase and nine
    more, so a run command could not be planned as typed (an argparse error), and those that change the plan were
    not planned."""
    assert _flags("run") <= _flags("plan") and _flags("plan") - _flags("run") == {"--nproc", "--json"}
    base = ["--calib", text, *FAST, "--max-mem", "4G"]
    assert plan_json(capsys, tiny, *base, "--batch-size", 2)["batch_size"] == 2
    held = plan_json(capsys, tiny, *base, "--max-ppl-increase", 0.5, "--heldout-samples", 3)
    assert "heldout" in held["stage_bytes"] and held["disk_bytes"] > plan_json(capsys, tiny, *base)["disk_bytes"]
    assert main(["profile", str(tiny), str(tmp_path / "prof"), "--calib", str(text), *FAST, "--no-progress"]) == 0
    capsys.readouterr()
    own = plan_json(capsys, tiny, *base)
    given = plan_json(capsys, tiny, *base, "--profile", tmp_path / "prof")
    assert "profile" in own["stage_bytes"] and "profile" not in given["stage_bytes"]
    # a profile run would refuse, plan refuses: none there, or made from other calibration settings
    assert main(["plan", str(tiny), *map(str, base), "--profile", str(tmp_path / "none")]) == 2
    assert main(["plan", str(tiny), *map(str, base), "--seed", "1", "--profile", str(tmp_path / "prof")]) == 2
    err = capsys.readouterr().err
    assert "is not a finished streamsvd profile" in err and "made with other settings than this run: --seed" in err
    # a run command as typed: the flags that change nothing in a plan are taken
    same = plan_json(capsys, tiny, *base, "--restart", "--no-progress", "--shrink", 0.1, "--work-dir", tmp_path / "w")
    assert same["batch_size"] == own["batch_size"] and same["disk_bytes"] == own["disk_bytes"]
    # and what run refuses as contradictory, plan refuses the same way
    assert main(["plan", str(tiny), *map(str, base), "--ratio", "0.3", "--max-loss", "0.1"]) == 2
    assert main(["plan", str(tiny), *map(str, base), "--alloc", "uniform", "--alloc-floor", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "both set the model's size" in err and "--alloc-floor applies to --alloc global" in err
    assert err.count("fix:") == 2



def test_plan_says_run_would_refuse_a_batch_size_above_the_budget(capsys, tiny, text):
    """`plan --batch-size B --max-mem M` with B's peak above M listed nothing in `run_refuses` (run refuses it:
    '--batch-size B needs ..., more than --max-mem'), and its note called B 'the interrupted job's'."""
    from streamsvd.cli import _plan_refusals

    ckpt, settings = Checkpoint(tiny), PlanInputs(calib_samples=64, seqlen=256, plots=False)
    one = make_plan(ckpt, "model.layers", settings, budget=1 << 40, baseline=0, fixed_batch=1)
    at_64 = make_plan(ckpt, "model.layers", settings, budget=1 << 40, baseline=0, fixed_batch=64)
    budget = (one.peak_bytes + at_64.peak_bytes) // 2  # batch 1 fits, batch 64 does not
    tight = make_plan(ckpt, "model.layers", settings, budget=budget, baseline=0, fixed_batch=64)
    assert tight.strict_min_bytes <= budget < tight.peak_bytes
    assert [r for r in _plan_refusals(tight, None, 64) if "--batch-size" in r]
    fits = make_plan(ckpt, "model.layers", settings, budget=budget, baseline=0, fixed_batch=1)
    assert _plan_refusals(fits, None, 1) == []
    assert main(["plan", str(tiny), "--calib", str(text), *FAST, "--batch-size", "2", "--max-mem", "4G"]) == 0
    out = capsys.readouterr().out
    assert "batch 2 is fixed (--batch-size" in out and "interrupted job's (kept" not in out.split("fixed")[0]


def test_the_smallest_budget_of_a_fixed_batch_is_that_batchs_peak(tiny):
    """`plan --batch-size B --json` printed batch 1's minimum as min_max_mem_bytes, and `run` refused it ('--batch-size
    B needs ..., more than --max-mem'; measured: SmolLM2's first 2 blocks, --batch-size 16, 784 MiB printed, 1046 needed)."""
    from streamsvd.cli import _plan_refusals

    ckpt, settings = Checkpoint(tiny), PlanInputs(calib_samples=64, seqlen=256, plots=False)
    one = make_plan(ckpt, "model.layers", settings, budget=1 << 40, baseline=0)
    at_64 = make_plan(ckpt, "model.layers", settings, budget=1 << 40, baseline=0, fixed_batch=64)
    assert one.min_max_mem_bytes < at_64.min_max_mem_bytes == at_64.peak_bytes + plan_module.BASELINE_MARGIN_BYTES
    at_min = make_plan(ckpt, "model.layers", settings, budget=at_64.min_max_mem_bytes, baseline=0, fixed_batch=64)
    assert at_min.fits() and _plan_refusals(at_min, None, 64) == []


def test_plan_refuses_the_ranks_run_refuses_and_plans_a_given_profiles_ranks(capsys, tiny, text, tmp_path):
    """plan --rank-multiple 1000 (smallest ranks above the --ratio budget) planned a job, with an empty run_refuses,
    that run refuses before it profiles; with --profile it planned --ratio's uniform ranks, not the profile's
    allocation that run takes (and refuses where the budget cannot hold it)."""
    base = ["--calib", str(text), *FAST, "--max-mem", "4G"]
    for extra in ([], ["--alloc", "uniform"]):
        assert main(["plan", str(tiny), *base, "--rank-multiple", "1000", *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and "multiples of 1000" in err and "fix:" in err
    assert main(["profile", str(tiny), str(tmp_path / "prof"), *base[:-2], "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["plan", str(tiny), *base, "--profile", str(tmp_path / "prof"), "--rank-multiple", "1000"]) == 2
    assert "multiples of 1000" in capsys.readouterr().err
    # the disk the plan counts is that of the profile's ranks, as the run's own plan counts it
    given = plan_json(capsys, tiny, *base, "--profile", tmp_path / "prof", "--ratio", "0.6")
    cfg = JobConfig(model_dir=tiny, out_dir=tmp_path / "out", calib=[str(text)], calib_samples=4, seqlen=32,
                    progress=False, ratio=0.6, profile=tmp_path / "prof")
    assert given["disk"]["output"] == CompressionJob(cfg).plan.disk["output"]


def test_plan_counts_the_profile_a_job_keeps_in_out_dir(capsys, tiny, text, tmp_path):
    """A job that profiles for itself keeps OUT_DIR/profile (spectra, weighted energies, profile.json); the plan's
    disk figure left it out. Now `disk["profile"]`, at least what is written and not far above it."""
    base = ["--calib", text, *FAST, "--max-mem", "4G"]
    own = plan_json(capsys, tiny, *base)
    uniform = plan_json(capsys, tiny, *base, "--alloc", "uniform")
    assert "profile" not in uniform["disk"]
    assert own["disk_bytes"] == sum(own["disk"].values())
    out = tmp_path / "out"
    assert main(["run", str(tiny), str(out), *map(str, base), "--no-progress", "--no-plots"]) == 0
    kept = sum(p.stat().st_size for p in (out / "profile").rglob("*") if p.is_file())
    assert kept <= own["disk"]["profile"] < 3 * kept
