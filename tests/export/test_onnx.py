"""streamsvd export onnx: the graph onnxruntime runs computes the PyTorch model, cache included.

Tolerance: float32 logits within 1e-5 absolute (measured ~2e-7 on these models; docs/RESULTS.md).
"""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="the onnx extra is part of the test extra: pip install -e '.[test]'")

import onnx  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

import streamsvd  # noqa: E402
from streamsvd.cli import main  # noqa: E402
from streamsvd.errors import StreamSVDError  # noqa: E402
from streamsvd.export.onnx import MODEL_FILE, RECORD, OnnxDecoder, export_form, export_onnx, refuse_if_off  # noqa: E402
from streamsvd.job.pipeline import JobConfig, run_job  # noqa: E402
from streamsvd.model.lowrank import PivotedLinear  # noqa: E402
from tiny_models import VOCAB, make_tiny_checkpoint  # noqa: E402

ATOL = 1e-5
LINEARS_PER_LAYER = 7


def _compress(tmp, model_type, **job):
    model = make_tiny_checkpoint(model_type, tmp / "model", num_hidden_layers=2)
    out = tmp / "out"
    run_job(JobConfig(**{"alloc": "uniform", **dict(model_dir=model, out_dir=out, ratio=0.4, calib_samples=4, seqlen=32, progress=False), **job}))
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny llama compressed with pivoted factors (the default), exported in float32."""
    tmp = tmp_path_factory.mktemp("onnx")
    out = _compress(tmp, "llama")
    record = export_onnx(out, tmp / "onnx")
    return out, tmp / "onnx", record


def _ids(batch, length, seed):
    return torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_logits_match_pytorch_for_prefill_and_a_cached_decode_step(exported):
    out, dest, record = exported
    model = streamsvd.load(out)
    assert isinstance(model.model.layers[0].mlp.down_proj, PivotedLinear)
    session = OnnxDecoder(dest)
    ids = _ids(2, 9, seed=4)
    with torch.no_grad():
        first = model(ids, use_cache=True)
        nxt = first.logits[:, -1].argmax(-1, keepdim=True)
        second = model(nxt, cache=first.cache, use_cache=True)
    mask = np.ones((2, 9), dtype=np.int64)
    logits, present = session.step(ids.numpy(), mask, np.broadcast_to(np.arange(9), (2, 9)), session.empty_cache(2))
    np.testing.assert_allclose(logits, first.logits.numpy(), rtol=0, atol=ATOL)
    assert len(present) == 2 * 2 and present[0].shape == (2, 2, 9, 16)
    logits, present = session.step(nxt.numpy(), np.ones((2, 10), dtype=np.int64), np.full((2, 1), 9), present)
    np.testing.assert_allclose(logits, second.logits.numpy(), rtol=0, atol=ATOL)
    np.testing.assert_allclose(present[2], second.cache.layers[1].keys.numpy(), rtol=0, atol=ATOL)
    assert present[0].shape[2] == 10
    # The export's own check ran and recorded the same agreement.
    check = record["check"]
    assert max(check["prefill_max_abs_diff"], check["decode_max_abs_diff"]) < ATOL and check["argmax_agreement"] == 1.0


def test_greedy_generation_in_onnxruntime_gives_generates_tokens(exported):
    out, dest, _ = exported
    model = streamsvd.load(out)
    model.generation_config.eos_token_id = None  # a random model may emit eos: compare all 24 tokens
    session = OnnxDecoder(dest)
    for batch, seed in ((1, 5), (3, 6)):
        prompt = _ids(batch, 6, seed)
        with torch.no_grad():
            want = model.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=0)
        got = session.generate(prompt.numpy(), max_new_tokens=24)
        assert got.shape == (batch, 30)
        np.testing.assert_array_equal(got, want.numpy())


def test_export_dir_holds_model_config_tokenizer_and_factor_matmuls(exported):
    out, dest, record = exported
    assert {"model.onnx", "config.json", "tokenizer.json", RECORD} <= {p.name for p in dest.iterdir()}
    assert json.loads((dest / "config.json").read_text())["model_type"] == "llama"
    assert AutoTokenizer.from_pretrained(dest)("to be or not").input_ids
    graph = onnx.load(str(dest / MODEL_FILE)).graph
    assert [i.name for i in graph.input][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert [o.name for o in graph.output] == ["logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    ops = [n.op_type for n in graph.node]
    assert "Gemm" not in ops
    # Each pivoted linear: two Gathers of rows of x^T (the pivots) + MatMul (in_rest, on the left) + Add + MatMul
    # (out_factor_t) on named initializers; no Gather on the last axis (onnxruntime copies it a float at a time).
    inits = {t.name for t in graph.initializer}
    left = [n.input[0] for n in graph.node if n.op_type == "MatMul" and n.input[0] in inits]
    right = [n.input[1] for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    layers = 2 * LINEARS_PER_LAYER
    assert sum(w.endswith(".in_rest") for w in left) == layers == sum(w.endswith(".out_factor_t") for w in right)
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[1] in inits]
    assert len(gathers) == 2 * layers  # two per pivoted linear (the embedding gathers by input_ids)
    assert all(a.i == 0 for n in gathers for a in n.attribute if a.name == "axis")
    assert record["linears_as_matmul"] == layers and record["int4"] is False
    init = {t.name: t for t in graph.initializer}
    rank = json.loads((out / "config.json").read_text())["streamsvd"]["ranks"]["model.layers.0.mlp.down_proj"]
    assert list(init["model.model.layers.0.mlp.down_proj.out_factor_t"].dims) == [rank, 64]
    assert list(init["model.model.layers.0.mlp.down_proj.in_rest"].dims) == [rank, 160 - rank]


def test_int4_quantises_the_blocks_matmuls_as_balanced_factors_and_keeps_the_head(exported, tmp_path):
    out, dest, record = exported
    rec4 = export_onnx(out, tmp_path / "int4", int4=True, block_size=16)
    graph = onnx.load(str(tmp_path / "int4" / MODEL_FILE)).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == rec4["matmul_nbits"] == 2 * 2 * LINEARS_PER_LAYER
    # Pivoted linears go to 4 bits as balanced plain factors (rounding A' and B' themselves loses far more).
    assert all(n.domain == "com.microsoft" and n.input[1].split("_Q4")[0].endswith(("in_factor_t", "out_factor_t"))
               for n in nbits)
    assert not any(i.endswith("in_rest") for n in graph.node if n.op_type == "MatMul" for i in n.input)
    head = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in {t.name for t in graph.initializer}]
    assert len(head) == 1  # lm_head stays float32
    assert rec4["bytes"] < record["bytes"] and rec4["int4"] and rec4["block_size"] == 16
    # 4 bits move the logits, but they stay the model's: close to PyTorch's, far from chance.
    ids = _ids(1, 12, seed=8)
    with torch.no_grad():
        want = streamsvd.load(out)(ids).logits.numpy()[0]
    session = OnnxDecoder(tmp_path / "int4")
    got = session.step(ids.numpy(), np.ones((1, 12), np.int64), np.arange(12)[None], session.empty_cache(1))[0][0]
    assert 0 < np.abs(got - want).max() and np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.9
    assert rec4["check"]["max_rel_diff"] > 0  # reported, not refused
    assert len(session.generate(ids.numpy(), 4)[0]) == 16


@pytest.mark.parametrize("form", ["columns", "folded"])
def test_the_other_pivoted_forms_compute_the_same_logits(exported, tmp_path, capsys, form):
    out, default, record = exported
    assert main(["export", "onnx", str(out), str(tmp_path / form), "--onnx-pivoted", form]) == 0  # checked, or refused
    graph = onnx.load(str(tmp_path / form / MODEL_FILE)).graph
    inits = {t.name for t in graph.initializer}
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[1] in inits]
    axes = {a.i for n in gathers for a in n.attribute if a.name == "axis"}
    if form == "columns":  # PyTorch's formulation: gathers along the features
        assert len(gathers) == 2 * 2 * LINEARS_PER_LAYER and axes == {-1}
    else:  # one MatMul by [I | B'] P^T (in x r) and one by A'^T, no gathers: r^2 more numbers
        assert not gathers
        assert json.loads((tmp_path / form / RECORD).read_text())["bytes"] > record["bytes"]
    ids = _ids(2, 9, seed=4)
    mask, pos = np.ones((2, 9), np.int64), np.broadcast_to(np.arange(9), (2, 9))
    want = OnnxDecoder(default).step(ids.numpy(), mask, pos, OnnxDecoder(default).empty_cache(2))[0]
    session = OnnxDecoder(tmp_path / form)
    np.testing.assert_allclose(session.step(ids.numpy(), mask, pos, session.empty_cache(2))[0], want, rtol=0, atol=ATOL)
    capsys.readouterr()
    assert main(["export", "onnx", str(out), str(tmp_path / "q"), "--onnx-int4", "--onnx-pivoted", form]) == 2
    assert "--onnx-pivoted applies to float32 exports" in capsys.readouterr().err


def test_balanced_factors_compute_the_pivoted_product(exported):
    model = streamsvd.load(exported[0])
    ids = _ids(2, 9, seed=1)
    with torch.no_grad():
        want = model(ids).logits
        assert export_form(model, "balanced") == 2 * LINEARS_PER_LAYER
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert not any(isinstance(m, PivotedLinear) for m in model.modules())


def test_cli_exports_plain_factors_with_biases_and_external_data(tmp_path, capsys, monkeypatch):
    """qwen2 (q/k/v biases, tied head) compressed with --factors plain: two MatMuls + bias per linear;
    the weights in model.onnx.data, as a model over 1 GiB would have them."""
    import streamsvd.export.onnx as onnx_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    out = _compress(tmp_path, "qwen2", factors="plain")
    # no pivoted factors for --onnx-pivoted to shape: it was ignored, silently
    assert main(["export", "onnx", str(out), str(tmp_path / "columns"), "--onnx-pivoted", "columns"]) == 2
    err = capsys.readouterr().err
    assert "error: --onnx-pivoted columns" in err and "--factors plain" in err and "fix: drop --onnx-pivoted" in err
    assert "Traceback" not in err and not (tmp_path / "columns").exists()
    assert main(["export", "onnx", str(out), str(tmp_path / "onnx")]) == 0
    assert (tmp_path / "onnx" / "model.onnx.data").stat().st_size > 100_000
    inline = onnx.load(str(tmp_path / "onnx" / MODEL_FILE), load_external_data=False).graph.initializer
    assert not [t.name for t in inline if t.data_location != onnx.TensorProto.EXTERNAL and len(t.raw_data) > 1024]
    printed = capsys.readouterr().out
    assert "14 linears as MatMuls" in printed and "onnxruntime vs PyTorch" in printed
    record = json.loads((tmp_path / "onnx" / RECORD).read_text())
    assert record["check"]["max_rel_diff"] < 1e-5
    weights = [n.input[1] for n in onnx.load(str(tmp_path / "onnx" / MODEL_FILE)).graph.node if n.op_type == "MatMul"]
    assert sum(w.endswith(".in_factor_t") for w in weights) == 2 * LINEARS_PER_LAYER
    model = streamsvd.load(out)
    model.generation_config.eos_token_id = None
    prompt = _ids(1, 5, seed=9)
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    np.testing.assert_array_equal(OnnxDecoder(tmp_path / "onnx").generate(prompt.numpy(), 12), want.numpy())


def test_missing_onnx_packages_give_an_install_fix(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    assert main(["export", "onnx", str(tmp_path), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "onnxruntime" in err and "pip install 'streamsvd[onnx]'" in err
    assert not (tmp_path / "x").exists()


def test_a_non_empty_destination_is_refused(exported, tmp_path, capsys):
    out, _, _ = exported
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert main(["export", "onnx", str(out), str(tmp_path / "busy")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["notes.txt"]
    assert main(["export", "onnx", str(out), str(tmp_path / "y"), "--onnx-int4", "--onnx-block-size", "24"]) == 2
    assert "power of two" in capsys.readouterr().err
    # --onnx-pivoted rows, the float32 default, did nothing with --onnx-int4, silently
    assert main(["export", "onnx", str(out), str(tmp_path / "y"), "--onnx-int4", "--onnx-pivoted", "rows"]) == 2
    assert "--onnx-pivoted applies to float32 exports" in capsys.readouterr().err and not (tmp_path / "y").exists()
    # without --onnx-int4 the block size did nothing, silently
    assert main(["export", "onnx", str(out), str(tmp_path / "z"), "--onnx-block-size", "64"]) == 2
    err = capsys.readouterr().err
    assert "--onnx-block-size" in err and "--onnx-int4" in err and not (tmp_path / "z").exists()


def test_a_destination_under_a_file_is_refused_before_the_export(exported, tmp_path, capsys):
    """It passed the checks and, after the whole export, mkdir stopped with a NotADirectoryError traceback."""
    out, _, _ = exported
    (tmp_path / "afile").write_text("x")
    assert main(["export", "onnx", str(out), str(tmp_path / "afile" / "onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "cannot be made" in err and "  fix: " in err and "Traceback" not in err


def test_a_second_export_leaves_none_of_the_first_models_side_files(exported, tmp_path):
    """Exporting into an earlier export's DIR overwrote the files the new model has and kept the others: a model
    without a chat template got the earlier model's chat_template.jinja (and generation config, tokenizer files)."""
    out, dest, _ = exported
    again = tmp_path / "again"
    again.mkdir()
    for path in dest.iterdir():
        (again / path.name).write_bytes(path.read_bytes())
    (again / "chat_template.jinja").write_text("{{ 'the other model' }}")
    (again / "tokenizer.model").write_bytes(b"the other model's")
    export_onnx(out, again, check=False)
    assert not (again / "chat_template.jinja").exists() and not (again / "tokenizer.model").exists()
    assert (again / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()


def test_the_exports_config_says_float32_whatever_the_source_stored(tmp_path):
    """The graph computes in float32; its config.json said the source's dtype (bfloat16), which tools that size
    buffers or pick kernels from config.json read."""
    from streamsvd.export.onnx import _copy_side_files

    model_dir = make_tiny_checkpoint("llama", tmp_path / "model", dtype=torch.bfloat16)
    assert json.loads((model_dir / "config.json").read_text())["dtype"] == "bfloat16"
    (tmp_path / "dest").mkdir()
    _copy_side_files(model_dir, tmp_path / "dest")
    config = json.loads((tmp_path / "dest" / "config.json").read_text())
    assert config["dtype"] == "float32" and config.get("torch_dtype", "float32") == "float32"


def test_an_export_killed_over_an_earlier_one_is_taken_again_by_the_same_command(exported, tmp_path, monkeypatch):
    """The earlier export's record went first, then the new graph was saved: a kill in between left a DIR the same
    command refused ('not empty and holds no earlier ONNX export'). The DIR of an export under way is taken again."""
    import streamsvd.export.onnx as onnx_module

    out, dest, _ = exported
    again = tmp_path / "again"
    again.mkdir()
    for path in dest.iterdir():
        (again / path.name).write_bytes(path.read_bytes())

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(onnx, "save_model", killed)
        with pytest.raises(KeyboardInterrupt):
            export_onnx(out, again, check=False)
    assert not (again / RECORD).exists()
    # a SIGKILL inside config.json's atomic write left its temporary, which the rerun kept beside the finished export
    stale = again / ".config.json.tmp-4194999"
    stale.write_text("{")
    record = export_onnx(out, again, check=False)
    assert json.loads((again / RECORD).read_text()) == record and not (again / onnx_module.PARTIAL).exists()
    assert OnnxDecoder(again).session is not None
    assert not stale.exists() and not [p.name for p in again.iterdir() if ".tmp" in p.name]


def test_an_export_killed_before_its_check_ended_leaves_no_model_onnx(exported, tmp_path, monkeypatch):
    """model.onnx was written under its own name before onnxruntime checked it: a kill during the check left a
    model.onnx onnxruntime opens beside config.json and the tokenizer, never checked, marked unfinished only by a
    hidden file. The graph is now checked under a hidden name and renamed last; the rerun finishes and tidies it."""
    import streamsvd.export.onnx as onnx_module

    out, _, _ = exported
    dest = tmp_path / "killed"

    def killed(path, *args, **kwargs):
        assert path.name == onnx_module.STAGED_FILE and path.is_file()  # what the check opens: the staged graph
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(onnx_module, "_check", killed)
        with pytest.raises(KeyboardInterrupt):
            export_onnx(out, dest)
    assert not (dest / MODEL_FILE).exists() and not (dest / RECORD).exists()
    assert (dest / onnx_module.STAGED_FILE).exists() and (dest / onnx_module.PARTIAL).exists()
    record = export_onnx(out, dest)
    names = sorted(p.name for p in dest.iterdir())
    assert MODEL_FILE in names and RECORD in names and not [n for n in names if n.startswith(".")]
    assert record["check"]["max_rel_diff"] < 1e-4 and OnnxDecoder(dest).session is not None


def test_a_left_padded_decode_step_past_the_sliding_window_matches_pytorch(tmp_path):
    """Gemma's sliding-window layers: the cache built from a past of window - 1 tokens counted only those as seen, and
    the layer's mask then took the first columns of attention_mask, not the last: once the window had filled, a
    left-padded row's decode step was wrong (logits off by 0.5 of 0.6) while unpadded rows and the check were right."""
    model_dir = make_tiny_checkpoint("gemma3_text", tmp_path / "model", num_hidden_layers=2,
                                     layer_types=["sliding_attention", "full_attention"])
    out = tmp_path / "out"
    run_job(JobConfig(alloc="uniform", model_dir=model_dir, out_dir=out, ratio=0.4, calib_samples=4, seqlen=32, progress=False))
    export_onnx(out, tmp_path / "onnx", check=False)
    model, session = streamsvd.load(out), OnnxDecoder(tmp_path / "onnx")
    ids = _ids(2, 12, seed=7)  # 12 tokens past a window of 8
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :5] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    nxt, mask2, pos2 = torch.tensor([[3], [4]]), torch.ones(2, 13, dtype=torch.long), pos[:, -1:] + 1
    mask2[0, :5] = 0
    with torch.no_grad():
        want = model(torch.cat([ids, nxt], 1), attention_mask=mask2, position_ids=torch.cat([pos, pos2], 1)).logits
    _, present = session.step(ids.numpy(), mask.numpy(), pos.numpy(), session.empty_cache(2))
    logits, _ = session.step(nxt.numpy(), mask2.numpy(), pos2.numpy(), present)
    np.testing.assert_allclose(logits, want[:, -1:].numpy(), rtol=0, atol=ATOL)


