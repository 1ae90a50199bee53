"""`run --device` / `--max-gpu-mem` end to end on a tiny model, and the GPU's part of the plan.

On a machine where torch sees no GPU (CI), `--device cuda` must be one error and one fix before
anything is written; where it sees one, the same test runs the job there and checks it against the
CPU's (ranks equal, losses to round-off, the GPU's measured peak under its plan and budget).
"""

import json
from dataclasses import replace

import pytest
import torch

from streamsvd.cli import main
from streamsvd.errors import StreamSVDError
from streamsvd.io.output import RUN_LOG
from streamsvd.io.checkpoint import Checkpoint
from streamsvd.job.pipeline import JobConfig, run_job
from streamsvd.job.plan import PlanInputs, make_plan, refuse_if_too_small
from tiny_models import CONFIGS, make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("device") / "model")


COMMON = ["--calib-samples", "4", "--seqlen", "32", "--no-progress", "--no-plots"]


def _report(out):
    return json.loads((out / "streamsvd_report.json").read_text())["modules"]


def _last_run(out):
    return [json.loads(line) for line in (out / RUN_LOG).read_text().splitlines() if line.strip()][-1]


def test_device_cpu_said_aloud_is_the_default_job_byte_for_byte(tiny, tmp_path):
    assert main(["run", str(tiny), str(tmp_path / "a"), *COMMON]) == 0
    assert main(["run", str(tiny), str(tmp_path / "b"), *COMMON, "--device", "cpu"]) == 0
    shards = sorted(p.name for p in (tmp_path / "a").glob("*.safetensors"))
    assert shards
    for name in shards:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert "device" in json.dumps(_last_run(tmp_path / "b")) and '"cpu"' in json.dumps(_last_run(tmp_path / "b"))


@pytest.mark.parametrize("extra", [["--no-compensate", "--alloc", "uniform"], []], ids=["plain", "default"])
def test_a_cuda_job_matches_the_cpu_job_or_is_refused_before_any_work(tiny, tmp_path, capsys, extra):
    out = tmp_path / "gpu"
    code = main(["run", str(tiny), str(out), *COMMON, *extra, "--device", "cuda"])
    if not torch.cuda.is_available():
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2
        assert err[0].startswith("error: --device cuda:") and err[1].strip().startswith("fix:"), err
        assert "Traceback" not in "\n".join(err)
        assert not out.exists()  # refused before OUT_DIR was made
        return
    assert code == 0
    assert main(["run", str(tiny), str(tmp_path / "cpu"), *COMMON, *extra]) == 0
    gpu, cpu = _report(out), _report(tmp_path / "cpu")
    assert gpu.keys() == cpu.keys()
    for name in cpu:
        assert gpu[name]["rank"] == cpu[name]["rank"], name
        assert gpu[name]["truncation_loss"] == pytest.approx(cpu[name]["truncation_loss"], rel=1e-4, abs=1e-7), name
    run = _last_run(out)
    text = json.dumps(run)
    assert '"cuda:0"' in text
    figures = next(v for v in _walk(run) if isinstance(v, dict) and "gpu_peak_bytes" in v)
    assert 0 < figures["gpu_peak_bytes"] <= figures["planned_gpu_peak_bytes"] <= figures["max_gpu_mem_bytes"]


def _walk(obj):
    yield obj
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v)


@pytest.mark.parametrize("flags,match", [
    (["--device", "tpu"], "unknown --device 'tpu'"),
    (["--device", "cuda:x"], "unknown --device 'cuda:x'"),
    (["--max-gpu-mem", "8G"], "--max-gpu-mem without --device cuda"),
    (["--device", "cuda", "--max-gpu-mem", "0"], "--max-gpu-mem 0 is not a positive size"),
])
def test_bad_device_flags_are_one_error_before_any_work(tiny, tmp_path, capsys, flags, match):
    out = tmp_path / "o"
    assert main(["run", str(tiny), str(out), *COMMON, *flags]) == 2
    err = capsys.readouterr().err
    assert match in err and "fix:" in err and "Traceback" not in err
    assert not out.exists()
    with pytest.raises(StreamSVDError):
        JobConfig(model_dir=tiny, out_dir=out, device=flags[1] if flags[0] == "--device" else "cpu",
                  max_gpu_mem={"8G": 8 << 30, "0": 0}.get(flags[-1]) if "--max-gpu-mem" in flags else None).validate()


