"""`run --precision float32` end to end on a tiny model: same ranks, losses float64's to a small part, a job
identity of its own (a float64 resume of it is refused, naming the flag), and the plan takes the flag."""

import json

import pytest

from streamsvd.cli import main
from streamsvd.errors import JobMismatch
from streamsvd.job.pipeline import CompressionJob, JobConfig
from tiny_models import make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("precision") / "model")


COMMON = ["--calib-samples", "4", "--seqlen", "32", "--no-progress", "--no-plots", "--alloc", "uniform"]


@pytest.mark.parametrize("extra", [["--no-compensate"], []], ids=["plain", "compensated"])
def test_float32_job_matches_float64_ranks_and_losses(tiny, tmp_path, extra):
    assert main(["run", str(tiny), str(tmp_path / "f64"), *COMMON, *extra]) == 0
    assert main(["run", str(tiny), str(tmp_path / "f32"), "--precision", "float32", *COMMON, *extra]) == 0
    f64 = json.loads((tmp_path / "f64" / "streamsvd_report.json").read_text())["modules"]
    f32 = json.loads((tmp_path / "f32" / "streamsvd_report.json").read_text())["modules"]
    assert f64.keys() == f32.keys()
    differs = 0
    for name in f64:
        assert f32[name]["rank"] == f64[name]["rank"]
        # the reported losses come from each route's own spectrum: float32's to about 1e-3 of float64's here
        assert f32[name]["truncation_loss"] == pytest.approx(f64[name]["truncation_loss"], rel=1e-3, abs=1e-6)
        differs += f32[name]["truncation_loss"] != f64[name]["truncation_loss"]
    assert differs, "no loss changed: the float32 routes did not run"
    # the report says which linears kept float32 factors (math/factorize.float32_trusted); float64's has no such key
    assert any(m.get("precision") == "float32" for m in f32.values())
    assert not any("precision" in m for m in f64.values())
    shard = (tmp_path / "f32" / "model.safetensors.index.json")
    assert shard.exists()


def test_a_float32_job_is_another_job(tiny, tmp_path):
    out = tmp_path / "out"
    assert main(["run", str(tiny), str(out), "--precision", "float32", *COMMON, "--no-compensate"]) == 0
    state = json.loads((out / "streamsvd_state.json").read_text())
    assert state["settings"]["precision"] == "float32"
    cfg = JobConfig(model_dir=tiny, out_dir=out, calib_samples=4, seqlen=32, progress=False, plots=False,
                    alloc="uniform", compensate=False)
    with pytest.raises(JobMismatch, match="--precision float32, now float64"):
        CompressionJob(cfg)


def test_unknown_precision_is_one_error(tiny, tmp_path, capsys):
    from streamsvd.errors import StreamSVDError
    from streamsvd.job.pipeline import run_job

    with pytest.raises(StreamSVDError, match="--precision"):
        run_job(JobConfig(model_dir=tiny, out_dir=tmp_path / "o", precision="float16", calib_samples=4, seqlen=32,
                          progress=False, alloc="uniform"))
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):  # argparse refuses it before any work
        main(["run", str(tiny), str(tmp_path / "o"), "--precision", "half", *COMMON])
    assert "invalid choice" in capsys.readouterr().err


def test_plan_takes_the_flag(tiny, capsys):
    assert main(["plan", str(tiny), "--calib-samples", "4", "--seqlen", "32", "--alloc", "uniform",
                 "--precision", "float32", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["seconds_estimate"] > 0 and plan["min_max_mem_bytes"] > 0


def test_an_interrupted_float32_job_resumes_byte_identical(tiny, tmp_path):
    from test_resume import _files, _interrupt_after  # _files: every file but the state and the run log

    from streamsvd.job.pipeline import run_job

    def cfg(out):
        return JobConfig(model_dir=tiny, out_dir=out, calib_samples=4, seqlen=32, progress=False, plots=False,
                         alloc="uniform", precision="float32")

    run_job(cfg(tmp_path / "straight"))
    _interrupt_after(0, cfg(tmp_path / "resumed"))
    run_job(cfg(tmp_path / "resumed"))
    assert _files(tmp_path / "resumed") == _files(tmp_path / "straight")


def test_the_plan_counts_the_float32_copy_of_the_whitening():
    """A wide k_proj of 70B shape: the float32 route holds a float32 S (8192^2 x 4 bytes) beside its half-size
    arrays, more than float64's count alone; the plan adds it."""
    from streamsvd.job.plan import LinearShape, input_route_workspace

    k_proj = LinearShape("self_attn.k_proj", 1024, 8192, 2, "self_attn.q_proj", rank=700)
    _, f64 = input_route_workspace(k_proj, "eig")
    what, f32 = input_route_workspace(k_proj, "eig", float32=True)
    assert f32 == f64 + 4 * 8192 * 8192 and "S in float32" in what
    _, compensated = input_route_workspace(k_proj, "eig", compensated=True, float32=True)
    assert compensated == 8 * 2 * 1024 * 8192 + f32
    randomized = LinearShape("self_attn.k_proj", 1024, 8192, 2, "self_attn.q_proj", rank=700, svd="randomized")
    assert input_route_workspace(randomized, "eig", float32=True) == input_route_workspace(randomized, "eig")
