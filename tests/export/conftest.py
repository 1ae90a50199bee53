"""Tiny finished streamsvd outputs shared by the export tests (made once per session)."""

import pytest

from streamsvd.job.pipeline import JobConfig, run_job
from tiny_models import make_tiny_checkpoint

# family, stored form: pivoted factors (the default), plain factors with biases (qwen2's q/k/v) and
# tied embeddings, Gemma 3's sliding and global layers, Gemma 2's eager softcapped attention, phi3's fused linears.
CASES = [("llama", "pivoted"), ("qwen2", "plain"), ("gemma3_text", "pivoted"), ("gemma2", "pivoted"), ("phi3", "pivoted")]


@pytest.fixture(scope="session")
def tiny_outputs(tmp_path_factory):
    """family -> (MODEL_DIR, OUT_DIR) of a finished job at ratio 0.4."""
    root = tmp_path_factory.mktemp("export-outputs")
    outs = {}
    for family, factors in CASES:
        model_dir = make_tiny_checkpoint(family, root / f"{family}-model")
        out = root / f"{family}-{factors}"
        run_job(JobConfig(alloc="uniform", model_dir=model_dir, out_dir=out, ratio=0.4, calib_samples=4, seqlen=32, progress=False,
                          factors=factors))
        outs[family] = (model_dir, out)
    return outs
