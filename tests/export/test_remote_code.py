"""OUT_DIR loads with plain transformers (trust_remote_code=True) where streamsvd cannot be imported.

The checks that run the remote code run in one child process that blocks every import of streamsvd
(a meta-path finder raising ImportError) and keeps transformers' module cache in tmp_path; its
results are asserted by the tests below. Logits are compared with torch.equal (bit for bit): the
remote code builds the same modules (the same classes, model/remote/modeling_streamsvd.py) and both
sides run single-threaded.
"""

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import streamsvd
from streamsvd.cli import main
from streamsvd.io.checkpoint import Checkpoint
from streamsvd.job.lock import JobLocks
from streamsvd.job.state import STATE_NAME, read_state
from streamsvd.model.architecture import check_supported
from streamsvd.model.lowrank import LowRankLinear, PivotedLinear
from streamsvd.model.remote import MODELING_FILE, modeling_source
from streamsvd.model.remote.modeling_streamsvd import SECTION, base_config_dict

from tiny_models import record_edits


CHILD = textwrap.dedent('''
    import importlib.abc, json, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "streamsvd" or name.startswith("streamsvd."):
                raise ImportError("streamsvd is blocked in this process")
    sys.meta_path.insert(0, Block())
    import torch
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    cases, refused = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    result = {"cases": {}}
    try:
        import streamsvd  # noqa: F401
        result["streamsvd_importable"] = True
    except ImportError:
        result["streamsvd_importable"] = False
    try:  # first, before any remote class is registered in this process
        AutoModelForCausalLM.from_pretrained(cases[0]["out"])
        result["plain"] = "loaded"
    except Exception as e:
        result["plain"] = f"{type(e).__name__}: {e}"
    for case in cases:
        ref = torch.load(case["ref"])
        model = AutoModelForCausalLM.from_pretrained(case["out"], trust_remote_code=True)
        with torch.no_grad():
            logits = model(ref["ids"]).logits
        tokens = model.generate(ref["ids"][:1, :6], max_new_tokens=5, do_sample=False)
        tokenizer = AutoTokenizer.from_pretrained(case["out"], trust_remote_code=True)
        result["cases"][case["out"]] = {
            "equal": bool(torch.equal(logits, ref["logits"])),
            "max_diff": float((logits - ref["logits"]).abs().max()),
            "tokens": tokens.tolist(), "classes": [c.__name__ for c in type(model).__mro__[:2]],
            "layer": type(model.model.layers[0].self_attn.o_proj).__name__,
            "encoded": tokenizer("To be, or not to be").input_ids,
        }
    for name, (out, kwargs) in refused.items():
        try:
            AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, **kwargs)
            result[name] = "loaded"
        except Exception as e:
            result[name] = f"{type(e).__name__}: {e}"
    # save_pretrained of a remote-loaded model (a pivoted and a quantised output), loaded again both ways
    result["saved"] = {}
    for case in [cases[0]] + [c for c in cases if c["out"].endswith("int8")]:
        model = AutoModelForCausalLM.from_pretrained(case["out"], trust_remote_code=True)
        ids = torch.load(case["ref"])["ids"]
        dest = "saved-" + case["out"].rstrip("/").split("/")[-1]
        model.save_pretrained(dest)
        again = AutoModelForCausalLM.from_pretrained(dest, trust_remote_code=True)
        with torch.no_grad():
            equal = bool(torch.equal(again(ids).logits, model(ids).logits))
        try:
            AutoModelForCausalLM.from_pretrained(dest)
            plain = "loaded"
        except Exception as e:
            plain = f"{type(e).__name__}: {e}"
        result["saved"][case["out"]] = {"equal": equal, "plain": plain, "config": json.load(open(dest + "/config.json"))}
    result["modules"] = sorted(m for m in sys.modules if m.split(".")[0] == "streamsvd")
    print("RESULT " + json.dumps(result))
''')


def _ids():
    return torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(3))