@pytest.mark.parametrize("settings", [PlanInputs(), PlanInputs(calibrate="sequential", compensate=True, anchor=0.1)],
                         ids=["plain", "compensated"])
def test_the_gpu_takes_the_factorisations_workspace_off_the_host(tiny, settings):
    ckpt = Checkpoint(tiny)
    cpu = make_plan(ckpt, "model.layers", settings, budget=1 << 40, baseline=100 << 20)
    gpu = make_plan(ckpt, "model.layers", replace(settings, device="cuda"), budget=1 << 40, baseline=100 << 20,
                    gpu_budget=1 << 40)
    assert cpu.gpu_peak_bytes is None and cpu.gpu_components == {}
    host, factorize = gpu.components["factorize"], gpu.gpu_components["factorize"]
    # what the CPU's plan counts as the factorisations' workspace and whitening is the GPU's now (the GPU's largest
    # step may be another one: without statistics beside it, the largest whitening-and-workspace pair)
    gpu_step = factorize["workspace"] + factorize["whitening"]
    assert gpu_step >= cpu.components["factorize"]["workspace"] + cpu.components["factorize"]["whitening"] > 0
    assert host["workspace"] == 0 and host["whitening"] == 0 and host["factors from the GPU"] > 0
    assert gpu.stage_bytes["factorize"] < cpu.stage_bytes["factorize"]
    # the block forwards run there too: the block, the batch's working set and its outputs, in every forward stage
    statistics = gpu.gpu_components["statistics"]
    assert statistics["block weights"] == factorize["block weights"] == host["block weights"]
    assert statistics["batch"] == gpu.components["statistics"]["batch"] > 0 and statistics["outputs"] > 0
    assert statistics["statistics"] == gpu.components["statistics"]["statistics"] > 0  # the sums are there too
    assert factorize["statistics"] > 0
    assert set(gpu.gpu_stage_bytes) >= {"statistics", "factorize", "propagate", "write"}
    assert gpu.gpu_peak_bytes == max(gpu.gpu_stage_bytes.values()) > sum(gpu.gpu_components[gpu.gpu_stage].values())
    assert gpu.gpu_min_bytes <= gpu.gpu_peak_bytes
    if settings.compensate:
        assert factorize["input Gram"] > 0 and factorize["cross statistic"] > 0
        assert statistics["original block"] > 0
    assert "gpu (cuda" in gpu.describe() and gpu.fits()


def test_the_gpu_budget_sets_the_batch_too(tiny):
    ckpt = Checkpoint(tiny)
    roomy = make_plan(ckpt, "model.layers", PlanInputs(device="cuda", calib_samples=16), budget=1 << 40,
                      baseline=100 << 20, gpu_budget=1 << 40)
    assert roomy.batch_size == 16
    tight = roomy.gpu_stage_bytes["statistics"] - 1  # a byte short of the statistics stage at batch 16
    plan = make_plan(ckpt, "model.layers", PlanInputs(device="cuda", calib_samples=16), budget=1 << 40,
                     baseline=100 << 20, gpu_budget=tight)
    assert 1 <= plan.batch_size < 16 and plan.gpu_peak_bytes <= tight and plan.fits()


def test_a_gpu_budget_below_the_plan_is_refused_naming_the_smallest(tiny):
    ckpt = Checkpoint(tiny)
    plan = make_plan(ckpt, "model.layers", PlanInputs(device="cuda"), budget=1 << 40, baseline=100 << 20,
                     gpu_budget=1 << 20)
    assert not plan.fits()
    with pytest.raises(StreamSVDError, match=r"--max-gpu-mem 1.0 MiB is too small") as e:
        refuse_if_too_small(plan)
    assert f"{-(-plan.gpu_min_bytes // (1 << 20))}M" in e.value.fix
    ok = make_plan(ckpt, "model.layers", PlanInputs(device="cuda"), budget=1 << 40, baseline=100 << 20,
                   gpu_budget=plan.gpu_min_bytes)
    refuse_if_too_small(ok)  # the smallest itself is accepted, at batch 1
    assert ok.batch_size == 1 and ok.gpu_peak_bytes == plan.gpu_min_bytes


