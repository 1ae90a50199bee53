"""The real small models of shared/DATA.md, end to end: sliding and global layers, compress, load, evaluate, generate.

Calibration and evaluation texts are different plays (assets.CALIB_PLAYS / EVAL_PLAYS). Windows are
short so each file stays within a few minutes on one CPU core. The real-model tests are split into
three files because each holds minutes of work and the suite runs a file per worker (pyproject).
"""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import streamsvd
from streamsvd.io.checkpoint import Checkpoint
from streamsvd.job.stream_eval import streaming_perplexity
from streamsvd.model.architecture import empty_model, load_config, materialize_base
from streamsvd.model.capture import capture_layer_kwargs

from real_jobs import EVAL_SEQLEN, compress, ppl


def test_gemma3_sliding_and_global_layers_receive_different_arguments(gemma3_dir):
    ckpt = Checkpoint(gemma3_dir)
    config = load_config(ckpt)
    model = empty_model(config)
    materialize_base(model, ckpt, torch.float32)
    ids = torch.tensor([[2] + list(range(100, 100 + 40))])
    layer_args = capture_layer_kwargs(model, ids)
    kinds = config.layer_types
    sliding, full = kinds.index("sliding_attention"), kinds.index("full_attention")
    cos_sliding = layer_args[sliding][1]["position_embeddings"][0]
    cos_full = layer_args[full][1]["position_embeddings"][0]
    assert not torch.allclose(cos_sliding, cos_full)  # local and global rotary tables differ


def test_gemma3_end_to_end(gemma3_dir, calib_text_file, eval_text_file, tmp_path):
    report = compress(gemma3_dir, tmp_path / "out", calib_text_file, 0.2, samples=4, seqlen=256)
    assert len(report["modules"]) == 18 * 7
    model = streamsvd.load(tmp_path / "out")
    original = AutoModelForCausalLM.from_pretrained(gemma3_dir, dtype=torch.float32)
    # 3 windows: Gemma's 262k-entry head made each of these three evaluations 17-25 s at 6 windows
    before = ppl(gemma3_dir, eval_text_file, original, windows=3)
    after = ppl(tmp_path / "out", eval_text_file, model, windows=3)
    streamed = streaming_perplexity(tmp_path / "out", eval_text_file.read_text(), EVAL_SEQLEN, 3, progress=False)
    assert streamed["perplexity"] == pytest.approx(after, rel=1e-4)  # Gemma: BOS, sliding layers, scaled embeddings
    assert math.isfinite(after) and before < after < 20 * before
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert ids[0, 0] == tokenizer.bos_token_id
    assert model.generate(ids, max_new_tokens=5, do_sample=False).shape[1] == ids.shape[1] + 5
