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
