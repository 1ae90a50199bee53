"""The real small models of shared/DATA.md, end to end: run, load, generate, evaluate.

Calibration and evaluation texts are different plays (assets.CALIB_PLAYS / EVAL_PLAYS). Windows are
short so the file stays within a few minutes on two CPU cores.
"""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import streamsvd
from streamsvd.model.architecture import empty_model, load_config, materialize_base
from streamsvd.model.capture import capture_layer_kwargs
from streamsvd.io.checkpoint import Checkpoint
from streamsvd.cli import main
from streamsvd.job.evaluate import perplexity
from streamsvd.model.lowrank import PivotedLinear
from streamsvd.job.pipeline import JobConfig, run_job
from streamsvd.job.stream_eval import streaming_perplexity

EVAL_WINDOWS, EVAL_SEQLEN = 6, 256


def _compress(model_dir, out, calib, ratio, method="eig", samples=8, seqlen=256, **flags):
    return run_job(JobConfig(model_dir=model_dir, out_dir=out, ratio=ratio, method=method, calib=[str(calib)],
                             calib_samples=samples, seqlen=seqlen, progress=False, **flags))


def _ppl(model_dir, text_file, model=None):
    model = model or streamsvd.load(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return perplexity(model, tokenizer, text_file.read_text(), EVAL_SEQLEN, EVAL_WINDOWS, progress=False)["perplexity"]


@pytest.fixture(scope="module")
def smollm2_ppl(smollm2_dir, eval_text_file):
    return _ppl(smollm2_dir, eval_text_file)


def test_smollm2_whitened_compression_beats_plain_svd(smollm2_dir, calib_text_file, eval_text_file, smollm2_ppl, tmp_path):
    # Truncation alone (the compensated default is the CLI test's and Gemma's): what whitening does by itself.
    report = _compress(smollm2_dir, tmp_path / "eig", calib_text_file, 0.2, compensate=False)
    _compress(smollm2_dir, tmp_path / "svd", calib_text_file, 0.2, method="svd")
    eig, svd = _ppl(tmp_path / "eig", eval_text_file), _ppl(tmp_path / "svd", eval_text_file)
    assert math.isfinite(eig) and smollm2_ppl < eig < 5 * smollm2_ppl
    assert eig < svd / 3  # activation-aware truncation is what makes SVD usable at all
    assert report["ratio_linear"] == pytest.approx(0.2, abs=0.01)
    assert len(report["modules"]) == 30 * 7


def test_smollm2_at_ratio_04_loads_generates_and_evaluates_from_the_cli(smollm2_dir, calib_text_file, eval_text_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", str(smollm2_dir), str(out), "--ratio", "0.4", "--calib", str(calib_text_file),
                 "--calib-samples", "8", "--seqlen", "256", "--max-mem", "4G", "--no-progress"]) == 0
    assert "ratio 0.40" in capsys.readouterr().out
    model = streamsvd.load(out)
    assert isinstance(model.model.layers[29].self_attn.k_proj, PivotedLinear)  # the default form
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)  # OUT_DIR says model_type "streamsvd"
    ids = tokenizer("The king said", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(generated[0, ids.shape[1]:])
    assert len(text.strip()) > 10
    assert main(["eval", str(out), "--text", str(eval_text_file), "--seqlen", "256", "--max-windows", "3", "--json", "--no-progress"]) == 0
    streamed = json.loads(capsys.readouterr().out)
    in_memory = perplexity(model, tokenizer, eval_text_file.read_text(), 256, 3, progress=False)
    assert streamed["perplexity"] == pytest.approx(in_memory["perplexity"], rel=1e-4)


def test_smollm2_streaming_eval_matches_the_loaded_model(smollm2_dir, eval_text_file, smollm2_ppl):
    streamed = streaming_perplexity(smollm2_dir, eval_text_file.read_text(), EVAL_SEQLEN, EVAL_WINDOWS, progress=False)
    assert streamed["perplexity"] == pytest.approx(smollm2_ppl, rel=1e-4)


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
    report = _compress(gemma3_dir, tmp_path / "out", calib_text_file, 0.2, samples=4, seqlen=256)
    assert len(report["modules"]) == 18 * 7
    model = streamsvd.load(tmp_path / "out")
    original = AutoModelForCausalLM.from_pretrained(gemma3_dir, dtype=torch.float32)
    before = _ppl(gemma3_dir, eval_text_file, original)
    after = _ppl(tmp_path / "out", eval_text_file, model)
    streamed = streaming_perplexity(tmp_path / "out", eval_text_file.read_text(), EVAL_SEQLEN, EVAL_WINDOWS, progress=False)
    assert streamed["perplexity"] == pytest.approx(after, rel=1e-4)  # Gemma: BOS, sliding layers, scaled embeddings
    assert math.isfinite(after) and before < after < 20 * before
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert ids[0, 0] == tokenizer.bos_token_id
    assert model.generate(ids, max_new_tokens=5, do_sample=False).shape[1] == ids.shape[1] + 5
