"""The real small models of shared/DATA.md, end to end: `streamsvd run` at ratio 0.4, load, generate, eval.

Calibration and evaluation texts are different plays (assets.CALIB_PLAYS / EVAL_PLAYS). Windows are
short so each file stays within a few minutes on one CPU core. The real-model tests are split into
three files because each holds minutes of work and the suite runs a file per worker (pyproject).
"""

import json

import pytest
from transformers import AutoTokenizer

import streamsvd
from streamsvd.cli import main
from streamsvd.job.evaluate import perplexity
from streamsvd.model.lowrank import PivotedLinear


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
