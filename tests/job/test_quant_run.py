"""`run --quant` and `streamsvd quantize`: quantised factors written, planned, resumed, loaded, refused."""

import json
import os

import pytest
import torch
from safetensors import safe_open

import streamsvd
from streamsvd.cli import main
from streamsvd.io.checkpoint import read_safetensors_header
from streamsvd.io.output import RUN_LOG
from streamsvd.job.pipeline import CompressionJob, JobConfig, run_job
from streamsvd.job.state import STATE_NAME
from streamsvd.model.lowrank import PivotedLinear
from tiny_models import make_tiny_checkpoint, record_edits

VOLATILE = {RUN_LOG, STATE_NAME, "profile_log.json"}  # the profile's wall times vary too


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("m") / "model", num_hidden_layers=2)


@pytest.fixture(scope="module")
def outputs(model_dir, tmp_path_factory):
    """The same job unquantised, int8 and int4 (groups of 32: the tiny model's factors are 16 to 160 wide)."""
    root = tmp_path_factory.mktemp("outs")
    reports = {
        "full": run_job(_cfg(model_dir, root / "full")),
        "int8": run_job(_cfg(model_dir, root / "int8", quant="int8", group_size=32)),
        "int4": run_job(_cfg(model_dir, root / "int4", quant="int4", group_size=32)),
    }
    return root, reports


def _cfg(model_dir, out, **overrides):
    return JobConfig(**{"alloc": "uniform", **dict(model_dir=model_dir, out_dir=out, ratio=0.4, calib_samples=4, seqlen=32, progress=False), **overrides})


def _files(out):
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name not in VOLATILE}


def _logits(model):
    ids = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(ids).logits


def test_quantised_runs_load_close_to_the_unquantised_output_int8_closer(outputs):
    root, reports = outputs
    full = _logits(streamsvd.load(root / "full"))
    rel = {}
    for q in ("int8", "int4"):
        model = streamsvd.load(root / q)
        assert isinstance(model.model.layers[1].mlp.down_proj, PivotedLinear)
        rel[q] = float((_logits(model) - full).norm() / full.norm())
        out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
        assert out.shape == (1, 6)
    # Measured on this tiny random model: int8 0.010, int4 0.21 (relative Frobenius distance of the logits).
    assert rel["int8"] < 0.03 and rel["int4"] < 0.4 and rel["int8"] < rel["int4"] / 5


