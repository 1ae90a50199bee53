"""Bad input gets ONE clear error (problem + fix) and exit 2: never a traceback, never a half-written
output that looks complete, and nothing already finished is lost.

Every case runs `streamsvd.cli.main([...])` in-process and reads stderr with capsys; two cases run the
real console script in a subprocess to prove the exit code and the absence of a traceback end to end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import streamsvd
from streamsvd.io.checkpoint import INDEX_NAME
from streamsvd.cli import main
from streamsvd.errors import StreamSVDError
from streamsvd.job.pipeline import JobConfig, run_job
from streamsvd.job.state import STATE_NAME
from tiny_models import make_tiny_checkpoint

# Small enough that a whole tiny job takes about a second.
FAST = ["--calib-samples", "4", "--seqlen", "32", "--no-progress"]
LAYER_TENSOR = "model.layers.0.mlp.down_proj.weight"
EMBED_TENSOR = "model.embed_tokens.weight"


# ------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """One tiny sharded llama checkpoint (max_position_embeddings 256), never mutated."""
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("pristine") / "model")


@pytest.fixture
def model(pristine, tmp_path):
    """A private copy of the checkpoint that the test may damage."""
    return Path(shutil.copytree(pristine, tmp_path / "model"))


@pytest.fixture
def out(tmp_path):
    return tmp_path / "out"


@pytest.fixture
def long_text(tmp_path):
    path = tmp_path / "long.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 400)
    return path


def cli(argv: list[str]) -> int:
    """main(argv); an escaping exception is what the user would see as a traceback, so fail clearly."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        return e.code
    except Exception as e:  # noqa: BLE001
        pytest.fail(
            f"`streamsvd {' '.join(map(str, argv))}` raised {type(e).__name__}: {e} -- the user gets a Python "
            "traceback instead of an `error:` / `fix:` message and exit 2"
        )


def assert_clean_error(capsys, rc: int, *needles: str) -> str:
    """Exit 2, one `error:` line naming the problem, a `fix:` line, no traceback, no `done:`."""
    captured = capsys.readouterr()
    err = captured.err
    assert rc == 2, f"exit code {rc}, want 2; stderr:\n{err}\nstdout:\n{captured.out}"
    assert "Traceback" not in err and "Traceback" not in captured.out, err
    assert err.count("error: ") == 1, err
    assert "fix:" in err, err
    assert "done:" not in captured.out, captured.out
    for needle in needles:
        assert needle in err, f"stderr does not mention {needle!r}:\n{err}"
    return err


def assert_not_complete(out_dir: Path) -> None:
    """OUT_DIR was not created, or it does not look like a finished model."""
    if out_dir.exists():
        assert not (out_dir / INDEX_NAME).exists(), f"{out_dir} has {INDEX_NAME}: it looks complete"
        assert not (out_dir / "config.json").exists(), f"{out_dir} has config.json: it looks like a model"


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def index(model: Path) -> dict:
    return json.loads((model / INDEX_NAME).read_text())


def shard_of(model: Path, tensor: str) -> Path:
    return model / index(model)["weight_map"][tensor]


def edit_config(model: Path, **changes) -> None:
    path = model / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


# ------------------------------------------------------------------------------------------ MODEL_DIR
def test_model_dir_missing(capsys, tmp_path, out):
    rc = cli(["run", tmp_path / "no-such-model", out, *FAST])
    assert_clean_error(capsys, rc, "no-such-model", "does not exist")
    assert_not_complete(out)


def test_model_dir_without_config(capsys, model, out):
    (model / "config.json").unlink()
    rc = cli(["run", model, out, *FAST])
    assert_clean_error(capsys, rc, "config.json")
    assert_not_complete(out)


def test_config_not_valid_json(capsys, model, out):
    (model / "config.json").write_text('{"model_type": "llama", ')
    rc = cli(["run", model, out, *FAST])
    assert_clean_error(capsys, rc, "config.json", "not valid JSON")
    assert_not_complete(out)


def test_config_json_not_an_object(capsys, model, out):
    """A config.json that is valid JSON but not an object ([...])."""
    (model / "config.json").write_text("[1, 2]")
    rc = cli(["run", model, out, *FAST])
    assert_clean_error(capsys, rc, "config.json")
    assert_not_complete(out)


# ------------------------------------------------------------------------------------------ shards
def test_shard_deleted(capsys, model, out):
    shard = shard_of(model, LAYER_TENSOR)
    shard.unlink()
    rc = cli(["run", model, out, *FAST])
    assert_clean_error(capsys, rc, shard.name, "missing")
    assert_not_complete(out)


def test_shard_truncated(capsys, model, out):
    shard = shard_of(model, LAYER_TENSOR)
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    rc = cli(["run", model, out, *FAST])
    assert_clean_error(capsys, rc, shard.name, "truncated")
    assert_not_complete(out)


def test_shard_with_bytes_appended(capsys, model, out):
    """Bytes beyond what the header describes: safetensors refuses the file at its first read, which came after
    block 0's shard was written, as a SafetensorError traceback."""
    shard = sorted(model.glob("*.safetensors"))[-1]
    with open(shard, "ab") as f:
        f.write(b"\0" * 64)
    rc = cli(["run", model, out, *FAST])
    assert_clean_error(capsys, rc, shard.name, "64 bytes beyond")
    assert_not_complete(out)


def test_an_integer_weight_is_refused_by_name(capsys, model, out):
    """An int32 linear weight (a quantised checkpoint's, or a bad export) was cast and factored as if it were the
    weights; refused by name before any write."""
    from safetensors.torch import load_file, save_file

    name = "model.layers.0.mlp.up_proj.weight"
    shard = shard_of(model, name)
    tensors = load_file(str(shard))
    tensors[name] = (tensors[name] * 100).to(torch.int32)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    rc = cli(["run", model, out, *FAST])
    assert_clean_error(capsys, rc, "up_proj", "I32", "floating-point")
    assert_not_complete(out)


