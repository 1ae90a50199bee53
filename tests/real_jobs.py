"""Helpers of the end-to-end tests on the real small models (tests/e2e/): a streamed job, held-out perplexity."""

import streamsvd
from transformers import AutoTokenizer

from streamsvd.job.evaluate import perplexity
from streamsvd.job.pipeline import JobConfig, run_job

EVAL_WINDOWS, EVAL_SEQLEN = 6, 256


def compress(model_dir, out, calib, ratio, method="eig", samples=8, seqlen=256, **flags):
    return run_job(JobConfig(alloc="uniform", model_dir=model_dir, out_dir=out, ratio=ratio, method=method, calib=[str(calib)],
                             calib_samples=samples, seqlen=seqlen, progress=False, **flags))


def ppl(model_dir, text_file, model=None, windows=EVAL_WINDOWS):
    model = model or streamsvd.load(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return perplexity(model, tokenizer, text_file.read_text(), EVAL_SEQLEN, windows, progress=False)["perplexity"]