def test_plan_for_a_gpu_this_machine_may_not_have(tiny, capsys):
    flags = ["plan", str(tiny), "--calib-samples", "4", "--seqlen", "32", "--alloc", "uniform", "--device", "cuda"]
    assert main([*flags, "--max-gpu-mem", "4G", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["device"] == "cuda" and plan["gpu_peak_bytes"] > 0 and plan["gpu_budget_bytes"] == 4 << 30
    assert plan["components"]["factorize"]["workspace"] == 0 and plan["gpu_components"]["factorize"]["workspace"] > 0
    assert main([*flags, "--max-gpu-mem", "1K"]) == 2  # the plan, then run's refusal of that budget
    out, err = capsys.readouterr()
    assert "gpu (cuda" in out and "--max-gpu-mem` below" not in out and "`run` would refuse it" in out
    assert err.startswith("error: --max-gpu-mem ") and "is too small" in err and "Traceback" not in err
    if not torch.cuda.is_available():  # nothing to measure: the budget is unknown, and the plan says so
        assert main([*flags, "--json"]) == 0
        plan = json.loads(capsys.readouterr().out)
        assert plan["gpu_budget_bytes"] is None
        assert any("no GPU visible here" in n for n in plan["notes"])


def test_under_a_job_a_cpu_device_writes_no_gpu_figures(tiny, tmp_path):
    run_job(JobConfig(model_dir=tiny, out_dir=tmp_path / "o", calib_samples=4, seqlen=32, progress=False, plots=False,
                      alloc="uniform", compensate=False, device="cpu"))
    assert "gpu_peak_bytes" not in json.dumps(_last_run(tmp_path / "o"))


def test_a_device_out_of_memory_is_one_error_and_the_rerun_finishes(tiny, tmp_path, capsys, monkeypatch):
    """torch's allocator, held to --max-gpu-mem, refuses a step the plan under-counted: one error naming the linear,
    a fix, the finished blocks kept; the same command then finishes (here the 'GPU' is the CPU, made to fail once)."""
    from streamsvd.job import stages

    real, calls = stages.factorize, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 9:  # in the second block
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    out = tmp_path / "o"
    flags = ["run", str(tiny), str(out), *COMMON, "--no-compensate", "--alloc", "uniform"]
    monkeypatch.setattr(stages, "factorize", failing)
    assert main(flags) == 2
    err = capsys.readouterr().err
    assert "error: cpu ran out of memory factoring model.layers.1." in err and "Tried to allocate 2.00 GiB" in err
    assert "fix: rerun the same command with a larger --max-mem; the finished blocks are kept" in err
    assert "Traceback" not in err
    state = json.loads((out / "streamsvd_state.json").read_text())
    assert state["blocks_done"] == 1 and not state["complete"]  # block 0 kept, block 1 to do
    monkeypatch.setattr(stages, "factorize", real)
    assert main(flags) == 0
    assert main(["run", str(tiny), str(tmp_path / "ref"), *COMMON, "--no-compensate", "--alloc", "uniform"]) == 0
    for shard in sorted((tmp_path / "ref").glob("*.safetensors")):
        assert (out / shard.name).read_bytes() == shard.read_bytes(), shard.name


def test_profile_takes_the_device_too(tiny, tmp_path, capsys):
    flags = ["--calib-samples", "4", "--seqlen", "32", "--no-progress", "--sensitivity-samples", "2"]
    assert main(["profile", str(tiny), str(tmp_path / "cpu"), *flags, "--device", "cpu"]) == 0
    code = main(["profile", str(tiny), str(tmp_path / "gpu"), *flags, "--device", "cuda"])
    if not torch.cuda.is_available():
        err = capsys.readouterr().err
        assert code == 2 and "error: --device cuda:" in err and "fix:" in err and "Traceback" not in err
        assert not (tmp_path / "gpu").exists()
        return
    assert code == 0
    from streamsvd.job.profile import read_profile

    cpu, gpu = read_profile(tmp_path / "cpu"), read_profile(tmp_path / "gpu")
    for name, s in cpu.spectra.items():
        assert gpu.spectra[name] == pytest.approx(s, rel=1e-5, abs=1e-8), name


def test_the_gpu_plan_of_a_job_that_profiles_counts_the_profiles_spectra(tiny, capsys):
    flags = ["plan", str(tiny), "--calib-samples", "4", "--seqlen", "32", "--device", "cuda", "--max-gpu-mem", "4G",
             "--json"]
    assert main([*flags, "--alloc", "uniform"]) == 0
    uniform = json.loads(capsys.readouterr().out)
    assert main(flags) == 0  # --alloc global (the default): the job's own profile first
    own = json.loads(capsys.readouterr().out)
    assert own["gpu_peak_bytes"] >= uniform["gpu_peak_bytes"] > 0
    assert "profile" in own["gpu_stage_bytes"] and "profile" not in uniform["gpu_stage_bytes"]
    assert own["gpu_peak_bytes"] == max(own["gpu_stage_bytes"].values())


@pytest.mark.parametrize("extra", [
    ["--no-compensate", "--alloc", "uniform"], [], ["--quant", "int4", "--no-compensate"],
    ["--method", "cholesky", "--alloc", "uniform"], ["--refine-steps", "3", "--alloc", "uniform"],
    ["--max-ppl-increase", "0.5", "--heldout-samples", "2"], ["--propagate", "original", "--alloc", "uniform"],
], ids=["plain", "default (compensated, own profile)", "gptq", "cholesky", "refine", "heldout target", "original"])
def test_the_device_path_on_a_simulated_gpu_writes_the_cpu_jobs_bytes(tiny, tmp_path, monkeypatch, extra):
    """The whole job with its device set to a simulated one (tests/sim_device.py: CPU data behind a device of its own,
    where a tensor left on the CPU, or made without device=, fails as on a GPU): the block forwards, the statistics'
    products, the factorisations and the profile's spectra take --device's code path. The kernels are the CPU's, so
    the output must be the CPU job's byte for byte."""
    from sim_device import SIM, SimDevice
    from streamsvd.job import device, pipeline

    flags = [*COMMON, *extra]
    assert main(["run", str(tiny), str(tmp_path / "cpu"), *flags]) == 0
    made = []

    def resolve(name, local_rank=0):
        made.append(name)
        return SIM

    monkeypatch.setattr(pipeline, "resolve_device", resolve)
    monkeypatch.setattr(device, "resolve_device", resolve)  # the job's own profile's
    with SimDevice():
        assert main(["run", str(tiny), str(tmp_path / "sim"), *flags]) == 0
    assert made == ["cpu"] * len(made) and len(made) == (1 if "--alloc" in extra else 2)
    shards = sorted(p.name for p in (tmp_path / "cpu").glob("*.safetensors"))
    assert shards
    for name in shards:
        assert (tmp_path / "sim" / name).read_bytes() == (tmp_path / "cpu" / name).read_bytes(), name


def test_a_job_interrupted_on_the_simulated_gpu_resumes_to_the_cpu_jobs_bytes(tiny, tmp_path, monkeypatch):
    """Stopped after its first block and run again (both on the simulated device), with the held-out windows that
    are carried through the compressed blocks: the CPU job's bytes."""
    from sim_device import SIM, SimDevice
    from streamsvd.job import device, pipeline

    def cfg(out):
        return JobConfig(model_dir=tiny, out_dir=out, calib_samples=4, seqlen=32, progress=False, plots=False,
                         max_ppl_increase=0.5, heldout_samples=2)

    run_job(cfg(tmp_path / "cpu"))
    monkeypatch.setattr(pipeline, "resolve_device", lambda name, local_rank=0: SIM)
    monkeypatch.setattr(device, "resolve_device", lambda name, local_rank=0: SIM)

    class Stop(Exception):
        pass

    def stop(index):
        raise Stop

    with SimDevice():
        with pytest.raises(Stop):
            run_job(cfg(tmp_path / "sim"), on_block_done=stop)
        assert not json.loads((tmp_path / "sim" / "streamsvd_state.json").read_text())["complete"]
        run_job(cfg(tmp_path / "sim"))
    for shard in sorted((tmp_path / "cpu").glob("*.safetensors")):
        assert (tmp_path / "sim" / shard.name).read_bytes() == shard.read_bytes(), shard.name
    cpu_report = json.loads((tmp_path / "cpu" / "streamsvd_report.json").read_text())
    sim_report = json.loads((tmp_path / "sim" / "streamsvd_report.json").read_text())
    assert sim_report["allocation"]["measured_ppl"] == cpu_report["allocation"]["measured_ppl"]


def test_a_profile_on_the_simulated_gpu_writes_the_cpu_profiles_bytes(tiny, tmp_path, monkeypatch):
    """`streamsvd profile` with its passes (statistics, the sensitivity forward and backward, the held-out windows) and
    its spectra on the simulated device: the CPU profile's files byte for byte."""
    from sim_device import SIM, SimDevice
    from streamsvd.job import device

    flags = ["--calib-samples", "4", "--seqlen", "32", "--no-progress", "--sensitivity-samples", "2",
             "--heldout-samples", "2"]
    assert main(["profile", str(tiny), str(tmp_path / "cpu"), *flags]) == 0
    monkeypatch.setattr(device, "resolve_device", lambda name, local_rank=0: SIM)
    with SimDevice():
        assert main(["profile", str(tiny), str(tmp_path / "sim"), *flags]) == 0
    for name in ("spectra.safetensors", "weighted.safetensors"):
        assert (tmp_path / "sim" / name).read_bytes() == (tmp_path / "cpu" / name).read_bytes(), name
    cpu, sim = (json.loads((tmp_path / d / "profile.json").read_text()) for d in ("cpu", "sim"))
    assert sim["sensitivity"] == cpu["sensitivity"] and sim["heldout"] == cpu["heldout"]


def test_out_of_memory_in_a_block_forward_is_one_error(tiny, tmp_path, capsys, monkeypatch):
    """The GPU's allocator refusing a block forward's step (outside a factorisation, which names its linear): one
    error line and a fix, no traceback, the finished blocks kept."""
    from streamsvd.job import pipeline

    real, calls = pipeline.run_layer, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB\nmore detail")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "run_layer", failing)
    assert main(["run", str(tiny), str(tmp_path / "o"), *COMMON, "--no-compensate", "--alloc", "uniform"]) == 2
    err = capsys.readouterr().err
    assert "error: out of memory (CUDA out of memory. Tried to allocate 1.50 GiB)" in err and "more detail" not in err
    assert "fix: rerun the same command with a larger --max-gpu-mem" in err and "Traceback" not in err


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_every_family_runs_on_the_simulated_gpu_to_the_cpu_jobs_bytes(model_type, tmp_path, monkeypatch):
    """Each family's per-block arguments (masks, rotary tables, Gemma's local and global ones) and its layer's own
    modules (norms, q/k norms, softcapping) take --device's path: the default job (compensated, its own profile)
    writes the CPU job's bytes."""
    from sim_device import SIM, SimDevice
    from streamsvd.job import device, pipeline

    model = make_tiny_checkpoint(model_type, tmp_path / "model")
    flags = COMMON
    assert main(["run", str(model), str(tmp_path / "cpu"), *flags]) == 0
    monkeypatch.setattr(pipeline, "resolve_device", lambda name, local_rank=0: SIM)
    monkeypatch.setattr(device, "resolve_device", lambda name, local_rank=0: SIM)
    with SimDevice():
        assert main(["run", str(model), str(tmp_path / "sim"), *flags]) == 0
    shards = sorted(p.name for p in (tmp_path / "cpu").glob("*.safetensors"))
    assert shards
    for name in shards:
        assert (tmp_path / "sim" / name).read_bytes() == (tmp_path / "cpu" / name).read_bytes(), name


@pytest.fixture(scope="module")
def wider(tmp_path_factory):
    """Wide enough that the statistics, a batch and the factorisations outweigh the fixed tensors (masks, tables)."""
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("device-wider") / "model", hidden_size=256,
                                intermediate_size=688, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                                max_position_embeddings=512)


@pytest.mark.parametrize("extra", [
    ["--no-compensate", "--calibrate", "block", "--anchor", "0", "--alloc", "uniform"], [],
    ["--calibrate", "block", "--alloc", "uniform"], ["--refine-steps", "4", "--quant", "int4", "--alloc", "uniform"],
    ["--method", "cholesky", "--no-compensate", "--calibrate", "block", "--anchor", "0", "--alloc", "uniform"],
], ids=["plain", "default", "block", "refine+quant", "cholesky"])
def test_what_the_simulated_gpu_holds_in_each_stage_stays_under_the_plans_count(wider, tmp_path, monkeypatch, capsys, extra):
    """The bytes the simulated device holds (tests/sim_device.Ledger, counted as torch.cuda.max_memory_allocated counts
    a GPU's), at their most in each stage of the job, against the plan's count of that stage's GPU tensors (before its
    allowance for workspaces and rounding): a tensor the plan forgets shows here. It found two: during the quantize
    stage a linear's new module sits on the GPU beside the one it replaces, and pivots are int64 buffers."""
    from sim_device import SIM, SimDevice
    from streamsvd.job import device, pipeline

    flags = ["--calib-samples", "8", "--seqlen", "128", "--no-progress", "--no-plots", *extra]
    assert main(["plan", str(wider), *flags[:4], *extra, "--device", "cuda", "--max-gpu-mem", "80G", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    monkeypatch.setattr(pipeline, "resolve_device", lambda name, local_rank=0: SIM)
    monkeypatch.setattr(device, "resolve_device", lambda name, local_rank=0: SIM)
    held = _StagePeaks(monkeypatch, pipeline.CompressionJob, "_stage", "setup")
    with SimDevice():
        assert main(["run", str(wider), str(tmp_path / "sim"), *flags]) == 0
    assert _last_run(tmp_path / "sim")["batch_size"] == plan["batch_size"]
    assert {"statistics", "factorize", "propagate"} <= set(plan["gpu_components"])
    _each_under(held.done(), plan["gpu_components"], ("factorize",))


class _StagePeaks:
    """The most the simulated device holds (tests/sim_device.Ledger) in each stage, a stage being whatever
    `cls.method(self, name)` switches to; what earlier tests left there is not counted."""

    def __init__(self, monkeypatch, cls, method: str, first: str):
        import gc

        from sim_device import LEDGER

        self.ledger, self.peaks, self.current = LEDGER, {}, first
        real = getattr(cls, method)

        def stage(obj, name):
            self._close()
            self.current = name
            return real(obj, name)

        monkeypatch.setattr(cls, method, stage)
        gc.collect()
        self.base = LEDGER.now
        LEDGER.reset_peak()

    def _close(self) -> None:
        self.peaks[self.current] = max(self.peaks.get(self.current, 0), self.ledger.reset_peak() - self.base)

    def done(self) -> dict[str, int]:
        self._close()
        return self.peaks


def _each_under(peaks: dict[str, int], gpu_components: dict[str, dict[str, int]], busy: tuple[str, ...]) -> None:
    """Every stage's most-held bytes within the plan's GPU count of that stage (its tensors, before the allowance)."""
    planned = {stage: sum(parts.values()) for stage, parts in gpu_components.items()}
    assert all(peaks.get(stage, 0) > 0 for stage in busy), peaks
    for stage, held in peaks.items():
        assert held <= planned.get(stage, 0), (stage, held, planned.get(stage))


def test_what_the_simulated_gpu_holds_in_each_profile_stage_stays_under_the_plans_count(wider, tmp_path, monkeypatch):
    """The same for `streamsvd profile` (its statistics pass with the weighted Grams, its spectra, the sensitivity
    pass's forward and backward): each stage's most-held bytes on the simulated device against the plan's GPU count."""
    from sim_device import SIM, SimDevice
    from streamsvd.job import device, peak
    from streamsvd.job.profile import ProfileConfig, make_profile

    cfg = ProfileConfig(model_dir=wider, profile_dir=tmp_path / "p", calib_samples=8, seqlen=128, progress=False,
                        sensitivity_samples=4, device="cuda", max_gpu_mem=80 << 30)
    plan = cfg.plan(Checkpoint(wider))
    monkeypatch.setattr(device, "resolve_device", lambda name, local_rank=0: SIM)
    held = _StagePeaks(monkeypatch, peak.PeakSampler, "stage", "embed")
    with SimDevice():
        make_profile(cfg)
    _each_under(held.done(), plan.gpu_components, ("statistics", "sensitivity (blocks)", "factorize"))