@pytest.mark.parametrize("where", ["header_json", "header_length", "zeroed_header"])
def test_shard_corrupt_header(capsys, model, out, where):
    shard = shard_of(model, LAYER_TENSOR)
    data = bytearray(shard.read_bytes())
    if where == "header_json":
        data[20:60] = bytes(range(0x80, 0xA8))  # not UTF-8, not JSON
    elif where == "header_length":
        data[0:8] = b"\xff" * 8  # header length far past the end of the file
    else:
        data[0:64] = bytes(64)
    shard.write_bytes(bytes(data))
    rc = cli(["run", model, out, *FAST])
    assert_clean_error(capsys, rc, shard.name)
    assert_not_complete(out)


@pytest.mark.parametrize("header", ["[]", '{"x": {"dtype": "F32", "shape": [1]}}'], ids=["list", "no_offsets"])
def test_shard_header_is_json_but_not_safetensors(capsys, model, out, header):
    """A header that parses as JSON but is not a safetensors tensor table."""
    shard = shard_of(model, LAYER_TENSOR)
    data = bytearray(shard.read_bytes())
    n = int.from_bytes(data[:8], "little")
    data[8 : 8 + n] = header.encode().ljust(n)
    shard.write_bytes(bytes(data))
    rc = cli(["run", model, out, *FAST])
    assert_clean_error(capsys, rc, shard.name)
    assert_not_complete(out)


def test_index_names_tensor_in_wrong_shard(capsys, model, out):
    idx = index(model)
    wrong = idx["weight_map"][EMBED_TENSOR]
    assert wrong != idx["weight_map"][LAYER_TENSOR]
    idx["weight_map"][LAYER_TENSOR] = wrong
    (model / INDEX_NAME).write_text(json.dumps(idx))
    rc = cli(["run", model, out, *FAST])
    assert_clean_error(capsys, rc, LAYER_TENSOR, wrong)
    assert_not_complete(out)


def test_shards_without_index(capsys, model, out):
    (model / INDEX_NAME).unlink()
    rc = cli(["run", model, out, *FAST])
    assert_clean_error(capsys, rc, INDEX_NAME)
    assert_not_complete(out)


@pytest.mark.parametrize("shards", [True, False])
def test_a_single_file_beside_an_index_is_the_model_as_transformers_loads_it(capsys, model, out, tmp_path, shards):
    """transformers loads model.safetensors where the folder also has an index (and maybe its shards); the job read
    the index's weights (another model, compressed without a word), or refused the folder for the index's missing
    shards."""
    from transformers import AutoModelForCausalLM

    other = make_tiny_checkpoint("llama", tmp_path / "other", seed=1, max_shard_size="100MB")
    shutil.copy(other / "model.safetensors", model / "model.safetensors")
    if not shards:
        for shard in set(index(model)["weight_map"].values()):
            (model / shard).unlink()
    want = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).state_dict()
    assert torch.equal(want[LAYER_TENSOR], AutoModelForCausalLM.from_pretrained(other).state_dict()[LAYER_TENSOR])
    from streamsvd.io.checkpoint import Checkpoint

    assert torch.equal(Checkpoint(model).get(LAYER_TENSOR), want[LAYER_TENSOR])
    assert cli(["run", model, out, "--alloc", "uniform", *FAST]) == 0, capsys.readouterr().err


def test_no_safetensors_at_all(capsys, model, out):
    for p in list(model.glob("*.safetensors")) + [model / INDEX_NAME]:
        p.unlink()
    rc = cli(["run", model, out, *FAST])
    assert_clean_error(capsys, rc, "safetensors")
    assert_not_complete(out)


# ------------------------------------------------------------------------------------------ architecture
@pytest.mark.parametrize("model_type", ["gpt2", "frobnicator"])
def test_unsupported_architecture(capsys, model, out, model_type):
    edit_config(model, model_type=model_type)
    rc = cli(["run", model, out, *FAST])
    err = assert_clean_error(capsys, rc, model_type, "unsupported")
    assert "llama" in err  # says what is supported
    assert_not_complete(out)


def test_tokenizer_missing(capsys, model, out):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).unlink()
    rc = cli(["run", model, out, *FAST])
    assert_clean_error(capsys, rc, "tokenizer")
    assert_not_complete(out)


@pytest.mark.parametrize("content", ["{}", "[1, 2]", '{"version": "1.0", "model": {"type": "Nonsense"}}'])
def test_a_damaged_tokenizer_json_is_refused(capsys, model, out, content):
    """tokenizer.json replaced by `{}` was a KeyError traceback from transformers."""
    (model / "tokenizer.json").write_text(content)
    rc = cli(["run", model, out, *FAST])
    assert_clean_error(capsys, rc, "tokenizer", "damaged")
    assert_not_complete(out)


# ------------------------------------------------------------------------------------------ flags
@pytest.mark.parametrize("ratio", ["0", "1", "1.5", "-0.1"])
def test_ratio_out_of_range(capsys, pristine, out, ratio):
    rc = cli(["run", pristine, out, "--ratio", ratio, *FAST])
    assert_clean_error(capsys, rc, "--ratio")
    assert_not_complete(out)


@pytest.mark.parametrize("command", ["run", "plan"])
def test_a_ratio_uniform_ranks_cannot_meet_is_refused_as_global_refuses_it(capsys, pristine, out, command):
    """rank 1 at the least: --ratio 0.999 --alloc uniform finished at ratio 0.974 (reported, never refused)."""
    rc = cli([command, pristine, *([out] if command == "run" else []), "--ratio", "0.999", "--alloc", "uniform", *FAST])
    assert_clean_error(capsys, rc, "uniform", "budget", "--ratio")
    assert_not_complete(out)
    rc = cli(["run", pristine, out, "--ratio", "0.95", "--alloc", "uniform", *FAST])  # one that fits still runs
    assert rc == 0 and json.loads((out / "streamsvd_report.json").read_text())["ratio_linear"] >= 0.95


def test_seqlen_longer_than_model(capsys, pristine, out):
    rc = cli(["run", pristine, out, "--calib-samples", "4", "--seqlen", "300", "--no-progress"])
    assert_clean_error(capsys, rc, "--seqlen 300", "256")
    assert_not_complete(out)


