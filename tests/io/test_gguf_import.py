"""import-gguf on GGUF files written here from a tiny llama (gguf's own GGUFWriter, float32 tensors, the q/k
permutation llama.cpp's converter applies): the round trip, a missing tensor, a missing head."""

import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from streamsvd.cli import main
from tiny_models import make_tiny_checkpoint

_BLOCK = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
_OUTSIDE = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}


def _permute(t: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf order of q/k rows (transformers' GGUF loader undoes it)."""
    return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def write_gguf(model_dir: Path, path: Path, drop: set[str] = frozenset()) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(0)
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    for key, value in model.state_dict().items():
        if key in _OUTSIDE:
            name = _OUTSIDE[key]
        else:
            parts = key.split(".")
            inner = ".".join(parts[3:-1])
            name = f"blk.{parts[2]}.{_BLOCK[inner]}.weight"
            if inner == "self_attn.q_proj":
                value = _permute(value, c.num_attention_heads)
            elif inner == "self_attn.k_proj":
                value = _permute(value, c.num_key_value_heads)
        if name not in drop:
            w.add_tensor(name, value.numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("gguf") / "model")


def _logits(model_dir: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.arange(2, 34).unsqueeze(0)).logits


def test_a_gguf_round_trip_gives_the_same_model(tiny, tmp_path):
    write_gguf(tiny, tmp_path / "full.gguf")
    assert main(["import-gguf", str(tmp_path / "full.gguf"), str(tmp_path / "out")]) == 0
    assert torch.allclose(_logits(tmp_path / "out"), _logits(tiny), atol=1e-5)


def test_the_build_folder_of_a_killed_import_is_removed_by_the_next(tiny, tmp_path):
    """A kill before the final rename left `.OUT.importing-XXXX` (the whole dequantised checkpoint; 140 GB at 70B) and
    the rerun finished beside it. A folder a live import holds (its flock; a PID said nothing across PID namespaces,
    where a probe saw one import remove another's live build folder) is kept."""
    from streamsvd.io.fsutil import HELD_MARKER, new_held_folder

    write_gguf(tiny, tmp_path / "full.gguf")
    stale = tmp_path / ".out.importing-12345"  # a killed import's: marked as streamsvd's, nobody holds it
    stale.mkdir()
    (stale / HELD_MARKER).write_bytes(b"")
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    unmarked = tmp_path / ".out.importing-notes"  # not made by an import: never removed
    unmarked.mkdir()
    alive, held = new_held_folder(tmp_path, ".out.importing-")  # another import under way
    try:
        assert main(["import-gguf", str(tmp_path / "full.gguf"), str(tmp_path / "out")]) == 0
        assert not stale.exists() and alive.is_dir()
    finally:
        os.close(held)
    assert torch.allclose(_logits(tmp_path / "out"), _logits(tiny), atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == sorted([alive.name, unmarked.name])
    assert not (tmp_path / "out" / HELD_MARKER).exists()  # the build folder's mark is not part of the checkpoint


def test_a_gguf_that_lacks_a_tensor_is_refused_and_writes_nothing(tiny, tmp_path, capsys):
    """transformers initialised the missing weight at random, save_pretrained saved it, and the import said
    `wrote`: a silently wrong model (logits 17% off)."""
    write_gguf(tiny, tmp_path / "drop.gguf", drop={"blk.1.ffn_down.weight"})
    assert main(["import-gguf", str(tmp_path / "drop.gguf"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "model.layers.1.mlp.down_proj.weight" in err and "fix:" in err
    assert not (tmp_path / "out").exists()


def test_a_gguf_without_its_head_ties_it_to_the_embeddings(tiny, tmp_path):
    """As llama.cpp reads such a file: not a missing tensor."""
    write_gguf(tiny, tmp_path / "nohead.gguf", drop={"output.weight"})
    assert main(["import-gguf", str(tmp_path / "nohead.gguf"), str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True


def test_an_out_dir_under_a_file_is_one_error(tiny, tmp_path, capsys):
    """mkdir of its parent was a FileExistsError traceback."""
    write_gguf(tiny, tmp_path / "full.gguf")
    (tmp_path / "afile").write_text("x")
    capsys.readouterr()
    assert main(["import-gguf", str(tmp_path / "full.gguf"), str(tmp_path / "afile" / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "cannot be made" in err and "fix:" in err and "Traceback" not in err


def test_an_empty_out_dir_given_as_a_link_or_as_the_current_directory_is_filled(tiny, tmp_path, monkeypatch):
    """A link to an empty directory: rmdir raised NotADirectoryError (a traceback, after the whole import); ".": the
    build directory was made inside it and the rename failed as if something else had written there."""
    write_gguf(tiny, tmp_path / "full.gguf")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert main(["import-gguf", str(tmp_path / "full.gguf"), str(tmp_path / "link")]) == 0
    assert torch.allclose(_logits(tmp_path / "real"), _logits(tiny), atol=1e-5)
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert main(["import-gguf", str(tmp_path / "full.gguf"), "."]) == 0
    assert torch.allclose(_logits(tmp_path / "here"), _logits(tiny), atol=1e-5)


def test_a_full_disk_in_safetensors_writer_is_one_error_naming_the_output(tiny, tmp_path, capsys, monkeypatch):
    """safetensors' writer raises its own SafetensorError on ENOSPC, no OSError: it was a traceback (a real 500K
    tmpfs, found by a probe)."""
    import transformers
    from safetensors import SafetensorError

    def full(self, *args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    write_gguf(tiny, tmp_path / "full.gguf")
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", full)
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["import-gguf", str(tmp_path / "full.gguf"), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "Traceback" not in err, err
    assert f"the disk is full while writing {out}" in err
    fix = err.split("fix: ", 1)[1]
    assert "run the same command again" in fix and "--work-dir" not in fix and "blocks" not in fix
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _damaged(src: Path, dest: Path, how: str) -> Path:
    """`src` with one header field changed (a probe's cases, 2026-12-07)."""
    import struct

    raw, reader = src.read_bytes(), gguf.GGUFReader(str(src))
    data = bytearray(raw)

    def offset_field(name):  # a tensor info: name length, name, n_dims, dims, type, offset
        at = next(t for t in reader.tensors if t.name == name).field.offset
        at += 8 + struct.unpack_from("<Q", raw, at)[0]
        return at + 8 + 8 * struct.unpack_from("<I", raw, at)[0]

    def value_at(key):  # a u32 value: key length, key, type, value
        return reader.fields[key].offset + 8 + len(key) + 4

    if how == "tensor count one short":
        struct.pack_into("<Q", data, 8, len(reader.tensors) - 1)
    elif how == "offset off by one":
        at = offset_field("blk.0.attn_q.weight")
        struct.pack_into("<Q", data, at, struct.unpack_from("<Q", raw, at)[0] + 1)
    elif how == "two tensors at one offset":
        struct.pack_into("<Q", data, offset_field("blk.0.attn_q.weight"),
                         struct.unpack_from("<Q", raw, offset_field("blk.0.attn_k.weight"))[0])
    elif how == "block count one short":
        struct.pack_into("<I", data, value_at("llama.block_count"), 1)
    elif how == "head count not dividing the width":
        struct.pack_into("<I", data, value_at("llama.attention.head_count"), 5)
    dest.write_bytes(bytes(data))
    return dest


@pytest.mark.parametrize("how, says", [
    ("tensor count one short", "header and its data do not agree"),  # every tensor read 64 bytes early: imported
    ("offset off by one", "not a multiple of the alignment"),  # imported with q_proj shifted
    ("two tensors at one offset", "belong to no tensor"),  # q_proj imported as k_proj's bytes
    ("block count one short", "holds tensors of 3 blocks, but its metadata says 1"),  # imported with one block
    ("head count not dividing the width", "not a multiple of the number of attention heads"),  # a traceback
])
def test_a_gguf_whose_header_and_tensors_disagree_is_refused(tiny, tmp_path, capsys, how, says):
    write_gguf(tiny, tmp_path / "full.gguf")
    damaged = _damaged(tmp_path / "full.gguf", tmp_path / "damaged.gguf", how)
    assert main(["import-gguf", str(damaged), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and says in err and "fix:" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