def _reference(out):
    """streamsvd.load's logits and greedy tokens, single-threaded like the child."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = streamsvd.load(out)
        with torch.no_grad():
            logits = model(_ids()).logits
        tokens = model.generate(_ids()[:1, :6], max_new_tokens=5, do_sample=False)
    finally:
        torch.set_num_threads(threads)
    return logits, tokens, model


@pytest.fixture(scope="module")
def outputs(tiny_outputs):
    return {family: out for family, (_, out) in tiny_outputs.items()}


@pytest.fixture(scope="module")
def child(outputs, tmp_path_factory):
    """Run the remote-code checks once in a process where `import streamsvd` fails."""
    root = tmp_path_factory.mktemp("child")
    cases, refs = [], {}
    for family, out in outputs.items():
        logits, tokens, _ = _reference(out)
        torch.save({"ids": _ids(), "logits": logits}, root / f"{family}.pt")
        cases.append({"out": str(out), "ref": str(root / f"{family}.pt")})
        refs[str(out)] = tokens.tolist()
    # Quantised copies (packed int8 / int4 factors): the remote code dequantises them as streamsvd.load does.
    for quant in ("int8", "int4"):
        packed = root / f"llama-{quant}"
        assert main(["quantize", str(outputs["llama"]), str(packed), "--quant", quant, "--group-size", "32"]) == 0
        logits, tokens, _ = _reference(packed)
        torch.save({"ids": _ids(), "logits": logits}, root / f"llama-{quant}.pt")
        cases.append({"out": str(packed), "ref": str(root / f"llama-{quant}.pt")})
        refs[str(packed)] = tokens.tolist()
    # A copy whose config claims a plain form where the shards hold pivoted factors (the state records that config).
    damaged = _copy(outputs["llama"], root / "damaged")
    config = json.loads((damaged / "config.json").read_text())
    config[SECTION]["forms"]["model.layers.1.mlp.up_proj"] = "plain"
    (damaged / "config.json").write_text(json.dumps(config))
    record_edits(damaged, "config.json")
    refused = {"damaged": (str(damaged), {}), **_damaged_copies(outputs["llama"], root / "llama-int8", root)}
    # A copy a `streamsvd run` is writing (it holds the folder's flock exclusively while the child loads).
    locked = root / "locked"
    shutil.copytree(outputs["llama"], locked)
    writing = JobLocks()
    writing.take_folder(locked, "OUT_DIR")
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(root / "hf_modules"), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    try:
        refused["locked"] = (str(locked), {})
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cases), json.dumps(refused)],
                              capture_output=True, text=True, env=env, cwd=root, timeout=300, stdin=subprocess.DEVNULL)
    finally:
        writing.release()
    line = next((l for l in proc.stdout.splitlines() if "RESULT " in l), None)  # after transformers' prompt text
    assert line is not None, proc.stdout + proc.stderr
    return json.loads(line.split("RESULT ", 1)[1]), refs


def _copy(out, dest):
    shutil.copytree(out, dest)
    return dest


def _tensor_span(shard, suffix):
    """(name, dtype, start, end) in the file of the first tensor whose name ends with `suffix`."""
    raw = shard.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    name = next(k for k in sorted(header) if k.endswith(suffix))
    lo, hi = header[name]["data_offsets"]
    return name, header[name]["dtype"], 8 + size + lo, 8 + size + hi


def _patch(path, start, data):
    raw = bytearray(path.read_bytes())
    raw[start:start + len(data)] = data
    path.write_bytes(bytes(raw))


def _damaged_copies(out, quantized, root):
    """name -> (folder, from_pretrained kwargs): outputs the remote code loaded as other models before 2026-12-07."""
    shard = next(p.name for p in sorted(out.glob("model-*.safetensors")) if "pivots" in p.read_text(errors="ignore"))
    cases = {}
    flipped = _copy(out, root / "flipped")  # one byte of a factor, same size: another model
    _, _, start, end = _tensor_span(flipped / shard, ".out_factor")
    _patch(flipped / shard, (start + end) // 2, bytes([flipped.joinpath(shard).read_bytes()[(start + end) // 2] ^ 0x40]))
    cases["flipped"] = (str(flipped), {})
    unfinished = _copy(out, root / "unfinished")  # a stopped job's state (its own digest right)
    state = read_state(unfinished)
    state.complete = False
    state.save(unfinished)
    cases["unfinished"] = (str(unfinished), {})
    edited = _copy(flipped, root / "edited")  # the flipped byte's sha256 put in by hand: the state's own digest differs
    record = json.loads((edited / STATE_NAME).read_text())
    record["files"][shard]["sha256"] = hashlib.sha256((edited / shard).read_bytes()).hexdigest()
    (edited / STATE_NAME).write_text(json.dumps(record))
    cases["edited state"] = (str(edited), {})
    completed = _copy(unfinished, root / "completed")  # `complete` set by hand on a stopped job's state
    record = json.loads((completed / STATE_NAME).read_text())
    (completed / STATE_NAME).write_text(json.dumps({**record, "complete": True}))
    cases["completed by hand"] = (str(completed), {})
    stray = _copy(out, root / "stray")  # a model.safetensors the job did not write: transformers reads it first
    shutil.copyfile(stray / shard, stray / "model.safetensors")
    cases["stray model.safetensors"] = (str(stray), {})
    stateless = _copy(out, root / "stateless")
    (stateless / STATE_NAME).unlink()
    cases["stateless"] = (str(stateless), {})
    cases["stateless unchecked"] = (str(stateless), {"streamsvd_verify": False})
    repeated = _copy(out, root / "repeated")  # a pivot written twice: checked whatever the sha256 check
    _, dtype, start, _ = _tensor_span(repeated / shard, ".pivots")
    width = {"I32": 4, "I64": 8}[dtype]
    _patch(repeated / shard, start + width, repeated.joinpath(shard).read_bytes()[start:start + width])
    cases["repeated pivot"] = (str(repeated), {"streamsvd_verify": False})
    bits = _copy(quantized, root / "bits")  # int8 words read as int4: other numbers
    config = json.loads((bits / "config.json").read_text())
    config[SECTION]["quantization"]["num_bits"] = 4
    (bits / "config.json").write_text(json.dumps(config))
    record_edits(bits, "config.json")
    cases["bits"] = (str(bits), {})
    return cases


def test_the_child_cannot_import_streamsvd(child):
    result, _ = child
    assert result["streamsvd_importable"] is False and result["modules"] == []


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text"])  # tests/export/conftest.py CASES
def test_remote_code_gives_the_same_logits_and_tokens_as_streamsvd_load(child, outputs, family):
    result, refs = child
    case = result["cases"][str(outputs[family])]
    assert case["equal"], f"max |diff| {case['max_diff']}"
    assert case["tokens"] == refs[str(outputs[family])]
    # The base family's own class (subclassed), with streamsvd's layers swapped in.
    base = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}[family]
    assert case["classes"] == ["StreamSVD" + base, base]
    assert case["layer"] == ("LowRankLinear" if family == "qwen2" else "PivotedLinear")
    assert len(case["encoded"]) > 3


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_remote_code_dequantises_a_quantised_output_as_streamsvd_load_does(child, quant):
    result, refs = child
    out = next(o for o in result["cases"] if o.endswith(f"llama-{quant}"))
    case = result["cases"][out]
    assert case["equal"], f"max |diff| {case['max_diff']}"
    assert case["tokens"] == refs[out]
    assert case["classes"] == ["StreamSVDLlamaForCausalLM", "LlamaForCausalLM"] and case["layer"] == "PivotedLinear"


def test_a_remote_loaded_model_saved_with_save_pretrained_loads_again_where_streamsvd_is_not_installed(child):
    """transformers' own save_pretrained wrote the base family's config.json beside the factors: from_pretrained of
    that folder, with or without trust_remote_code, built the base model with every compressed weight random (only a
    load report said so; a probe, 2026-12-07). It is saved as an output now: the same logits with the remote code, a
    refusal naming trust_remote_code without it."""
    result, _ = child
    assert len(result["saved"]) == 2
    for out, saved in result["saved"].items():
        assert saved["equal"], out
        assert saved["plain"].startswith("ValueError") and "trust_remote_code=True" in saved["plain"], saved["plain"]
        config = saved["config"]
        assert config["model_type"] == "streamsvd" and config["auto_map"]["AutoModelForCausalLM"].endswith("ForCausalLM")
        assert config[SECTION]["saved_copy"] is True and "quantization" not in config[SECTION]  # saved as floats


@pytest.mark.parametrize("quantized", [False, True])
def test_streamsvd_load_then_save_pretrained_loads_again_both_ways(outputs, tmp_path, quantized):
    """streamsvd.load's model saves as an output too; streamsvd.load and the remote code read the copy (it has no
    state file: it is read as it is), and a push to the hub straight from save_pretrained is refused."""
    from transformers import AutoModelForCausalLM

    out = outputs["llama"]
    if quantized:
        out = tmp_path / "int8"
        assert main(["quantize", str(outputs["llama"]), str(out), "--quant", "int8"]) == 0
    model = streamsvd.load(out)
    with torch.no_grad():
        ref = model(_ids()).logits
    model.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved" / STATE_NAME).exists()
    assert (tmp_path / "saved" / MODELING_FILE).read_bytes() == modeling_source()
    with torch.no_grad():
        assert torch.equal(streamsvd.load(tmp_path / "saved")(_ids()).logits, ref)
        remote = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", trust_remote_code=True)
        assert torch.equal(remote(_ids()).logits, ref)
    with pytest.raises(ValueError, match="upload_folder"):
        model.save_pretrained(tmp_path / "pushed", push_to_hub=True)


def test_plain_from_pretrained_refuses_and_names_trust_remote_code(child):
    result, _ = child
    assert result["plain"].startswith("ValueError") and "trust_remote_code=True" in result["plain"]


def test_remote_code_refuses_a_config_that_does_not_match_the_shards(child):
    result, _ = child
    assert result["damaged"].startswith("ValueError") and "does not match its streamsvd config" in result["damaged"]
    assert "up_proj" in result["damaged"]


def test_remote_code_refuses_an_output_a_run_is_writing(child):
    """As streamsvd.load does (job/lock.reading_output): a load during `run --restart` mixed two jobs' shards."""
    result, _ = child
    assert result["locked"].startswith("RuntimeError") and "is being written by a streamsvd run" in result["locked"]