def test_max_mem_far_too_small(capsys, pristine, out):
    rc = cli(["run", pristine, out, "--max-mem", "1M", *FAST])
    assert_clean_error(capsys, rc, "--max-mem", "too small")
    assert_not_complete(out)


def test_max_mem_unreadable(capsys, pristine, out):
    rc = cli(["run", pristine, out, "--max-mem", "lots", *FAST])
    assert_clean_error(capsys, rc, "lots")
    assert_not_complete(out)


def test_max_mem_zero_is_rejected(capsys, pristine, out, long_text):
    """`--max-mem 0` is refused, not silently replaced by the default budget."""
    rc = cli(["run", pristine, out, "--max-mem", "0", "--calib", long_text, *FAST])
    assert_clean_error(capsys, rc, "--max-mem")
    assert_not_complete(out)


@pytest.mark.parametrize("flags, needles", [
    (["--alloc", "uniform", "--alloc-floor", "0.5"], ["--alloc-floor", "--alloc uniform"]),
    (["--alloc", "v2", "--alloc-floor", "0.5"], ["--alloc-floor", "--alloc v2"]),
    (["--refine-lr", "1e-3"], ["--refine-lr", "--refine-steps"]),
])
def test_a_flag_that_would_do_nothing_is_refused(capsys, pristine, out, flags, needles):
    """Each ran before, with the flag silently ignored."""
    rc = cli(["run", pristine, out, *FAST, *flags])
    assert_clean_error(capsys, rc, *needles)
    assert not out.exists()


@pytest.mark.parametrize("command", ["run", "eval", "profile"])
def test_a_budget_beyond_this_machines_ram_is_refused(capsys, pristine, out, long_text, command):
    """A typo such as 240G for 24G sized the batches for memory that is not there."""
    import psutil

    budget = str(2 * psutil.virtual_memory().total)
    argv = {"run": ["run", pristine, out, *FAST], "profile": ["profile", pristine, out, "--calib", long_text,
                                                              "--calib-samples", "4", "--seqlen", "32"],
            "eval": ["eval", pristine, "--text", long_text, "--seqlen", "32"]}[command]
    rc = cli([*argv, "--max-mem", budget])
    assert_clean_error(capsys, rc, "--max-mem", "RAM")
    assert not out.exists()


# ------------------------------------------------------------------------------------------ calibration
def test_calib_file_empty(capsys, pristine, out, tmp_path):
    calib = tmp_path / "empty.txt"
    calib.write_text("")
    rc = cli(["run", pristine, out, "--calib", calib, *FAST])
    assert_clean_error(capsys, rc, "empty")
    assert_not_complete(out)


def test_an_empty_file_among_several_calib_files_is_refused(capsys, pristine, out, tmp_path):
    """One empty --calib file alone is refused; among several it was taken silently, and named as a calibration
    source in the report and config.json (a wrong path or an unfinished download, not what the user meant)."""
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"word{i}" for i in range(2000)))
    rc = cli(["run", pristine, out, "--calib", calib, "--calib", empty, *FAST])
    assert_clean_error(capsys, rc, str(empty), "holds no text", "--calib")
    assert not out.exists()


def test_calib_shorter_than_one_window(capsys, pristine, out, tmp_path):
    calib = tmp_path / "short.txt"
    calib.write_text("hello world")
    rc = cli(["run", pristine, out, "--calib", calib, *FAST])
    assert_clean_error(capsys, rc, "fewer than one window", "--seqlen 32")
    assert_not_complete(out)


def test_calib_jsonl_without_text_field(capsys, pristine, out, tmp_path):
    calib = tmp_path / "data.jsonl"
    calib.write_text('{"body": "no text field here"}\n')
    rc = cli(["run", pristine, out, "--calib", calib, *FAST])
    assert_clean_error(capsys, rc, "data.jsonl", '"text"')
    assert_not_complete(out)


def test_calib_path_missing(capsys, pristine, out, tmp_path):
    rc = cli(["run", pristine, out, "--calib", tmp_path / "nope.txt", *FAST])
    assert_clean_error(capsys, rc, "nope.txt", "does not exist")
    assert_not_complete(out)


def test_eval_text_path_missing_names_text_not_calib(capsys, pristine, tmp_path):
    """eval's missing --text was refused as "calibration file ... does not exist", fix "check the --calib path": a flag
    eval does not have."""
    rc = cli(["eval", pristine, "--text", tmp_path / "nope.txt", "--seqlen", "32", "--no-progress"])
    err = assert_clean_error(capsys, rc, "nope.txt", "does not exist", "--text")
    assert "--calib" not in err and "calibration" not in err


@pytest.mark.parametrize("content", [bytes(range(256)) * 200, b"\x00" * 20000, b"plain text " * 2000 + b"\x00"])
def test_calib_that_is_not_text_is_refused(capsys, pristine, out, tmp_path, content):
    """Random bytes or NUL bytes were read with replacement characters and calibrated on (and `eval --text` scored
    them); a few stray non-UTF-8 bytes in real text are still read."""
    calib = tmp_path / "data.bin"
    calib.write_bytes(content)
    rc = cli(["run", pristine, out, "--calib", calib, *FAST])
    assert_clean_error(capsys, rc, "data.bin", "is not text", "UTF-8")
    assert_not_complete(out)


def test_calib_with_a_few_stray_bytes_is_text():
    from streamsvd.io.calibration import read_text_file

    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "text.txt"
        path.write_bytes(b"The quick brown fox. " * 500 + b"\xff\xfe caf\xc3\xa9 \xef\xbf\xbd")
        text = read_text_file(path)
    assert text.startswith("The quick brown fox.") and "caf\u00e9" in text


def test_calib_that_is_a_directory_is_not_called_missing(capsys, pristine, out, tmp_path):
    rc = cli(["run", pristine, out, "--calib", tmp_path, *FAST])
    assert_clean_error(capsys, rc, "is not a file")


