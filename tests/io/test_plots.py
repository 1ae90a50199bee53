"""The allocation and spectra pictures a finished job writes next to its report."""

import json

import pytest

from streamsvd.io import plots as plots_module
from streamsvd.io.output import INDEX_NAME, REPORT_JSON, REPORT_MD
from streamsvd.io.plots import ALLOCATION_PNG, SPECTRA_PNG, plots, read_spectra
from streamsvd.job import pipeline
from streamsvd.job.pipeline import JobConfig, run_job
from tiny_models import make_tiny_checkpoint

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama") / "model")


def _job(model_dir, out_dir, **kw):
    return JobConfig(model_dir=model_dir, out_dir=out_dir, calib_samples=4, seqlen=32, progress=False, **{"alloc": "uniform", **kw})


def test_a_job_writes_both_pictures_recorded_and_linked_and_the_same_bytes_again(tiny, tmp_path):
    first = run_job(_job(tiny, tmp_path / "a", alloc="global"))
    again = run_job(_job(tiny, tmp_path / "b", alloc="global"))
    assert first["plots"] == [ALLOCATION_PNG, SPECTRA_PNG]
    for name in (ALLOCATION_PNG, SPECTRA_PNG):
        data = (tmp_path / "a" / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000
        assert data == (tmp_path / "b" / name).read_bytes()  # no date or version in the bytes
        assert f"({name})" in (tmp_path / "a" / REPORT_MD).read_text()
    assert json.loads((tmp_path / "a" / REPORT_JSON).read_text())["plots"] == first["plots"] == again["plots"]
    assert first["this_run"]["peak_rss_by_stage"].get("plots", 0) > 0  # the sampler charged the drawing to its stage


def test_the_pictures_follow_the_ranks(tiny, tmp_path):
    run_job(_job(tiny, tmp_path / "out", ratio=0.3))
    report = json.loads((tmp_path / "out" / REPORT_JSON).read_text())
    spectra = read_spectra(tmp_path / "out" / "spectra")
    assert set(spectra) == set(report["modules"])
    drawn = plots(report, spectra)
    assert drawn[ALLOCATION_PNG] == (tmp_path / "out" / ALLOCATION_PNG).read_bytes()
    name = next(iter(report["modules"]))
    report["modules"][name]["rank"] //= 2
    redrawn = plots(report, spectra)
    assert redrawn[ALLOCATION_PNG] != drawn[ALLOCATION_PNG] and redrawn[SPECTRA_PNG] != drawn[SPECTRA_PNG]


def test_a_picture_that_fails_is_a_warning_and_the_job_still_finishes(tiny, tmp_path, monkeypatch, capsys):
    def broken(report, spectra):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(pipeline, "plots", broken)
    report = run_job(_job(tiny, tmp_path / "out"))
    assert "warning: the allocation and spectra plots were not drawn (RuntimeError: no fonts)" in capsys.readouterr().err
    assert "plots" not in report and not (tmp_path / "out" / ALLOCATION_PNG).exists()
    assert (tmp_path / "out" / INDEX_NAME).is_file()
    assert plots_module.plots({"modules": {}}, {}) == {}
