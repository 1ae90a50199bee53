"""`run --shrink A`: the job's Grams pulled toward their diagonals, both sides, resumable, refused out of range."""

import pytest
import torch
from safetensors.torch import load_file

from streamsvd.cli import main
from streamsvd.errors import JobMismatch
from streamsvd.io.checkpoint import Checkpoint
from streamsvd.job.pipeline import JobConfig, job_identity, run_job
from tiny_models import make_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama") / "model")


def _job(model_dir, out_dir, **kw):
    return JobConfig(model_dir=model_dir, out_dir=out_dir, calib_samples=4, seqlen=32, progress=False, plots=False, **{"alloc": "uniform", **kw})


def _block0(out):
    return load_file(str(sorted(out.glob("model-*.safetensors"))[1]))  # [0] holds the embeddings and head


def test_shrink_changes_every_factored_linear_on_both_sides_and_is_in_the_identity(tiny, tmp_path):
    plain = run_job(_job(tiny, tmp_path / "a", ratio=0.5))
    shrunk = run_job(_job(tiny, tmp_path / "b", ratio=0.5, shrink=0.3))
    a, b = _block0(tmp_path / "a"), _block0(tmp_path / "b")
    factored = [k for k in a if k.endswith(".out_factor")]
    assert any("down_proj" in k for k in factored) and any("q_proj" in k for k in factored)  # output and input side
    for k in factored:
        assert a[k].shape == b[k].shape and not torch.allclose(a[k], b[k]), k
    assert plain["ratio_linear"] == shrunk["ratio_linear"]
    assert "shrink" not in job_identity(_job(tiny, "x"), Checkpoint(tiny), "t")
    assert job_identity(_job(tiny, "x", shrink=0.3), Checkpoint(tiny), "t")["shrink"] == 0.3
    with pytest.raises(JobMismatch, match="--shrink"):
        run_job(_job(tiny, tmp_path / "b", ratio=0.5, shrink=0.1))


def test_out_of_range_shrink_is_one_error_and_a_fix(tiny, tmp_path, capsys):
    assert main(["run", str(tiny), str(tmp_path / "out"), "--shrink", "1", "--no-progress"]) != 0
    err = capsys.readouterr().err
    assert "error: --shrink 1.0 is out of range" in err and "fix: give the weight of the Gram's diagonal" in err
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