@pytest.mark.parametrize("inside", ["", "w"])
def test_a_work_dir_that_is_out_dir_or_inside_it_is_refused_and_leaves_nothing(capsys, pristine, out, inside, long_text):
    """It made its folder in OUT_DIR before OUT_DIR's own check refused the job, and that debris blocked the rerun."""
    rc = cli(["run", pristine, out, *FAST, "--work-dir", out / inside if inside else out])
    assert_clean_error(capsys, rc, "--work-dir", "inside it")
    assert not out.exists() or not any(out.rglob("*"))
    assert cli(["run", pristine, out, *FAST, "--calib", long_text, "--alloc", "uniform"]) == 0  # the rerun is not blocked


@pytest.mark.parametrize("command", ["run", "profile"])
def test_a_work_dir_inside_model_dir_is_refused_and_the_checkpoint_left_as_it_came(capsys, pristine, out, command):
    """eval refused it; run and profile took it, and a killed job left its activation files in the checkpoint."""
    before = sorted(p.name for p in pristine.iterdir())
    rc = cli([command, pristine, out, *FAST, "--work-dir", pristine / "w"])
    assert_clean_error(capsys, rc, f"--work-dir {pristine / 'w'} is MODEL_DIR or inside it")
    assert sorted(p.name for p in pristine.iterdir()) == before and not out.exists()


def test_a_missing_shard_of_an_output_says_rerun_not_copy(capsys, pristine, tmp_path):
    from streamsvd.errors import CheckpointError
    from streamsvd.io.checkpoint import Checkpoint

    out = tmp_path / "o"
    out.mkdir()
    (out / "streamsvd_state.json").write_text("{}")
    with pytest.raises(CheckpointError) as info:  # an output's config.json is the job's too (not a GGUF to import)
        Checkpoint(out)
    assert "streamsvd run" in info.value.fix and "import-gguf" not in info.value.fix
    shutil.copy(pristine / "config.json", out / "config.json")
    (out / INDEX_NAME).write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError) as info:
        Checkpoint(out)
    assert "streamsvd run" in info.value.fix and "copy" not in info.value.fix
    (out / "streamsvd_state.json").unlink()
    with pytest.raises(CheckpointError) as info:
        Checkpoint(out)
    assert "copy the missing shard" in info.value.fix


def test_ctrl_c_while_torch_is_imported_is_no_traceback():
    """SIGINT in the first seconds (torch's import) printed a KeyboardInterrupt traceback."""
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])}
    code = "import time, streamsvd.cli as c; import builtins; " \
           "real = builtins.__import__\n" \
           "def slow(name, *a, **k):\n" \
           "    if name == 'torch': time.sleep(30)\n" \
           "    return real(name, *a, **k)\n" \
           "builtins.__import__ = slow\n" \
           "import sys; sys.exit(c.main(['plan', 'x']))"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err and "interrupted" in err, err


def test_a_jsonl_with_a_byte_order_mark_is_read():
    """A UTF-8 BOM before the first line was refused as 'not a JSON object with a "text" string'."""
    import tempfile

    from streamsvd.io.calibration import read_text_file

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.jsonl"
        path.write_bytes("\ufeff".encode() + b'{"text": "one"}\n{"text": "two"}\n')
        assert "one" in read_text_file(path) and "two" in read_text_file(path)


def test_a_jsonl_whose_text_holds_unicode_line_separators_is_read(tmp_path):
    """U+2028 / U+2029 / U+0085 are legal raw inside a JSON string (json.dumps(ensure_ascii=False) writes them): the
    reader split lines at them too and refused valid JSON Lines. CRLF line ends still read."""
    from streamsvd.io.calibration import read_text_file

    texts = ["one\u2028two", "three\u2029four\u0085five", "six"]
    path = tmp_path / "c.jsonl"
    path.write_text("\r\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts) + "\r\n", encoding="utf-8",
                    newline="")
    assert "\u2028" in path.read_text(encoding="utf-8")
    assert read_text_file(path) == "\n\n".join(texts)


@pytest.mark.parametrize("line", ['{"text": 5}', '{"text": null}', '{"text": ["a"]}'])
def test_calib_jsonl_whose_text_is_not_a_string_is_refused(capsys, pristine, out, tmp_path, line):
    calib = tmp_path / "data.jsonl"
    calib.write_text(line + "\n")  # read as the text "5" / "None" before
    assert_clean_error(capsys, cli(["run", pristine, out, "--calib", calib, *FAST]), "data.jsonl:1", '"text" string')


def test_a_seed_out_of_range_is_refused(capsys, pristine, out):
    assert_clean_error(capsys, cli(["run", pristine, out, *FAST, "--seed", "99999999999999999999999"]), "--seed",
                       "out of range")