def test_out_dir_ships_the_layer_classes_streamsvd_uses(outputs):
    out = outputs["llama"]
    assert (out / MODELING_FILE).read_bytes() == modeling_source()
    # One source of truth: streamsvd's layer classes are the ones in the shipped file.
    assert LowRankLinear.__module__ == PivotedLinear.__module__ == "streamsvd.model.remote.modeling_streamsvd"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "streamsvd" and config["architectures"] == ["StreamSVDForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_streamsvd.StreamSVDForCausalLM"
    assert config[SECTION]["base_model_type"] == "llama"
    assert config[SECTION]["base_architectures"] == ["LlamaForCausalLM"]
    # streamsvd's own readers see the base family.
    ckpt = Checkpoint(out)
    assert check_supported(ckpt.config_dict) == "llama" and "auto_map" not in ckpt.config_dict
    assert main(["verify", str(out)]) == 0


def test_an_output_with_the_old_config_form_still_loads_and_evaluates(outputs, tmp_path, capsys):
    out = outputs["qwen2"]
    want_logits, _, _ = _reference(out)
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question. " * 40)
    assert main(["eval", str(out), "--text", str(text), "--seqlen", "32", "--json", "--no-progress"]) == 0
    want_ppl = json.loads(capsys.readouterr().out)["perplexity"]
    old = _copy(out, tmp_path / "old")
    (old / MODELING_FILE).unlink()
    config = base_config_dict(json.loads((out / "config.json").read_text()))  # what earlier versions wrote
    for key in ("base_model_type", "base_architectures"):
        del config[SECTION][key]
    (old / "config.json").write_text(json.dumps(config))
    record_edits(old, "config.json", MODELING_FILE)  # as that version's job recorded its own files
    assert config["model_type"] == "qwen2" and "auto_map" not in config
    got_logits, _, model = _reference(old)
    assert torch.equal(got_logits, want_logits)
    assert isinstance(model.model.layers[0].self_attn.q_proj, LowRankLinear)
    assert main(["eval", str(old), "--text", str(text), "--seqlen", "32", "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] == want_ppl


def test_quantize_gives_new_dir_this_versions_remote_code(outputs, tmp_path):
    """quantize copied OUT_DIR's modeling_streamsvd.py: an output made while the remote code refused quantised
    factors (2026-11-25 to 12-03) gave NEW_DIR a reader that refused NEW_DIR itself with trust_remote_code=True."""
    out = outputs["llama"]
    old = _copy(out, tmp_path / "old")
    (old / MODELING_FILE).write_text("# an earlier version's remote code, which cannot read quantised factors\n")
    record_edits(old, MODELING_FILE)  # an earlier version's output: its state records the old code
    assert main(["quantize", str(old), str(tmp_path / "q"), "--quant", "int8"]) == 0
    assert (tmp_path / "q" / MODELING_FILE).read_bytes() == modeling_source()


def test_load_reads_the_generation_config_as_from_pretrained_does(outputs, tmp_path):
    """streamsvd.load built the generation config from config.json alone: an instruct model's generation_config.json
    (its end-of-turn eos ids, sampling defaults) was ignored, so generate() ran past the end of the turn."""
    out = outputs["llama"]
    copy = _copy(out, tmp_path / "out")
    generation = json.loads((copy / "generation_config.json").read_text())
    (copy / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": [1, 7], "max_new_tokens": 5}))
    record_edits(copy, "generation_config.json")
    config = streamsvd.load(copy).generation_config
    assert config.eos_token_id == [1, 7] and config.max_new_tokens == 5


def test_remote_code_refuses_what_streamsvd_load_refuses(child):
    """The remote code checked tensor names only: a changed byte in a shard, a stopped job's state, a missing state,
    a repeated pivot or an edited bit width loaded as a model with other logits (a probe, 2026-12-07)."""
    result, _ = child
    assert result["flipped"].startswith("ValueError") and "is a damaged streamsvd output: model-" in result["flipped"]
    assert "contents differ" in result["flipped"] and "streamsvd run" in result["flipped"]
    assert result["unfinished"].startswith("ValueError") and "unfinished streamsvd output" in result["unfinished"]
    assert result["stray model.safetensors"].startswith("ValueError") and "did not write" in result["stray model.safetensors"]
    for case in ("edited state", "completed by hand"):  # both loaded (a probe, 2026-12-07)
        assert result[case].startswith("ValueError") and "does not match its own digest" in result[case], result[case]
    assert result["stateless"].startswith("ValueError") and f"lacks {STATE_NAME}" in result["stateless"]
    assert "streamsvd_verify=False" in result["stateless"]
    assert result["stateless unchecked"] == "loaded"  # asked for: nothing to check against
    assert result["repeated pivot"].startswith("ValueError") and "is not a permutation" in result["repeated pivot"]
    assert result["bits"].startswith("ValueError") and "do not hold" in result["bits"]


def test_the_remote_codes_state_file_is_streamsvds():
    from streamsvd.job.state import OPTIONAL_FIELDS
    from streamsvd.model.remote.modeling_streamsvd import STATE_FILE, STATE_OPTIONAL

    assert STATE_FILE == STATE_NAME and set(STATE_OPTIONAL) == OPTIONAL_FIELDS
