"""`run` says which text its statistics come from, and warns when it is the narrow built-in default."""

import pytest

from streamsvd.cli import main
from streamsvd.io.calibration import DEFAULT_SOURCE
from tiny_models import make_tiny_checkpoint

FAST = ["--calib-samples", "3", "--seqlen", "24", "--no-progress"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("llama") / "model")


def test_no_calib_names_the_default_text_and_warns_with_a_fix(tiny, tmp_path, capsys):
    assert main(["run", str(tiny), str(tmp_path / "out"), *FAST]) == 0
    out, err = capsys.readouterr()
    assert f"calibration:        3 windows x 24 tokens of {DEFAULT_SOURCE}" in out
    lines = err.splitlines()
    warning = next(i for i, line in enumerate(lines) if line.startswith("warning: no --calib"))
    assert "Python's reference documentation" in lines[warning]
    assert lines[warning + 1].startswith("fix: pass --calib FILE")


def test_a_calib_file_is_named_and_nothing_is_warned(tiny, tmp_path, capsys):
    text = tmp_path / "plays.txt"
    text.write_text("To be, or not to be, that is the question. " * 200)
    assert main(["run", str(tiny), str(tmp_path / "out"), "--calib", str(text), *FAST]) == 0
    out, err = capsys.readouterr()
    assert f"calibration:        3 windows x 24 tokens of {text.name}" in out
    assert "warning: no --calib" not in err


def test_the_source_is_the_same_whichever_directory_the_job_runs_from(tmp_path, monkeypatch):
    """config.json recorded the path as typed: a resume from another directory wrote another config.json."""
    from streamsvd.io.calibration import load_texts

    (tmp_path / "data").mkdir()
    for name in ("a.txt", "b.txt"):
        (tmp_path / "data" / name).write_text("some words " * 50)
    monkeypatch.chdir(tmp_path)
    relative = load_texts(["data/a.txt", "data/b.txt"])
    monkeypatch.chdir(tmp_path / "data")
    assert load_texts(["a.txt", str(tmp_path / "data" / "b.txt")]) == relative
    assert relative[1] == "a.txt, b.txt"


@pytest.mark.parametrize("add_bos", [False, True])
def test_a_text_of_exactly_one_window_is_taken_and_one_token_less_is_refused(add_bos):
    """A window is --seqlen tokens, the first of them BOS where the tokenizer adds one: a text of exactly the tokens a
    window draws is enough (it was refused, one token short by the count); one fewer is refused, counted right."""
    from streamsvd.errors import StreamSVDError
    from streamsvd.io.calibration import sample_windows, tokenize
    from tiny_models import tiny_tokenizer

    tok = tiny_tokenizer(add_bos=add_bos)
    words = " ".join(f"w{i}" for i in range(200))
    tokens, bos = tokenize(tok, words)
    assert (bos is not None) == add_bos
    body = 24 - (1 if add_bos else 0)
    text = tok.decode(tokens[:body].tolist())
    assert tokenize(tok, text)[0].numel() == body
    windows = sample_windows(tok, text, samples=3, seqlen=24, seed=0)
    assert windows.shape == (3, 24)
    assert windows[:, -body:].tolist() == [tokens[:body].tolist()] * 3
    if add_bos:
        assert (windows[:, 0] == tok.bos_token_id).all()
    short = tok.decode(tokens[: body - 1].tolist())
    with pytest.raises(StreamSVDError, match=f"has {body - 1} tokens, fewer than one window of --seqlen 24"):
        sample_windows(tok, short, samples=1, seqlen=24, seed=0)


def test_fewer_calibration_tokens_than_the_widest_input_is_warned(tiny, tmp_path, capsys):
    """3 x 24 = 72 tokens for down_proj's 160 inputs: its Gram has rank 72 at most, which ran without a word."""
    text = tmp_path / "plays.txt"
    text.write_text("To be, or not to be, that is the question. " * 200)
    assert main(["run", str(tiny), str(tmp_path / "thin"), "--calib", str(text), *FAST]) == 0
    err = capsys.readouterr().err
    assert ("warning: 3 windows x 24 tokens = 72 calibration tokens, fewer than down_proj's 160 inputs: its statistics "
            "have rank at most 72") in err
    assert main(["run", str(tiny), str(tmp_path / "enough"), "--calib", str(text), "--calib-samples", "7", "--seqlen", "24",
                 "--no-progress"]) == 0
    assert "calibration tokens, fewer than" not in capsys.readouterr().err  # 168 tokens


@pytest.mark.parametrize("add_bos", [False, True])
def test_windows_are_one_gather_of_the_tokens_the_same_as_one_slice_each(add_bos):
    """The windows were a Python list of one slice per window, stacked (hundreds of bytes per window on the way);
    they are one gather now: the same ids, windows of BOS + body where the tokenizer has a BOS."""
    import torch

    from streamsvd.io.calibration import default_text, sample_windows, tokenize
    from tiny_models import tiny_tokenizer

    tokenizer, text = tiny_tokenizer(add_bos=add_bos), default_text()[:50_000]
    windows = sample_windows(tokenizer, text, 37, 24, seed=5)
    tokens, bos = tokenize(tokenizer, text)
    assert (bos is not None) == add_bos
    body = 24 - (bos is not None)
    starts = torch.randint(0, tokens.numel() - body + 1, (37,), generator=torch.Generator().manual_seed(5))
    expected = torch.stack([tokens[s:s + body] for s in starts.tolist()])
    if bos is not None:
        expected = torch.cat([torch.full((37, 1), bos, dtype=torch.long), expected], dim=1)
    assert torch.equal(windows, expected) and windows.shape == (37, 24) and windows.dtype == torch.long


def test_windows_beyond_this_machines_ram_are_refused_before_they_are_made(tiny, capsys):
    """`plan --calib-samples 100000000 --seqlen 16` was killed for memory on a 23 GiB machine, with no error line."""
    assert main(["plan", str(tiny), "--calib-samples", str(10 ** 10), "--seqlen", "16"]) == 2
    err = capsys.readouterr().err
    assert "windows x 16 tokens need" in err and "more than this machine's" in err and "fix: use fewer --calib-samples" in err