def test_a_tokenizer_of_another_model_is_refused_by_name(capsys, model, out):
    """A tokenizer whose ids reach beyond the embedding's rows (another model's): an IndexError traceback before."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from streamsvd.io.calibration import default_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([default_text()[:200_000]], trainers.BpeTrainer(
        vocab_size=2000, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(model)
    rc = cli(["run", model, out, *FAST, "--alloc", "uniform"])
    assert_clean_error(capsys, rc, "tokenizer", "embedding's 384 rows")


def test_out_dir_inside_model_dir_is_refused(capsys, model):
    rc = cli(["run", model, model / "out", *FAST])
    assert_clean_error(capsys, rc, "inside MODEL_DIR")
    assert not (model / "out").exists()


@pytest.mark.parametrize("argv", [["run", "M", "O", "--ratio", "abc"], ["run", "M", "O", "--calib-samples", "2.5"],
                                  ["run", "M", "O", "--max-mem", "-1G"], ["export", "gguf", "O", "D"], ["nosuch"]])
def test_argument_errors_are_one_error_and_one_fix_line(capsys, argv):
    rc = cli(argv)
    err = assert_clean_error(capsys, rc, "--help")
    assert "usage:" not in err and len(err.strip().splitlines()) == 2


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["run", "M", "O", "--ratio", "abc"]])
def test_help_and_a_refused_flag_answer_without_importing_torch(argv):
    """The parser is built from job/defaults.py, not job/pipeline.py: `--help` took 5-7 s importing torch and
    transformers for three defaults, now a fraction of a second."""
    code = ("import sys\nfrom streamsvd.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout[-500:] + done.stderr[-500:]
    assert ("usage:" in done.stdout) == ("--help" in argv)
    assert ("error:" in done.stderr) == ("--help" not in argv)


@pytest.mark.parametrize("changes, needle", [
    ({"vocab_size": 200}, "has shape"),  # finished, verified, then load and eval failed with a traceback
    ({"hidden_size": 32}, "has shape"),
    ({"num_hidden_layers": 2}, "decoder layers up to 2"),  # finished with the last block silently dropped
    ({"num_hidden_layers": 5}, "has no tensor model.layers.3."),
    ({"num_hidden_layers": 10**30}, "has no tensor model.layers.3."),  # built layer by layer until killed (a probe)
    ({"hidden_act": "nonexistent"}, "cannot be built"),
    ({"rms_norm_eps": "abc"}, "cannot be built"),
    ({"rope_scaling": {"rope_type": "bogus"}}, "cannot be built"),
])
@pytest.mark.parametrize("command", ["run", "plan", "eval", "eval --in-memory"])
def test_a_config_that_contradicts_the_weights_is_refused_before_any_write(capsys, model, out, long_text, changes, needle,
                                                                         command):
    """Streamed eval (the default) scored a checkpoint whose config had fewer layers than its weights: another model's
    perplexity (a probe, 2026-12-07); it now checks the weights against the config as run does."""
    edit_config(model, **changes)
    rc = cli(_argv(command, model, out, long_text))
    assert_clean_error(capsys, rc, needle, "config.json")
    assert not out.exists()


def _argv(command: str, model: Path, out: Path, text: Path) -> list:
    """`command` (run, plan, eval or eval --in-memory) on `model` with the tests' small settings."""
    if command.startswith("eval"):
        return [*command.split(), model, "--text", text, "--seqlen", "32", "--max-windows", "2"]
    return [command, model, *([out, *FAST] if command == "run" else FAST[:4])]


def _add_tensor(model, name: str, value) -> None:
    from safetensors.torch import load_file, save_file

    shard = shard_of(model, "model.layers.0.self_attn.q_proj.weight")
    tensors = load_file(str(shard))
    tensors[name] = value
    save_file(tensors, str(shard), metadata={"format": "pt"})
    idx = index(model)
    idx["weight_map"][name] = shard.name
    (model / INDEX_NAME).write_text(json.dumps(idx))


@pytest.mark.parametrize("command", ["run", "plan", "eval", "eval --in-memory"])
def test_a_tensor_the_model_does_not_have_is_refused_before_any_write(capsys, model, out, long_text, command):
    """A tensor the model its config.json makes does not have was copied into the output: `done`, then
    streamsvd.load (and the output's remote code) refused the output. A q_proj bias beside attention_bias false is
    another model than the checkpoint's (transformers would ignore the bias; streamed eval scored it without)."""
    name = "model.layers.0.self_attn.q_proj.bias"
    _add_tensor(model, name, torch.ones(64))
    rc = cli(_argv(command, model, out, long_text))
    assert_clean_error(capsys, rc, name, "does not have", "attention_bias")
    assert not out.exists()


@pytest.mark.parametrize("command", ["run", "plan", "eval", "eval --in-memory"])
def test_an_untied_head_that_is_not_stored_is_refused(capsys, model, out, long_text, command):
    """Streamed eval put the input embedding in the place of a missing lm_head.weight that config.json says is its
    own tensor (tie_word_embeddings false): another model's perplexity, silently (a probe, 2026-12-07)."""
    from safetensors.torch import load_file, save_file

    assert not json.loads((model / "config.json").read_text()).get("tie_word_embeddings", False)
    shard = shard_of(model, "lm_head.weight")
    tensors = load_file(str(shard))
    del tensors["lm_head.weight"]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    idx = index(model)
    del idx["weight_map"]["lm_head.weight"]
    (model / INDEX_NAME).write_text(json.dumps(idx))
    rc = cli(_argv(command, model, out, long_text))
    assert_clean_error(capsys, rc, "lm_head.weight", "config.json")
    assert not out.exists()


