"""`streamsvd export dense`: an ordinary checkpoint of the base family, loaded by plain transformers.

Its logits match streamsvd.load's within rtol 1e-4 / atol 1e-5 (float32: the export rounds each
product computed in float64 once; streamsvd.load runs two float32 matmuls).
"""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import streamsvd
from streamsvd.cli import main
from streamsvd.io.checkpoint import INDEX_NAME
from streamsvd.model.remote import MODELING_FILE


def _logits(model):
    ids = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def exported(tiny_outputs, tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    return {family: root / family for family in tiny_outputs}


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text"])
def test_dense_export_loads_with_plain_transformers_and_matches_streamsvd_load(tiny_outputs, exported, family, capsys):
    model_dir, out = tiny_outputs[family]
    dest = exported[family]
    assert main(["export", "dense", str(out), str(dest)]) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: a dense export gives the size back") and "MB of weights instead of the" in err
    config = json.loads((dest / "config.json").read_text())
    original = json.loads((model_dir / "config.json").read_text())
    assert config == original  # the base family's config.json, no streamsvd section, no auto_map
    model, info = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))
    want = _logits(streamsvd.load(out))
    torch.testing.assert_close(_logits(model), want, rtol=1e-4, atol=1e-5)
    # Same tensor names and shapes as the original checkpoint, and the original's size on disk.
    index = json.loads((dest / INDEX_NAME).read_text())
    source = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    tied = getattr(model.config, "tie_word_embeddings", False)
    assert set(index["weight_map"]) == {k for k in source if not (tied and k == "lm_head.weight")}
    assert index["metadata"]["total_size"] == sum(source[k].numel() * 4 for k in index["weight_map"])
    assert not (dest / MODELING_FILE).exists() and not list(dest.glob("streamsvd_*"))
    assert list(out.glob("*.png")) and not list(dest.glob("*.png"))  # the job's plots are not the checkpoint's
    assert (dest / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()


def test_dense_shards_hold_one_block_each(tiny_outputs, tmp_path):
    _, out = tiny_outputs["llama"]
    dest = tmp_path / "dense"
    assert main(["export", "dense", str(out), str(dest)]) == 0
    shards = sorted(dest.glob("model-*.safetensors"))
    assert [p.name for p in shards] == sorted(p.name for p in out.glob("model-*.safetensors"))
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            blocks = {k.split(".")[2] for k in f.keys() if k.startswith("model.layers.")}
        assert len(blocks) <= 1, f"{shard.name} holds blocks {blocks}"


def _assert_refused(capsys, rc, *words):
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert rc == 2 and lines[0].startswith("error: ") and lines[1].startswith("  fix: ") and len(lines) == 2, captured.err
    assert "Traceback" not in captured.err
    for word in words:
        assert word in lines[0], lines[0]


def test_bad_input_is_one_error_and_one_fix(tiny_outputs, tmp_path, capsys):
    model_dir, out = tiny_outputs["llama"]
    _assert_refused(capsys, main(["export", "dense", str(model_dir), str(tmp_path / "a")]), "not a streamsvd output")
    _assert_refused(capsys, main(["export", "dense", str(tmp_path / "nowhere"), str(tmp_path / "b")]), "not a directory")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    _assert_refused(capsys, main(["export", "dense", str(out), str(busy)]), "not an empty directory")
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    afile = tmp_path / "afile"
    afile.write_text("x")
    _assert_refused(capsys, main(["export", "dense", str(out), str(afile)]), "not an empty directory")
    _assert_refused(capsys, main(["export", "dense", str(out), str(out)]), "not an empty directory")
    # An unfinished output (no index yet).
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    for path in out.iterdir():
        if path.is_file() and path.name != INDEX_NAME:
            (unfinished / path.name).write_bytes(path.read_bytes())
    _assert_refused(capsys, main(["export", "dense", str(unfinished), str(tmp_path / "c")]), "unfinished")
    assert not any((tmp_path / name).exists() for name in ("a", "b", "c"))


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantised_factors_are_dequantised_into_the_dense_weights(tiny_outputs, tmp_path, quant, capsys):
    """export dense of a quantised output was refused (before that, a KeyError): its weights are now the products of
    the dequantised factors, so plain transformers computes what streamsvd.load of the quantised output does."""
    _, out = tiny_outputs["llama"]
    quantised, dest = tmp_path / "q", tmp_path / "dense"
    assert main(["quantize", str(out), str(quantised), "--quant", quant, "--group-size", "32"]) == 0
    assert main(["export", "dense", str(quantised), str(dest)]) == 0
    capsys.readouterr()
    model, info = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    want = _logits(streamsvd.load(quantised))
    torch.testing.assert_close(_logits(model), want, rtol=1e-4, atol=1e-5)
    assert (_logits(model) - _logits(streamsvd.load(out))).abs().max() > 1e-4  # the rounding is in it, not undone
    index = json.loads((dest / INDEX_NAME).read_text())
    assert not any(k.endswith(("_packed", "_scale", "_zero_point", "_shape")) for k in index["weight_map"])
    plain = tmp_path / "plain"
    assert main(["export", "dense", str(out), str(plain)]) == 0
    assert index["metadata"] == json.loads((plain / INDEX_NAME).read_text())["metadata"]  # the same dense size


def test_a_destination_under_a_file_is_one_error_and_one_fix(tiny_outputs, tmp_path, capsys):
    """DIR (or NEW_DIR) below a file passed the checks, and mkdir then stopped with a NotADirectoryError traceback."""
    _, out = tiny_outputs["llama"]
    afile = tmp_path / "afile"
    afile.write_text("x")
    _assert_refused(capsys, main(["export", "dense", str(out), str(afile / "dense")]), "cannot be made", str(afile))
    _assert_refused(capsys, main(["quantize", str(out), str(afile / "q" / "deeper"), "--quant", "int8"]),
                    "cannot be made", str(afile))
    assert afile.read_text() == "x"
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")  # mkdir: FileExistsError
    _assert_refused(capsys, main(["export", "dense", str(out), str(tmp_path / "dangling")]), "cannot be made")


def test_a_stopped_export_is_finished_by_the_same_command(tiny_outputs, tmp_path, capsys, monkeypatch):
    """A killed export left shards without an index, and the same command refused DIR as not empty: a 70B export
    (140 GB) had to start over. Now the shards it wrote whole are kept and the rest written."""
    import streamsvd.export.dense as dense

    _, out = tiny_outputs["llama"]
    whole = tmp_path / "whole"
    assert main(["export", "dense", str(out), str(whole)]) == 0
    dest = tmp_path / "dense"
    real_save, saved = dense.save_file, []

    def stop_after_two(tensors, path, metadata=None):
        if len(saved) == 2:
            raise KeyboardInterrupt  # the export killed while writing its third shard
        real_save(tensors, path, metadata=metadata)
        saved.append(path)

    monkeypatch.setattr(dense, "save_file", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        dense.export_dense(out, dest, log=lambda line: None)
    monkeypatch.setattr(dense, "save_file", real_save)
    assert (dest / dense.PARTIAL).exists() and not (dest / INDEX_NAME).exists()
    first = sorted(dest.glob("model-*.safetensors"))
    assert len(first) == 2
    stamps = {p.name: p.stat().st_mtime_ns for p in first}
    # A half-written shard a kill can leave under the final name (a copy from elsewhere): not kept.
    broken = sorted(whole.glob("model-*.safetensors"))[-1]
    (dest / broken.name).write_bytes(broken.read_bytes()[:200])
    # A byte changed in a kept shard's data (its header intact) was kept, and the export said it was done.
    changed = bytearray(first[1].read_bytes())
    changed[-1] ^= 0x01
    first[1].write_bytes(bytes(changed))
    stamps.pop(first[1].name)
    capsys.readouterr()
    assert main(["export", "dense", str(out), str(dest)]) == 0
    assert "1 shard kept from the stopped export" in capsys.readouterr().out
    assert not (dest / dense.PARTIAL).exists()
    assert {p.name: p.stat().st_mtime_ns for p in first[:1]} == stamps  # kept, not written again
    for path in whole.iterdir():
        assert (dest / path.name).read_bytes() == path.read_bytes(), path.name
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in whole.iterdir())
    # A SIGKILL while a shard was written leaves its temporary (`.NAME.tmp-PID`, never renamed into place): the same
    # command finished the export and kept that partial shard in DIR for good.
    stopped = tmp_path / "stopped"
    monkeypatch.setattr(dense, "save_file", stop_after_two)
    saved.clear()
    with pytest.raises(KeyboardInterrupt):
        dense.export_dense(out, stopped, log=lambda line: None)
    monkeypatch.setattr(dense, "save_file", real_save)
    stale = [stopped / f".{broken.name}.tmp-4194999", stopped / ".config.json.tmp-4194999"]
    for path in stale:
        path.write_bytes(b"partial")
    assert main(["export", "dense", str(out), str(stopped)]) == 0
    assert not any(path.exists() for path in stale)
    assert sorted(p.name for p in stopped.iterdir()) == sorted(p.name for p in whole.iterdir())
    capsys.readouterr()
    # A kill during the marker's own first write leaves only its temporary: DIR is as good as empty.
    first = tmp_path / "first"
    first.mkdir()
    (first / f".{dense.PARTIAL}.tmp-4194999").write_text("{")
    assert main(["export", "dense", str(out), str(first)]) == 0
    assert sorted(p.name for p in first.iterdir()) == sorted(p.name for p in whole.iterdir())
    capsys.readouterr()
    # A stopped export of another output is not finished from this one.
    other = tmp_path / "other"
    other.mkdir()
    (other / dense.PARTIAL).write_text('{"source": "/elsewhere", "identity": "0"}')
    (other / "model-00001-of-00009.safetensors").write_bytes(b"x")
    _assert_refused(capsys, main(["export", "dense", str(out), str(other)]), "stopped dense export of another output",
                    "/elsewhere")
