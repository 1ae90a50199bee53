"""Jobs with pivoted factors (the default) and plain ones: identity, resume, report, load, dense fallback."""

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

import streamsvd
from streamsvd.cli import main
from streamsvd.io.checkpoint import Checkpoint
from streamsvd.job.pipeline import CompressionJob, JobConfig, job_identity, run_job
from streamsvd.job.state import STATE_NAME
from streamsvd.io.output import RUN_LOG
from streamsvd.math.factorize import rank_for_ratio
from streamsvd.model.lowrank import LowRankLinear, PivotedLinear
from tiny_models import make_tiny_checkpoint, record_edits

VOLATILE = {RUN_LOG, STATE_NAME, "profile_log.json"}  # the profile's wall times vary too


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("m") / "model", num_hidden_layers=3)


def _cfg(model_dir, out, **overrides):
    return JobConfig(**{"alloc": "uniform", **dict(model_dir=model_dir, out_dir=out, ratio=0.4, calib_samples=4, seqlen=32, progress=False), **overrides})


def _files(out):
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name not in VOLATILE}


def _logits(model, vocab=384):
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(ids).logits


def test_default_job_writes_pivoted_factors_at_the_rank_the_ratio_affords(model_dir, tmp_path):
    pivoted = run_job(_cfg(model_dir, tmp_path / "pivoted"))
    plain = run_job(_cfg(model_dir, tmp_path / "plain", factors="plain"))
    section = json.loads((tmp_path / "pivoted" / "config.json").read_text())["streamsvd"]
    assert section["factors"] == "pivoted" and set(section["forms"].values()) == {"pivoted"}
    name = "model.layers.1.mlp.down_proj"  # 64 x 160
    assert section["ranks"][name] == rank_for_ratio(64, 160, 0.4, "pivoted") > rank_for_ratio(64, 160, 0.4, "plain")
    index = json.loads((tmp_path / "pivoted" / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(tmp_path / "pivoted" / index[name + ".pivots"]), framework="pt") as f:
        assert {k for k in f.keys() if k.startswith(name)} == {name + ".out_factor", name + ".in_rest", name + ".pivots"}
        assert sorted(f.get_tensor(name + ".pivots").tolist()) == list(range(160))
    # Both remove at least the requested fraction, counted in the numbers each form stores.
    for report in (pivoted, plain):
        assert 0.4 <= report["ratio_linear"] < 0.43
    record = pivoted["modules"][name]
    assert record["form"] == "pivoted" and record["stored_numel"] == record["rank"] * (64 + 160 - record["rank"])
    assert pivoted["linear_params_after"] == sum(m["stored_numel"] for m in pivoted["modules"].values())
    assert pivoted["factors"] == "pivoted" and plain["factors"] == "plain"
    # The same parameter budget buys a lower truncation loss.
    assert record["truncation_loss"] < plain["modules"][name]["truncation_loss"]
    assert isinstance(streamsvd.load(tmp_path / "pivoted").model.layers[1].mlp.down_proj, PivotedLinear)
    markdown = (tmp_path / "pivoted" / "streamsvd_report.md").read_text()
    assert "r (m + n - r) <= (1 - 0.4) m n" in markdown and f"| {record['rank']} (pivoted) |" in markdown
    assert "floor(m n (1 - 0.4) / (m + n))" in (tmp_path / "plain" / "streamsvd_report.md").read_text()
    # Compensated (the default): the truncation loss is the objective's, anchor term included, so the output error is
    # its own column, not read off the truncation loss.
    assert "output_error" in record and record["output_error"] != record["truncation_loss"]
    row = f"| {name} | 64 x 160 | {record['rank']} (pivoted) | {record['truncation_loss']:.4g} | {record['output_error']:.4g} |"
    assert row in markdown and "| truncation loss (objective) | output error vs the original |" in markdown


def test_uncompensated_report_has_no_output_error_column(model_dir, tmp_path):
    report = run_job(_cfg(model_dir, tmp_path / "out", compensate=False))
    markdown = (tmp_path / "out" / "streamsvd_report.md").read_text()
    assert not any("output_error" in m for m in report["modules"].values())
    assert "| module | out x in | rank | truncation loss (RMS per token) |" in markdown and "output error" not in markdown


def test_resume_with_the_other_factor_form_is_refused(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    run_job(_cfg(model_dir, out, factors="plain"))
    before = _files(out)
    common = [str(model_dir), str(out), "--calib-samples", "4", "--seqlen", "32", "--no-progress", "--alloc", "uniform"]
    assert main(["run", *common]) == 2  # the default, pivoted
    err = capsys.readouterr().err
    assert "different streamsvd job" in err and "fix:" in err
    assert _files(out) == before
    assert main(["run", *common, "--factors", "plain"]) == 0


def test_plain_job_identity_is_the_one_from_before_pivoted_factors(model_dir, tmp_path):
    """An interrupted job of an older streamsvd (plain factors, no `factors` key) resumes with --factors plain."""
    ckpt = Checkpoint(model_dir)
    plain = job_identity(_cfg(model_dir, tmp_path / "a", factors="plain"), ckpt, "text")
    pivoted = job_identity(_cfg(model_dir, tmp_path / "a"), ckpt, "text")
    assert "factors" not in plain and pivoted == {**plain, "factors": "pivoted"}


@pytest.mark.parametrize("factors", ["pivoted", "plain"])
def test_interrupted_job_resumes_byte_identical_in_either_form(model_dir, tmp_path, factors):
    run_job(_cfg(model_dir, tmp_path / "straight", factors=factors))
    out = tmp_path / "interrupted"

    def stop(index):
        if index == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_job(_cfg(model_dir, out, factors=factors), on_block_done=stop)
    resumed = []
    run_job(_cfg(model_dir, out, factors=factors), on_block_done=resumed.append)
    assert resumed == [1, 2]
    assert _files(out) == _files(tmp_path / "straight")


def test_an_output_written_before_pivoted_factors_still_loads(model_dir, tmp_path):
    out = tmp_path / "old"
    run_job(_cfg(model_dir, out, factors="plain"))
    want = _logits(streamsvd.load(out))
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    del config["streamsvd"]["factors"], config["streamsvd"]["forms"]  # what older versions wrote
    config_path.write_text(json.dumps(config))
    record_edits(out, "config.json")  # an older version's state records its own config.json
    old = streamsvd.load(out)
    assert isinstance(old.model.layers[0].self_attn.q_proj, LowRankLinear)
    torch.testing.assert_close(_logits(old), want)


@pytest.mark.parametrize("factors", ["pivoted", "plain"])
def test_a_module_kept_at_full_rank_is_stored_dense_and_loads_as_a_linear(model_dir, tmp_path, monkeypatch, factors):
    import streamsvd.job.stages as stages

    real = stages.rank_for_ratio

    def full_rank_for_down_proj(m, n, ratio, form="plain"):
        return min(m, n) if (m, n) == (64, 160) else real(m, n, ratio, form)

    monkeypatch.setattr(stages, "rank_for_ratio", full_rank_for_down_proj)
    out = tmp_path / "out"
    # Uncompensated, so the full-rank factors are W itself (compensated, they would be the optimum W*).
    report = run_job(_cfg(model_dir, out, factors=factors, compensate=False))
    name = "model.layers.0.mlp.down_proj"
    section = json.loads((out / "config.json").read_text())["streamsvd"]
    assert section["forms"][name] == "dense" and section["forms"]["model.layers.0.mlp.up_proj"] == factors
    assert report["modules"][name]["stored_numel"] == 64 * 160
    model = streamsvd.load(out)
    down = model.model.layers[0].mlp.down_proj
    assert type(down) is nn.Linear
    # Full-rank eig truncation is W itself.
    original = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.testing.assert_close(down.weight, original.model.layers[0].mlp.down_proj.weight, rtol=1e-5, atol=1e-5)
    out_ids = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    assert out_ids.shape == (1, 7)


@pytest.mark.parametrize("factors", ["pivoted", "plain"])
def test_disk_estimate_counts_the_form_it_writes(model_dir, tmp_path, factors):
    out = tmp_path / "out"
    job = CompressionJob(_cfg(model_dir, out, factors=factors))
    needs = job._disk_needs()
    job.run()
    written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and not p.name.startswith("streamsvd_"))
    assert 0.95 < written / needs[out] < 1.05


def test_unknown_factor_form_is_one_clear_error(model_dir, tmp_path):
    from streamsvd.errors import StreamSVDError

    with pytest.raises(StreamSVDError) as info:
        _cfg(model_dir, tmp_path / "o", factors="banded").validate()
    assert "--factors" in info.value.problem and "pivoted" in info.value.fix