def test_the_exports_own_check_catches_a_wrong_padded_decode_past_the_sliding_window(tmp_path, monkeypatch):
    """The check ran only unpadded batches, so the sliding-window cache bug above passed it. It now also runs a
    left-padded prefill past the window and a decode step on its cache, against one uncached pass: with that bug put
    back (the traced cache built from the config) the export is refused; without it, the padded row agrees."""
    import transformers

    model_dir = make_tiny_checkpoint("gemma3_text", tmp_path / "model", num_hidden_layers=2,
                                     layer_types=["sliding_attention", "full_attention"])
    out = tmp_path / "out"
    run_job(JobConfig(alloc="uniform", model_dir=model_dir, out_dir=out, ratio=0.4, calib_samples=4, seqlen=32, progress=False))
    record = export_onnx(out, tmp_path / "good")
    assert record["check"]["padded_decode_max_abs_diff"] < ATOL
    config = streamsvd.load(out).config

    class BuiltFromTheConfig(transformers.DynamicCache):  # the cache as the export built it before
        def __init__(self, *args, **kwargs):
            super().__init__(*args, config=config, **kwargs)

    monkeypatch.setattr(transformers, "DynamicCache", BuiltFromTheConfig)
    with pytest.raises(StreamSVDError, match="differ from PyTorch's"):
        export_onnx(out, tmp_path / "bad")
    assert not (tmp_path / "bad" / MODEL_FILE).exists()


def test_a_float_graph_off_beyond_the_tolerance_is_removed(tmp_path):
    for name in (MODEL_FILE, "model.onnx.data"):
        (tmp_path / name).write_bytes(b"graph")
    refuse_if_off(tmp_path, {"int4": True, "check": {"max_rel_diff": 0.5}})  # int4: reported, kept
    refuse_if_off(tmp_path, {"int4": False, "check": {"max_rel_diff": 3e-5}})  # SmolLM2's figure: kept
    assert (tmp_path / MODEL_FILE).exists()
    for name in ("config.json", "tokenizer.json", "notes.txt"):
        (tmp_path / name).write_text("{}")
    with pytest.raises(StreamSVDError, match="differ from PyTorch's by 2.00e-02"):
        refuse_if_off(tmp_path, {"int4": False, "check": {"max_rel_diff": 0.02}})
    assert not (tmp_path / MODEL_FILE).exists() and not (tmp_path / "model.onnx.data").exists()
    # the export's side files went too (left, they made the same command's DIR "not empty and holds no earlier ONNX
    # export"); a file of the user's stays
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