def test_a_stored_per_layer_rotary_inv_freq_is_ignored_as_transformers_ignores_it(model, out):
    """An older transformers saved every layer's rotary_emb.inv_freq (a buffer computed from config.json): the job
    copied it into the output, and nothing could load that output. It is ignored on reading, as transformers ignores
    it, so the output is the model without it and loads."""
    from streamsvd.io.checkpoint import Checkpoint

    name = "model.layers.0.self_attn.rotary_emb.inv_freq"
    _add_tensor(model, name, torch.ones(8))
    assert cli(["run", model, out, *FAST]) == 0
    assert name not in Checkpoint(out).keys() and name not in json.loads((out / INDEX_NAME).read_text())["weight_map"]
    assert torch.isfinite(streamsvd.load(out)(torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.parametrize("value, needle", [(float("nan"), "NaN or infinite"), (float("inf"), "NaN or infinite"),
                                           (1e30, "non-finite figures")])
@pytest.mark.parametrize("alloc", ["uniform", "global"])
def test_weights_out_of_range_are_refused_by_name(capsys, model, out, value, needle, alloc):
    """NaN or inf in a weight gave a LinAlgError traceback after block 0's shard was written; a weight scaled by 1e30
    ran to `done:` and left a state its own commands refused (output_error inf), with --restart looping."""
    from safetensors.torch import load_file, save_file

    name = "model.layers.1.self_attn.q_proj.weight"
    shard = shard_of(model, name)
    tensors = load_file(str(shard))
    tensors[name] = tensors[name] * value if value == 1e30 else tensors[name].index_fill(0, torch.tensor([3]), value)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    rc = cli(["run", model, out, *FAST, "--alloc", alloc])
    if value == 1e30 and alloc == "global":
        # with torch 2.13 the job's own profile meets the overflow first: every later figure and every sensitivity is
        # non-finite, so no single linear is to blame there; its fix names --alloc uniform, which names the linear (the
        # other case). With torch 2.6 the profile's figures stay finite and the job names the linear itself.
        err = assert_clean_error(capsys, rc, needle)
        if "q_proj" not in err:
            assert "overflows float32" in err and "--alloc uniform" in err, err
            assert not (out / "profile" / "profile.json").exists()  # not written, then refused as damaged
    else:
        assert_clean_error(capsys, rc, needle, "q_proj")
    assert_not_complete(out)


@pytest.mark.parametrize("problem", ["empty", "short"])
def test_following_the_calib_fix_works_in_the_same_out_dir(capsys, pristine, out, tmp_path, long_text, problem):
    """A calibration error is raised before OUT_DIR is written, so the rerun that follows the printed
    fix (other text / other --seqlen) is not refused as "a different job"."""
    calib = tmp_path / "bad.txt"
    calib.write_text("" if problem == "empty" else "hello world")
    rc = cli(["run", pristine, out, "--calib", calib, *FAST])
    assert_clean_error(capsys, rc)
    assert_not_complete(out)
    rc = cli(["run", pristine, out, "--calib", long_text, *FAST])
    err = capsys.readouterr().err
    assert rc == 0, f"the rerun with the fix applied failed:\n{err}"
    assert (out / INDEX_NAME).is_file()


# ------------------------------------------------------------------------------------------ OUT_DIR
def test_out_dir_not_empty_and_not_a_job(capsys, pristine, out):
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("mine, do not touch")
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01\x02")
    before = snapshot(out)
    rc = cli(["run", pristine, out, *FAST])
    assert_clean_error(capsys, rc, str(out), "not empty")
    assert snapshot(out) == before
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "sub"]  # nothing added either


def test_out_dir_is_a_file(capsys, pristine, tmp_path):
    """OUT_DIR naming an existing file."""
    target = tmp_path / "a-file"
    target.write_text("mine")
    rc = cli(["run", pristine, target, *FAST])
    assert_clean_error(capsys, rc, "a-file")
    assert target.read_text() == "mine"


def test_out_dir_holds_a_different_job(capsys, pristine, out, long_text):
    assert cli(["run", pristine, out, "--ratio", "0.4", "--calib", long_text, *FAST]) == 0
    capsys.readouterr()
    assert (out / INDEX_NAME).is_file()
    before = snapshot(out)
    rc = cli(["run", pristine, out, "--ratio", "0.5", "--calib", long_text, *FAST])
    assert_clean_error(capsys, rc, str(out), "different streamsvd job", "it was --ratio 0.4, now 0.5")
    assert snapshot(out) == before  # the finished output is untouched, byte for byte
    rc = cli(["run", pristine, out, "--ratio", "0.4", "--calib", long_text, "--no-compensate", *FAST])
    assert_clean_error(capsys, rc, "it was --compensate, now --no-compensate")


# ------------------------------------------------------------------------------------------ load / eval
def test_load_refuses_an_interrupted_job(capsys, pristine, out, long_text):
    def stop_at_block_0(index):
        if index == 0:
            raise KeyboardInterrupt

    cfg = JobConfig(alloc="uniform", model_dir=pristine, out_dir=out, ratio=0.4, calib=[str(long_text)], calib_samples=4, seqlen=32,
                    progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_job(cfg, on_block_done=stop_at_block_0)
    assert not (out / INDEX_NAME).exists()
    assert json.loads((out / STATE_NAME).read_text())["blocks_done"] == 1  # the finished block is kept

    with pytest.raises(StreamSVDError) as info:
        streamsvd.load(out)
    assert "unfinished" in info.value.problem and info.value.fix
    assert "streamsvd run" in info.value.fix

    rc = cli(["eval", out, "--text", long_text, "--seqlen", "16", "--no-progress"])
    assert_clean_error(capsys, rc, "unfinished")
    assert not (out / INDEX_NAME).exists()


@pytest.mark.parametrize("flags", [["--max-mem", "2G"], ["--batch-size", "2"], ["--work-dir", "."]])
def test_eval_in_memory_refuses_the_streamed_evaluations_flags(capsys, pristine, long_text, flags):
    """The whole model is loaded with --in-memory: its --max-mem was silently ignored."""
    rc = cli(["eval", pristine, "--text", long_text, "--seqlen", "32", "--in-memory", *flags])
    assert_clean_error(capsys, rc, flags[0], "--in-memory")


def test_eval_seqlen_too_long(capsys, pristine, long_text):
    rc = cli(["eval", pristine, "--text", long_text, "--seqlen", "300", "--no-progress"])
    assert_clean_error(capsys, rc, "--seqlen 300", "256")


def test_eval_empty_text(capsys, pristine, tmp_path):
    text = tmp_path / "empty.txt"
    text.write_text("")
    rc = cli(["eval", pristine, "--text", text, "--seqlen", "16", "--no-progress"])
    assert_clean_error(capsys, rc, "0 tokens")


@pytest.mark.parametrize("flags", [["--seqlen", "0"], ["--seqlen", "1"], ["--seqlen", "-5"],
                                   ["--seqlen", "16", "--max-windows", "-1"]], ids=lambda f: "".join(f))
def test_eval_bad_window_settings(capsys, pristine, tmp_path, long_text, flags):
    """Eval validates --seqlen / --max-windows before loading anything.

    The text is kept short for the --seqlen cases, so a regression (one forward per token) stays quick."""
    text = long_text
    if "--max-windows" not in flags:
        text = tmp_path / "short.txt"
        text.write_text("hello world, hello world")
    rc = cli(["eval", pristine, "--text", text, *flags, "--no-progress"])
    assert_clean_error(capsys, rc, flags[-2])


# ------------------------------------------------------------------------------------------ disk
def test_not_enough_disk_space_is_refused_before_anything_is_written(capsys, pristine, out, long_text, monkeypatch):
    import streamsvd.io.diskspace as diskspace

    monkeypatch.setattr(diskspace, "free_bytes", lambda path: 10 << 20)
    rc = cli(["run", pristine, out, "--calib", long_text, *FAST])
    assert_clean_error(capsys, rc, "not enough disk space", str(out), "--work-dir")
    assert not out.exists()


def test_disk_space_estimate_matches_what_a_job_writes(pristine, out, long_text):
    from streamsvd.job.pipeline import CompressionJob

    cfg = JobConfig(alloc="uniform", model_dir=pristine, out_dir=out, calib=[str(long_text)], calib_samples=4, seqlen=32, progress=False)
    job = CompressionJob(cfg)
    needs = job._disk_needs()
    job.run()
    written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and not p.name.startswith("streamsvd_"))
    assert 0.9 < written / needs[out] < 1.1
    # two float32 activation files, each with both streams, one block's float32 original inputs to o and gate/up and
    # outputs of down (its cross statistic is W C, paired with W x), and its saved inputs of o and down (stages.Replay)
    c = job.config
    stash = 4 * 32 * 4 * (c.num_attention_heads * c.head_dim + c.hidden_size + c.hidden_size)
    replayed = 4 * 32 * 4 * (c.num_attention_heads * c.head_dim + c.intermediate_size)
    assert needs[job.work] == 2 * 2 * 4 * 32 * 64 * 4 + stash + replayed


def test_disk_full_mid_job_is_one_clear_error_and_the_rerun_resumes(capsys, pristine, out, long_text, monkeypatch):
    import safetensors

    import streamsvd.io.output as output

    real_save, calls = output.save_file, []

    def save_until_full(*args, **kwargs):
        calls.append(args[1])
        if len(calls) > 5:  # (spectra, shard) of blocks 0 and 1, spectra of block 2, then the disk is full (the extra shard is a stream copy)
            raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(output, "save_file", save_until_full)
    rc = cli(["run", pristine, out, "--calib", long_text, *FAST])
    assert_clean_error(capsys, rc, "disk is full", "run the same command again")
    assert_not_complete(out)
    assert not list(out.rglob(".*.tmp-*")), "a temporary file was left behind"
    assert json.loads((out / STATE_NAME).read_text())["blocks_done"] == 2  # the finished blocks are kept

    monkeypatch.setattr(output, "save_file", real_save)
    assert cli(["run", pristine, out, "--calib", long_text, *FAST]) == 0
    assert "done:" in capsys.readouterr().out
    assert (out / INDEX_NAME).is_file()


def test_disk_full_while_copying_the_model_dir_files(capsys, pristine, out, long_text, monkeypatch):
    """A full disk in a plain OSError write (copying tokenizer and generation config files) is one clear error."""
    import errno

    import streamsvd.io.output as output

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(output.shutil, "copyfile", full)
    rc = cli(["run", pristine, out, "--calib", long_text, *FAST])
    assert_clean_error(capsys, rc, "disk is full", str(out))
    assert not (out / INDEX_NAME).exists()


def test_disk_full_when_allocating_activations(capsys, pristine, out, long_text, monkeypatch):
    import errno

    import streamsvd.io.diskspace as diskspace

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(diskspace.os, "posix_fallocate", full)
    rc = cli(["run", pristine, out, "--calib", long_text, *FAST])
    assert_clean_error(capsys, rc, "disk is full", "inputs-0.bin")  # the default job's first: its profile's
    assert_not_complete(out)
    assert not list(out.rglob("*.bin"))
    other = Path(out).parent / "uniform"
    rc = cli(["run", pristine, other, "--calib", long_text, *FAST, "--alloc", "uniform"])  # no profile: the job's own
    assert_clean_error(capsys, rc, "disk is full", "acts-0.bin")
    assert_not_complete(other)
    assert not list(other.rglob("acts-*.bin"))


# ------------------------------------------------------------------------------------------ real script
@pytest.mark.parametrize("damage", ["deleted_shard", "unsupported_arch"])
def test_console_script_exit_code_and_no_traceback(model, out, damage):
    if damage == "deleted_shard":
        shard = shard_of(model, LAYER_TENSOR)
        shard.unlink()
        needle = shard.name
    else:
        edit_config(model, model_type="gpt2")
        needle = "gpt2"
    exe = shutil.which("streamsvd")
    cmd = [exe] if exe else [sys.executable, "-m", "streamsvd.cli"]
    proc = subprocess.run(cmd + ["run", str(model), str(out), *FAST], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") or "\nerror: " in proc.stderr, proc.stderr
    assert needle in proc.stderr and "  fix: " in proc.stderr
    assert_not_complete(out)


def test_messages_that_named_the_wrong_problem(capsys, tmp_path, pristine):
    """Each was refused, but for another reason than the real one."""
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    (tmp_path / "afile").write_text("")
    for argv, says in ((["import-gguf", tmp_path, tmp_path / "o"], "is a directory"),      # said "does not exist"
                       (["import-gguf", tmp_path / "a.gguf", tmp_path / "afile"], "is a file"),  # "not empty"
                       (["quantize", tmp_path / "nope", tmp_path / "q"], "does not exist"),  # "not a finished output"
                       (["export", "dense", pristine, tmp_path / "d", "--onnx-pivoted", "rows"], "--onnx-pivoted")):
        assert_clean_error(capsys, cli(argv), says)
    # verify --json on what is no output printed nothing on stdout: scripts get one object with ok false
    rc = cli(["verify", tmp_path / "nope", "--json"])
    captured = capsys.readouterr()
    assert rc == 2 and json.loads(captured.out)["ok"] is False and captured.err.count("error: ") == 1
    # with the keys of every other verify object, so a script reads them the same way (they were missing)
    ok = json.loads(captured.out)
    assert {"complete", "blocks_done", "files_checked", "damaged", "files_ok", "fix"} <= set(ok) and ok["fix"]


def test_a_permission_error_anywhere_is_one_error_and_a_fix(monkeypatch, tmp_path, capsys):
    """An immutable parent folder (`chattr +i`) gives EPERM, which the writers' own permission checks (EACCES) did not
    catch: quantize, both exports and eval's scratch folder ended in a PermissionError traceback."""
    from streamsvd.job import quantize_output

    def denied(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted", str(tmp_path / "ro" / "new"))

    monkeypatch.setattr(quantize_output, "_quantize_output", denied)
    assert main(["quantize", str(tmp_path / "out"), str(tmp_path / "new"), "--quant", "int8"]) == 2
    err = capsys.readouterr().err
    assert f"error: permission denied on {tmp_path / 'ro' / 'new'} (Operation not permitted)" in err
    assert "fix: " in err and "Traceback" not in err


def test_a_dangling_link_given_as_a_folder_is_named_as_one(tmp_path, capsys):
    """`profile MODEL LINK` with LINK pointing nowhere said LINK 'is a file, not a directory'."""
    model = make_tiny_checkpoint("llama", tmp_path / "model", num_hidden_layers=2)
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    assert main(["profile", str(model), str(tmp_path / "link"), "--calib-samples", "4", "--seqlen", "32",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"cannot be created: {tmp_path / 'link'} is a link to nothing" in err and "Traceback" not in err


def test_a_profile_into_a_streamsvd_output_is_refused(tmp_path, capsys):
    """`profile MODEL OUT_DIR` wrote profile.json and the spectra among a finished output's files."""
    model = make_tiny_checkpoint("llama", tmp_path / "model", num_hidden_layers=2)
    out = tmp_path / "out"
    run_job(JobConfig(model_dir=model, out_dir=out, ratio=0.4, calib_samples=4, seqlen=32, alloc="uniform", progress=False))
    before = sorted(p.name for p in out.iterdir())
    assert main(["profile", str(model), str(out), "--calib-samples", "4", "--seqlen", "32", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"PROFILE_DIR {out} is a streamsvd output" in err and "fix: " in err
    assert sorted(p.name for p in out.iterdir()) == before


def test_a_model_dir_that_is_a_file_is_called_a_file(capsys, pristine, tmp_path):
    """eval and run said "model directory X does not exist" of a file that exists (a probe, 2026-12-07)."""
    for argv in (["eval", pristine / "config.json", "--text", pristine / "config.json"],
                 ["run", pristine / "config.json", tmp_path / "out", *FAST]):
        assert_clean_error(capsys, cli(argv), "config.json is a file, not a directory")


# ------------------------------------------------------------------------------------------ a second probe, 2026-12-07
@pytest.mark.parametrize("edit, needle", [
    (lambda m: (m / INDEX_NAME).write_text('{"weight_map": null}'), "not a valid index"),
    (lambda m: (m / INDEX_NAME).write_text('{"weight_map": {"model.norm.weight": 5}}'), "not a valid index"),
    (lambda m: (m / INDEX_NAME).write_text("[]"), "not a valid index"),
    (lambda m: edit_config(m, model_type=[]), "model_type"),
    (lambda m: (m / "config.json").write_text("[" * 100000 + "]" * 100000), "not valid JSON"),
    (lambda m: edit_config(m, rope_parameters={"rope_theta": 0, "rope_type": "default"}), "NaN or infinite"),
])
def test_malformed_files_and_configs_that_gave_tracebacks_are_refused(capsys, model, out, edit, needle):
    """An index of the wrong types, a model_type that is a list, JSON nested deeper than Python's stack, and a config
    whose rope makes the activations NaN each stopped the job in a traceback."""
    edit(model)
    assert_clean_error(capsys, cli(["run", model, out, *FAST, "--alloc", "uniform"]), needle)
    assert_not_complete(out)


def test_an_out_dir_that_is_a_symlink_loop_is_refused(capsys, model, tmp_path):
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    assert_clean_error(capsys, cli(["run", model, tmp_path / "loop1", *FAST]), "loop of symbolic links")


def test_zero_weights_a_non_utf8_calib_name_and_a_broken_generation_config_make_a_loadable_output(capsys, model, out,
                                                                                                   long_text, tmp_path):
    """A weight of zeros made pivoting raise (math/pivot.py); a --calib file named in Latin-1 bytes stopped the job
    writing its report after every block, on every rerun; a generation_config.json that transformers skips made
    load and export onnx stop in a traceback. Each now finishes, and the output loads."""
    from safetensors.torch import load_file, save_file

    shard = shard_of(model, LAYER_TENSOR)
    tensors = load_file(str(shard))
    tensors[LAYER_TENSOR] = torch.zeros_like(tensors[LAYER_TENSOR])
    save_file(tensors, str(shard), metadata={"format": "pt"})
    (model / "generation_config.json").write_text("garbage{")
    calib = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9.txt"))
    shutil.copyfile(long_text, calib)
    assert cli(["run", model, out, *FAST, "--calib", calib]) == 0
    assert "caf\ufffd.txt" in (out / "streamsvd_report.md").read_text()
    capsys.readouterr()
    logits = streamsvd.load(out)(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all() and "generation_config.json cannot be read" in capsys.readouterr().err


def test_a_jsonl_with_a_lone_surrogate_is_read_and_one_nested_too_deep_is_refused(tmp_path):
    """'\\ud800' is valid JSON that no UTF-8 encoder takes: the tokenizer raised UnicodeEncodeError in run, plan,
    profile and eval; it is replaced as stray bytes are. A line nested deeper than Python's stack raised
    RecursionError."""
    from streamsvd.io.calibration import read_text_file, text_digest

    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"text": "abc \ud800 def"}) + "\n" + json.dumps({"text": "\U0001F600"}) + "\n")
    text = read_text_file(path)
    assert text == "abc \ufffd def\n\n\U0001F600" and text_digest(text)
    path.write_text("[" * 100000 + "]" * 100000 + "\n")
    with pytest.raises(StreamSVDError, match="not a JSON object"):
        read_text_file(path)


def test_load_takes_a_dtype_name_and_refuses_arguments_of_the_wrong_kind(pristine):
    """load(None), dtype="float16" (which transformers takes), device="bogus" or "meta" were raw TypeErrors,
    RuntimeErrors or AssertionErrors, and "meta" a refusal saying the output was incomplete (a probe)."""
    assert next(streamsvd.load(pristine, dtype="bfloat16").parameters()).dtype == torch.bfloat16
    for kwargs, needle in (({"dtype": "int8"}, "floating-point"), ({"dtype": "nonsense"}, "floating-point"),
                           ({"device": "bogus"}, "--device"), ({"device": "meta"}, "--device")):
        with pytest.raises(StreamSVDError, match=needle):
            streamsvd.load(pristine, **kwargs)
    with pytest.raises(StreamSVDError, match="folder's path"):
        streamsvd.load(None)