def test_quantised_shards_hold_the_packed_layout_and_the_report_counts_the_bytes(outputs):
    root, reports = outputs
    section = json.loads((root / "int4" / "config.json").read_text())["streamsvd"]
    assert section["quantization"] == {"format": "pack-quantized", "num_bits": 4, "type": "int", "symmetric": False,
                                       "strategy": "group", "group_size": 32, "rounding": "gptq",
                                       "tensors": [".out_factor", ".in_rest", ".in_factor", ".weight"]}
    assert "quantization" not in json.loads((root / "full" / "config.json").read_text())["streamsvd"]
    name = "model.layers.0.mlp.up_proj"  # 160 x 64
    index = json.loads((root / "int4" / "model.safetensors.index.json").read_text())["weight_map"]
    assert {k for k in index if k.startswith(name + ".")} == {
        name + s for s in (".out_factor_packed", ".out_factor_scale", ".out_factor_shape", ".out_factor_zero_point",
                           ".in_rest_packed", ".in_rest_scale", ".in_rest_shape", ".in_rest_zero_point", ".pivots")}
    rank = section["ranks"][name]
    with safe_open(str(root / "int4" / index[name + ".pivots"]), framework="pt") as f:
        assert f.get_tensor(name + ".in_rest_packed").shape == (rank, -(-(64 - rank) // 8))
        assert f.get_tensor(name + ".in_rest_scale").shape == (rank, -(-(64 - rank) // 32))
        assert f.get_tensor(name + ".out_factor_shape").tolist() == [160, rank]
    before = reports["full"]["linear_bytes_before"]
    assert before == reports["int4"]["linear_bytes_before"] == sum(
        m["in_features"] * m["out_features"] * 4 for m in reports["full"]["modules"].values())
    full, q8, q4 = (reports[k]["linear_bytes_after"] for k in ("full", "int8", "int4"))
    assert q4 < q8 < full < before
    assert q4 < 0.25 * full  # float32 factors: int4 is an eighth of the numbers' bytes, plus scales and pivots
    assert "on disk" in (root / "int4" / "streamsvd_report.md").read_text()


def test_streamsvd_quantize_equals_run_quant_where_the_inputs_are_the_same(model_dir, outputs, tmp_path, capsys):
    """With the same rounding (RTN: `quantize` has no Grams) and one calibration pass per block, block 0
    sees the same inputs in both, so its shard is byte-identical; so are the config and the index. Later
    blocks differ on purpose: `run --quant` calibrates them on the quantised blocks' outputs (and with
    sequential calibration, a block's later groups on its quantised earlier ones)."""
    root, _ = outputs
    plain = dict(compensate=False, calibrate="block")
    run_job(_cfg(model_dir, tmp_path / "full", **plain))
    run_job(_cfg(model_dir, tmp_path / "rtn", quant="int4", group_size=32, quant_rounding="rtn", **plain))
    capsys.readouterr()  # the runs' own warnings (4 x 32 tokens for 160-wide inputs)
    new = tmp_path / "new"
    assert main(["quantize", str(tmp_path / "full"), str(new), "--quant", "int4", "--group-size", "32"]) == 0
    said = capsys.readouterr()
    assert "on disk" in said.out and said.err.startswith("warning: round-to-nearest int4")
    made, ran = _files(new), _files(tmp_path / "rtn")
    for name in ("config.json", "model.safetensors.index.json", "model-00002-of-00003.safetensors",
                 "model-00001-of-00003.safetensors", "tokenizer.json"):
        assert made[name] == ran[name], name
    assert set(made) == set(ran)
    full = _logits(streamsvd.load(root / "full"))
    assert float((_logits(streamsvd.load(new)) - full).norm() / full.norm()) < 0.4
    # quantising a quantised output, or into a non-empty directory, is refused
    assert main(["quantize", str(new), str(tmp_path / "again"), "--quant", "int4"]) == 2
    assert main(["quantize", str(tmp_path / "full"), str(new)]) == 2
    err = capsys.readouterr().err
    assert "already quantised" in err and "not a new or empty directory" in err and err.count("fix:") == 2


def test_interrupted_quantised_job_resumes_byte_identical_even_without_its_activations(model_dir, outputs, tmp_path):
    root, _ = outputs
    out = tmp_path / "out"

    def stop(index):
        if index == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_job(_cfg(model_dir, out, quant="int4", group_size=32), on_block_done=stop)
    import shutil

    shutil.rmtree(out / ".streamsvd-work")  # the resume rebuilds block 1's inputs from the quantised block 0
    run_job(_cfg(model_dir, out, quant="int4", group_size=32))
    assert _files(out) == _files(root / "int4")


def test_a_changed_quant_flag_is_refused_on_resume(model_dir, outputs, tmp_path, capsys):
    root, _ = outputs
    out = tmp_path / "out"
    run_job(_cfg(model_dir, out, quant="int8", group_size=32))
    common = [str(model_dir), str(out), "--calib-samples", "4", "--seqlen", "32", "--no-progress", "--alloc", "uniform"]
    for flags, said in ((["--quant", "int4", "--group-size", "32"], "now --quant int4 --group-size 32"),
                        (["--quant", "int8", "--group-size", "64"], "now --quant int8 --group-size 64"),
                        ([], "now without --quant")):
        assert main(["run", *common, *flags]) == 2
        err = capsys.readouterr().err
        assert "different streamsvd job" in err and "it was --quant int8 --group-size 32 --quant-rounding gptq" in err and said in err
    assert main(["run", *common, "--quant", "int8", "--group-size", "32"]) == 0


@pytest.mark.parametrize("flags,problem", [
    (["--quant", "int3"], "unknown --quant"),
    (["--quant", "int4", "--group-size", "0"], "--group-size 0 is out of range"),
    (["--group-size", "64"], "--group-size without --quant"),
    (["--quant", "int4", "--quant-rounding", "awq"], "unknown --quant-rounding"),
    (["--quant-rounding", "gptq"], "--quant-rounding without --quant"),
])
def test_bad_quant_flags_are_one_error_and_one_fix(model_dir, tmp_path, capsys, flags, problem):
    out = tmp_path / "out"
    assert main(["run", str(model_dir), str(out), "--no-progress", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("error:") and problem in err[0] and err[1].strip().startswith("fix:")
    assert not out.exists()


def test_plan_counts_the_smaller_shards_and_the_quantize_stage(model_dir, tmp_path):
    full = CompressionJob(_cfg(model_dir, tmp_path / "a"))
    quant = CompressionJob(_cfg(model_dir, tmp_path / "b", quant="int4", group_size=32))
    assert quant.plan.disk_bytes < full.plan.disk_bytes
    assert "rounding" in quant.plan.components["factorize"] and "rounding" not in quant.plan.components["quantize"]
    refined = CompressionJob(_cfg(model_dir, tmp_path / "c", quant="int4", refine_steps=2))
    assert refined.cfg.quant_spec.rounding == "rtn"  # after refinement the Grams are gone
    assert refined.plan.components["quantize"]["rounding"] > 0
    needs = quant._disk_needs()[tmp_path / "b"]
    quant.run()
    written = sum(p.stat().st_size for p in (tmp_path / "b").rglob("*") if p.is_file() and not p.name.startswith("streamsvd_"))
    assert 0.9 < written / needs < 1.1


def test_a_quantised_output_verifies_and_its_streamed_eval_equals_the_in_memory_one(outputs, tmp_path, capsys):
    root, _ = outputs
    text = tmp_path / "held_out.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    assert main(["verify", str(root / "int4")]) == 0
    common = ["eval", str(root / "int4"), "--text", str(text), "--seqlen", "32"]
    assert main(common) == 0
    streamed = capsys.readouterr().out.strip().splitlines()[-1]
    assert main([*common, "--in-memory"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == streamed and streamed.startswith("perplexity")


def test_a_dense_fallback_linear_is_stored_quantised_and_loads_as_a_linear(model_dir, tmp_path, monkeypatch):
    import streamsvd.job.stages as stages
    from torch import nn
    from transformers import AutoModelForCausalLM

    real = stages.rank_for_ratio
    monkeypatch.setattr(stages, "rank_for_ratio", lambda m, n, ratio, form="plain": min(m, n) if (m, n) == (64, 160) else real(m, n, ratio, form))
    out = tmp_path / "out"
    run_job(_cfg(model_dir, out, compensate=False, quant="int8", group_size=32))
    name = "model.layers.0.mlp.down_proj"
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert name + ".weight_packed" in index and name + ".weight" not in index  # compressed-tensors' own names
    down = streamsvd.load(out).model.layers[0].mlp.down_proj
    assert type(down) is nn.Linear
    w = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).model.layers[0].mlp.down_proj.weight
    assert float(((down.weight - w).norm() / w.norm()).detach()) < 0.01  # int8 of W itself (full-rank eig truncation)


def test_gptq_rounding_moves_an_output_side_linear_to_its_input_side(model_dir, tmp_path):
    """Uncompensated eig factors down_proj (out < in) from its output Gram; GPTQ needs its input Gram instead
    (rounded to nearest on the output side, it ruined SmolLM2 at int4: docs/RESULTS.md)."""
    def route(**quant):
        job = CompressionJob(_cfg(model_dir, tmp_path / "o", compensate=False, calibrate="block", anchor=0.0, **quant))
        layer = job.model.model.layers[0]
        return next(v for k, v in job.plan.routes.items() if k.startswith("mlp.down_proj")), job._output_side(layer)

    plain_route, plain_side = route()
    rtn_route, rtn_side = route(quant="int4", quant_rounding="rtn")
    gptq_route, gptq_side = route(quant="int4")
    assert plain_side == rtn_side == {"mlp.down_proj"} and gptq_side == set()
    assert "output" in plain_route and "output" in rtn_route and "output" not in gptq_route


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_the_remote_code_loads_a_quantised_output_with_streamsvd_loads_logits(outputs, quant):
    """OUT_DIR's remote code dequantises packed factors itself (tests/export/test_remote_code.py checks it where
    streamsvd cannot be imported): the same logits as streamsvd.load, bit for bit."""
    from transformers import AutoModelForCausalLM

    root, _ = outputs
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    remote = AutoModelForCausalLM.from_pretrained(root / quant, trust_remote_code=True)
    ours = streamsvd.load(root / quant)
    with torch.no_grad():
        assert torch.equal(remote(ids).logits, ours(ids).logits)


def test_the_remote_code_refuses_a_quantised_output_missing_a_tensor(outputs, tmp_path):
    """A quantised output with a factor's scales gone must stop with a message, never leave a random factor."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    root, _ = outputs
    broken = tmp_path / "broken"
    shutil.copytree(root / "int8", broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())["weight_map"]
    key = next(k for k in index if k.endswith("_scale"))
    shard = broken / index[key]
    tensors = load_file(shard)
    del tensors[key]
    save_file(tensors, shard)
    with pytest.raises(ValueError, match=r"is a damaged streamsvd output: model-.*size"):  # the state's record first
        AutoModelForCausalLM.from_pretrained(broken, trust_remote_code=True)
    record_edits(broken, shard.name)  # a state that agrees: the reader's own check
    with pytest.raises(ValueError, match=r"lacks .*_scale.*rerun"):
        AutoModelForCausalLM.from_pretrained(broken, trust_remote_code=True)


def test_a_streamsvd_quantize_output_records_its_files_so_a_changed_byte_is_refused(model_dir, outputs, tmp_path, capsys):
    """quantize's NEW_DIR had no state: verify refused it, and load/eval used a flipped byte in a shard silently."""
    root, _ = outputs
    new = tmp_path / "new"
    assert main(["quantize", str(root / "full"), str(new), "--quant", "int8", "--group-size", "32"]) == 0
    assert main(["verify", str(new)]) == 0
    assert "ok: " in capsys.readouterr().out
    reference = _logits(streamsvd.load(new))
    shard = new / "model-00001-of-00003.safetensors"  # the embeddings: the header and the size stay valid
    data = bytearray(shard.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little") + read_safetensors_header(shard)["model.embed_tokens.weight"]["data_offsets"][0]
    data[start + 3] ^= 0x40  # the first value's exponent
    shard.write_bytes(bytes(data))
    with pytest.raises(streamsvd.errors.CheckpointError, match="sha256") as refused:
        streamsvd.load(new)
    assert "streamsvd quantize" in refused.value.fix
    assert main(["verify", str(new)]) == 2
    err = capsys.readouterr().err
    assert "damaged or missing" in err and "fix: remove that directory and run the same `streamsvd quantize" in err
    # the cheap check (sizes and headers) still loads it: the flip was real, and changed the model
    assert not torch.equal(_logits(streamsvd.load(new, verify=False)), reference)
    # a run into NEW_DIR is another job, named as the quantize output it is
    capsys.readouterr()
    assert main(["run", str(model_dir), str(new), "--ratio", "0.4", "--calib-samples", "4", "--seqlen", "32",
                 "--no-progress"]) == 2
    assert "output of `streamsvd quantize`" in capsys.readouterr().err


def _edit_tensor(out, key, edit):
    """Change the stored bytes of tensor `key` in OUT_DIR's shards in place (`edit(bytearray data, start, end)`)."""
    for shard in sorted(out.glob("*.safetensors")):
        header = read_safetensors_header(shard)
        if key in header:
            data = bytearray(shard.read_bytes())
            begin, end = header[key]["data_offsets"]
            base = 8 + int.from_bytes(data[:8], "little")
            edit(data, base + begin, base + end)
            shard.write_bytes(bytes(data))
            return header[key]["dtype"]
    raise AssertionError(f"no tensor {key}")


def test_quantize_no_verify_refuses_damaged_pivots_and_marks_what_it_made_from_unchecked_files(outputs, tmp_path, capsys):
    """With --no-verify a changed byte in the source was quantised into a NEW_DIR that `verify` passed and load read
    with default checks (other logits), and changed pivots into one that load refused and a rerun made the same (a
    probe, 2026-12-07). Pivots are checked as load checks them; NEW_DIR's state says its source went unchecked."""
    import shutil

    root, _ = outputs
    pivots = next(k for k in read_safetensors_header(next((root / "full").glob("*-00002-*.safetensors"))) if k.endswith(".pivots"))
    damaged = tmp_path / "pivots"
    shutil.copytree(root / "full", damaged)
    dtype = _edit_tensor(damaged, pivots, lambda d, a, e: d.__setitem__(slice(a, a + (e - a) // 2), d[a + (e - a) // 2:e]))
    assert dtype in ("I32", "I64", "I16")
    assert main(["quantize", str(damaged), str(tmp_path / "q1"), "--quant", "int8", "--no-verify"]) == 2
    err = capsys.readouterr().err
    assert f"{pivots} is not a permutation" in err and "Traceback" not in err, err
    assert not (tmp_path / "q1" / "model.safetensors.index.json").exists()

    changed = tmp_path / "changed"
    shutil.copytree(root / "full", changed)
    _edit_tensor(changed, "model.embed_tokens.weight", lambda d, a, e: d.__setitem__(a + 3, d[a + 3] ^ 0x40))
    assert main(["quantize", str(changed), str(tmp_path / "q2"), "--quant", "int8", "--no-verify"]) == 0
    assert "read without their sha256 check (--no-verify)" in capsys.readouterr().err
    assert main(["verify", str(tmp_path / "q2")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok: ") and "\nnote: " in out and "quantize --no-verify" in out, out
    assert main(["verify", str(tmp_path / "q2"), "--json"]) == 0
    assert "quantize --no-verify" in json.loads(capsys.readouterr().out)["note"]
    streamsvd.load(tmp_path / "q2")
    assert "warning: " in capsys.readouterr().err
    # a checked quantize says nothing of the kind
    assert main(["quantize", str(root / "full"), str(tmp_path / "q3"), "--quant", "int8"]) == 0
    assert "--no-verify" not in capsys.readouterr().err
    assert main(["verify", str(tmp_path / "q3"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["note"] is None


def _stopped_quantize(source, new, monkeypatch):
    """A quantize of `source` into `new` stopped after its first shard (as a kill there would leave it)."""
    import streamsvd.job.quantize_output as quantize_output

    real, calls = quantize_output.save_file, []

    def killed_after_one_shard(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt  # the process stops here, as a kill would
        calls.append(1)
        real(*args, **kwargs)

    monkeypatch.setattr(quantize_output, "save_file", killed_after_one_shard)
    with pytest.raises(KeyboardInterrupt):
        quantize_output.quantize_output(source, new, "int8", 32)
    monkeypatch.undo()


def test_a_stopped_quantize_is_named_as_one_and_a_quantize_into_it_starts_over(outputs, tmp_path, monkeypatch, capsys):
    """A killed quantize left shards and nothing else: verify said 'no streamsvd job state', load 'no config.json ...
    import-gguf', and a rerun 'not a new or empty directory'. Its state now says unfinished from the start."""
    root, _ = outputs
    new = tmp_path / "new"
    _stopped_quantize(root / "full", new, monkeypatch)
    assert list(new.glob("*.safetensors")) and not (new / "model.safetensors.index.json").exists()
    for argv in (["verify", str(new)], ["eval", str(new), "--text", str(root / "full" / "config.json"), "--seqlen", "8"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "unfinished" in err and "fix: run the same `streamsvd quantize" in err and "import-gguf" not in err, err
        assert "blocks done" not in err  # a quantize has no blocks (verify said "unfinished job (0 blocks done)")
    with pytest.raises(streamsvd.errors.StreamSVDError, match="quantize` that was stopped"):
        streamsvd.load(new)
    # the same quantize into it starts it over, and gives what an uninterrupted one gives
    assert main(["quantize", str(root / "full"), str(new), "--quant", "int8", "--group-size", "32"]) == 0
    assert main(["quantize", str(root / "full"), str(tmp_path / "straight"), "--quant", "int8", "--group-size", "32"]) == 0
    assert _files(new) == _files(tmp_path / "straight") and main(["verify", str(new)]) == 0
    # a finished one, or a folder of someone else's, is still refused
    capsys.readouterr()
    assert main(["quantize", str(root / "full"), str(new), "--quant", "int8"]) == 2
    assert "not a new or empty directory" in capsys.readouterr().err


def test_a_stopped_quantize_holding_the_output_to_quantize_is_refused_and_the_output_kept(outputs, tmp_path, monkeypatch,
                                                                                          capsys):
    """A stopped quantize's NEW_DIR is emptied by the quantize that starts it over: an OUT_DIR inside it was removed
    with the rest (then a traceback; a probe, 2026-12-07)."""
    import shutil

    root, _ = outputs
    new = tmp_path / "new"
    _stopped_quantize(root / "full", new, monkeypatch)
    shutil.copytree(root / "full", new / "mine")
    before = _files(new / "mine")
    assert main(["quantize", str(new / "mine"), str(new), "--quant", "int8"]) == 2
    err = capsys.readouterr().err
    assert f"the streamsvd output {new / 'mine'} is inside NEW_DIR {new}" in err and "Traceback" not in err, err
    assert _files(new / "mine") == before and main(["verify", str(new / "mine")]) == 0


def test_a_quantize_killed_between_its_finished_state_and_its_index_is_made_again_by_the_same_command(outputs, tmp_path, capsys):
    """The state says complete before the index is written (last); a SIGKILL between the two left NEW_DIR without an
    index, and the same quantize refused it as 'not a new or empty directory' (verify: 'damaged ... remove it')."""
    import os
    import signal
    import subprocess
    import sys

    root, _ = outputs
    new = tmp_path / "new"
    script = ("import os, signal, sys\n"
              "import streamsvd.job.quantize_output as q\n"
              "real = q.atomic_write_bytes\n"
              "def killed_before_the_index(path, data):\n"
              "    if str(path).endswith('model.safetensors.index.json'):\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              "    real(path, data)\n"
              "q.atomic_write_bytes = killed_before_the_index\n"
              "from streamsvd.cli import main\n"
              "main(['quantize', sys.argv[1], sys.argv[2], '--quant', 'int8', '--group-size', '32'])\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", script, str(root / "full"), str(new)], env=env)
    assert done.returncode == -signal.SIGKILL
    assert (new / STATE_NAME).exists() and not (new / "model.safetensors.index.json").exists()
    assert main(["verify", str(new)]) == 2
    capsys.readouterr()
    assert main(["quantize", str(root / "full"), str(new), "--quant", "int8", "--group-size", "32"]) == 0
    assert main(["quantize", str(root / "full"), str(tmp_path / "straight"), "--quant", "int8", "--group-size", "32"]) == 0
    assert _files(new) == _files(tmp_path / "straight") and main(["verify", str(new)]) == 0


def test_a_quantize_killed_during_its_first_write_is_made_again(outputs, tmp_path, capsys):
    """A kill during the state's first write leaves NEW_DIR holding only that write's temporary: as good as empty, not
    'not a new or empty directory'."""
    root, _ = outputs
    new = tmp_path / "new"
    new.mkdir()
    (new / f".{STATE_NAME}.tmp-4194999").write_text("{")
    assert main(["quantize", str(root / "full"), str(new), "--quant", "int8", "--group-size", "32"]) == 0
    assert not (new / f".{STATE_NAME}.tmp-4194999").exists() and main(["verify", str(new)]) == 0
    capsys.readouterr()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / ".notes.tmp-1").write_text("a user's file")  # another name's temporary is not ours to remove
    assert main(["quantize", str(root / "full"), str(mine), "--quant", "int8"]) == 2
    assert "not a new or empty directory" in capsys.readouterr().err and (mine / ".notes.tmp-1").exists()


def test_a_full_disk_while_quantize_copies_a_file_names_the_new_file_and_a_fix_for_quantize(outputs, tmp_path, capsys,
                                                                                             monkeypatch):
    """A failed copy's OSError names its source first (shutil's sendfile copy): the error sent the user to free space
    on OUT_DIR's disk, and its fix spoke of --work-dir and resumed blocks, which quantize has not."""
    import errno
    import shutil

    def full(src, dst, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(src), None, str(dst))

    monkeypatch.setattr(shutil, "copyfile", full)
    root, _ = outputs
    new = tmp_path / "q"
    capsys.readouterr()
    assert main(["quantize", str(root / "full"), str(new), "--quant", "int8", "--group-size", "32"]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "Traceback" not in err, err
    assert f"the disk is full while writing {new}{os.sep}" in err and str(root / "full") not in err.split("fix:")[0]
    fix = err.split("fix: ", 1)[1]
    assert "run the same command again" in fix and "--work-dir" not in fix and "blocks" not in fix
