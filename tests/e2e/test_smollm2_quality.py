"""The real small models of shared/DATA.md, end to end: whitening against plain SVD, streamed evaluation.

Calibration and evaluation texts are different plays (assets.CALIB_PLAYS / EVAL_PLAYS). Windows are
short so each file stays within a few minutes on one CPU core. The real-model tests are split into
three files because each holds minutes of work and the suite runs a file per worker (pyproject).
"""

import math

import pytest

from streamsvd.job.stream_eval import streaming_perplexity

from real_jobs import EVAL_SEQLEN, EVAL_WINDOWS, compress, ppl


@pytest.fixture(scope="module")
def smollm2_ppl(smollm2_dir, eval_text_file):
    return ppl(smollm2_dir, eval_text_file)


def test_smollm2_whitened_compression_beats_plain_svd(smollm2_dir, calib_text_file, eval_text_file, smollm2_ppl, tmp_path):
    # Truncation alone (the compensated default is the CLI test's and Gemma's): what whitening does by itself.
    report = compress(smollm2_dir, tmp_path / "eig", calib_text_file, 0.2, compensate=False)
    compress(smollm2_dir, tmp_path / "svd", calib_text_file, 0.2, method="svd")
    eig, svd = ppl(tmp_path / "eig", eval_text_file), ppl(tmp_path / "svd", eval_text_file)
    assert math.isfinite(eig) and smollm2_ppl < eig < 5 * smollm2_ppl
    assert eig < svd / 3  # activation-aware truncation is what makes SVD usable at all
    assert report["ratio_linear"] == pytest.approx(0.2, abs=0.01)
    assert len(report["modules"]) == 30 * 7


def test_smollm2_streaming_eval_matches_the_loaded_model(smollm2_dir, eval_text_file, smollm2_ppl):
    streamed = streaming_perplexity(smollm2_dir, eval_text_file.read_text(), EVAL_SEQLEN, EVAL_WINDOWS, progress=False)
    assert streamed["perplexity"] == pytest.approx(smollm2_ppl, rel=1e-4)
