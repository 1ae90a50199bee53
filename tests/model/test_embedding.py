"""Embedding rows read from the file, and the extra shard copied file to file: the same values, exactly."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from streamsvd.io.checkpoint import Checkpoint
from streamsvd.io.streamcopy import copy_tensors
from streamsvd.model.architecture import empty_model, load_config
from streamsvd.model.embedding import materialize_base_mapped
from tiny_models import make_tiny_checkpoint


@pytest.mark.parametrize("model_type,dtype", [("gemma3_text", torch.bfloat16), ("llama", torch.float32)])
def test_mapped_embedding_gives_the_materialised_values(tmp_path, model_type, dtype):
    path = make_tiny_checkpoint(model_type, tmp_path / "m", dtype=dtype)
    ckpt = Checkpoint(path)
    model = empty_model(load_config(ckpt), torch.float32)
    materialize_base_mapped(model, ckpt, torch.float32)
    assert model.get_input_embeddings().weight.device.type == "meta"  # never resident
    ids = torch.tensor([[5, 0, 383, 5, 17], [2, 2, 9, 100, 1]])
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).float().get_input_embeddings()
    got = model.get_input_embeddings()(ids)
    assert torch.equal(got, reference(ids))  # Gemma's embed_scale included
    from streamsvd.errors import CheckpointError

    with pytest.raises(CheckpointError, match="tokenizer"):  # a tokenizer of another model: refused with a fix line
        model.get_input_embeddings()(torch.tensor([[384]]))


def test_stream_copy_holds_the_same_tensors(tmp_path):
    path = make_tiny_checkpoint("llama", tmp_path / "m", dtype=torch.bfloat16)
    ckpt = Checkpoint(path)
    names = [k for k in ckpt.keys() if not k.startswith("model.layers.")]
    copy_tensors(ckpt, names, tmp_path / "extra.safetensors")
    loaded = load_file(str(tmp_path / "extra.safetensors"))
    assert sorted(loaded) == sorted(names)
    for name in names:
        assert loaded[name].dtype == torch.bfloat16 and torch.equal(loaded[name], ckpt.get(name))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stream_copy_records_the_digests_that_reading_the_tensors_gives(tmp_path, dtype):
    """The extra shard is copied byte for byte, not read as tensors: it must still record what it read,
    or a resume could not tell that the embeddings changed (identity by content, issue 10)."""
    ckpt = Checkpoint(make_tiny_checkpoint("llama", tmp_path / "m", dtype=dtype))
    names = [k for k in ckpt.keys() if not k.startswith("model.layers.")]
    ckpt.read_digests = {}
    copy_tensors(ckpt, names, tmp_path / "extra.safetensors")
    copied = dict(ckpt.read_digests)
    ckpt.read_digests = {}
    for name in names:
        ckpt.get(name)
    assert sorted(copied) == sorted(names) and copied == ckpt.read_digests


def test_a_head_stored_beside_a_tied_config_is_loaded_as_transformers_and_the_output_load_it(tmp_path):
    """tie_word_embeddings true, yet lm_head.weight stored (and not the embedding): transformers keeps the stored head
    (the config is wrong), the job computed with it and the output's remote code loads it; streamsvd.load tied it to
    the embedding, another model for the same OUT_DIR."""
    import json

    import streamsvd
    from streamsvd.cli import main

    path = make_tiny_checkpoint("llama", tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(config, tie_word_embeddings=True)))
    ids = torch.tensor([[5, 0, 383, 5, 17, 2, 9]])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(ids).logits
        assert torch.allclose(streamsvd.load(path, dtype=torch.float32)(ids).logits, want, atol=1e-5)
        # plain and quantised factors: the quantised path of the remote code loaded the stored head into the tied
        # tensor, over the embedding (logits off by about 1)
        for name, extra in (("out", []), ("quant", ["--quant", "int8"])):
            out = tmp_path / name
            assert main(["run", str(path), str(out), "--calib-samples", "4", "--seqlen", "32", "--no-progress",
                         "--no-plots", "--alloc", "uniform", "--ratio", "0.2", *extra]) == 0
            remote = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=True)
            assert remote.get_output_embeddings().weight is not remote.get_input_embeddings().weight
            assert torch.allclose(streamsvd.load(out, dtype=torch.float32)(ids).logits, remote(ids).logits, atol=1e-5)


def test_a_stored_rotary_inv_freq_is_ignored_as_transformers_ignores_it(tmp_path):
    """model.rotary_emb.inv_freq is a buffer computed from config.json (not saved); an older checkpoint's stored copy
    (here damaged, in real ones rounded to 16 bits) was loaded by streamsvd.load over it, while transformers, the job
    and the output's remote code keep the computed one."""
    from safetensors.torch import save_file

    import streamsvd
    from streamsvd.cli import main

    path = make_tiny_checkpoint("llama", tmp_path / "m", max_shard_size="100MB")
    tensors = load_file(str(path / "model.safetensors"))
    save_file(dict(tensors, **{"model.rotary_emb.inv_freq": torch.ones(8)}), str(path / "model.safetensors"),
              metadata={"format": "pt"})
    ids = torch.tensor([[5, 0, 383, 5, 17, 2, 9, 44, 12]])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(ids).logits
        assert torch.allclose(streamsvd.load(path, dtype=torch.float32)(ids).logits, want, atol=1e-6)
        out = tmp_path / "out"
        assert main(["run", str(path), str(out), "--calib-samples", "4", "--seqlen", "32", "--no-progress",
                     "--no-plots", "--alloc", "uniform", "--ratio", "0.2"]) == 0
        remote = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=True)(ids).logits
        assert torch.allclose(streamsvd.load(out, dtype=torch.float32)(ids).logits, remote, atol=1e-5)


def test_a_tied_quantised_output_loads_tied_through_the_remote_code(tmp_path):
    """A tied model (no head stored), factors quantised: the remote code's own loader ties the head to the embedding
    (a head missing is not a damaged output) and gives streamsvd.load's logits."""
    import streamsvd
    from streamsvd.cli import main

    path = make_tiny_checkpoint("qwen2", tmp_path / "m")
    out = tmp_path / "out"
    assert main(["run", str(path), str(out), "--calib-samples", "4", "--seqlen", "32", "--no-progress", "--no-plots",
                 "--alloc", "uniform", "--ratio", "0.2", "--quant", "int8"]) == 0
    ids = torch.tensor([[5, 0, 383, 5, 17, 2, 9]])
    with torch.no_grad():
        remote = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=True)
        assert remote.get_output_embeddings().weight is remote.get_input_embeddings().weight
        assert torch.allclose(streamsvd.load(out, dtype=torch.float32)(ids).logits, remote(ids).logits, atol=1e-5)
