"""Streaming evaluation (one block at a time) gives the in-memory figure, for every family."""

import json
from pathlib import Path

import pytest
import torch

import streamsvd
from streamsvd.cli import main
from streamsvd.io.calibration import default_text, load_tokenizer
from streamsvd.job.evaluate import perplexity
from streamsvd.job.pipeline import JobConfig, run_job
from streamsvd.io.checkpoint import Checkpoint
from streamsvd.model.architecture import empty_model, load_config
from streamsvd.model.loading import stored_layer
from streamsvd.job import stream_eval
from streamsvd.job.stream_eval import hidden_on_disk, streaming_perplexity
from tiny_models import CONFIGS, make_tiny_checkpoint

TEXT = default_text()[:60_000]


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_streaming_matches_in_memory_original_and_compressed(model_type, tmp_path):
    model_dir = make_tiny_checkpoint(model_type, tmp_path / "model")
    out = tmp_path / "out"
    run_job(JobConfig(alloc="uniform", model_dir=model_dir, out_dir=out, ratio=0.5, calib_samples=4, seqlen=32, progress=False))
    for path in (model_dir, out):
        expected = perplexity(streamsvd.load(path), load_tokenizer(path), TEXT, 48, max_windows=5, progress=False)
        got = streaming_perplexity(path, TEXT, 48, max_windows=5, progress=False)
        assert got["windows"] == expected["windows"] == 5
        assert got["tokens_scored"] == expected["tokens_scored"]
        assert got["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-4)
    # the streamed compressed blocks are the stored factors, not the original weights
    ckpt = Checkpoint(out)
    skeleton = empty_model(load_config(ckpt))
    layer = stored_layer(skeleton, 0, ckpt, torch.float32)
    assert not any(isinstance(m, torch.nn.Linear) for m in layer.modules())


def test_hidden_states_on_disk_give_the_same_figure(tmp_path):
    model_dir = make_tiny_checkpoint("llama", tmp_path / "model")
    in_ram = streaming_perplexity(model_dir, TEXT, 48, max_windows=6, progress=False)
    work = tmp_path / "work"
    work.mkdir()
    on_disk = streaming_perplexity(model_dir, TEXT, 48, max_windows=6, work_dir=work, progress=False, on_disk=True)
    assert not in_ram["hidden_on_disk"] and on_disk["hidden_on_disk"]
    assert on_disk["perplexity"] == pytest.approx(in_ram["perplexity"], rel=1e-5)
    assert list(work.iterdir()) == []  # scratch removed


def test_the_scratch_folder_of_a_killed_eval_is_removed_by_the_next(tmp_path, monkeypatch):
    """A killed eval left its hidden states (`streamsvd-eval-XXXX`: two files of windows x seqlen x hidden float32,
    GBs at 7B) in the temporary folder for good. The next eval removes those no live eval holds (the folder's flock,
    dropped by the kernel with its process; a PID said nothing across PID namespaces, where a probe saw one eval remove
    another's live files), and leaves a running one's and anything else alone."""
    import os
    import subprocess
    import sys

    from streamsvd.io.fsutil import HELD_MARKER, new_held_folder

    model_dir = make_tiny_checkpoint("llama", tmp_path / "model")
    work = tmp_path / "work"
    work.mkdir()
    stale = work / "streamsvd-eval-k1ll3d"  # what a killed eval left: marked as streamsvd's, nobody holds it
    stale.mkdir()
    (stale / HELD_MARKER).write_bytes(b"")
    (stale / "hidden-0.bin").write_bytes(b"x" * 1000)
    mine = work / "streamsvd-eval-mynotes"  # a user's own folder of that name (a probe saw it removed, contents too)
    mine.mkdir()
    (mine / "a.txt").write_text("important")
    # a live eval in another process (its own PID namespace would do the same): it holds its folder's flock
    child = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                              "from streamsvd.io.fsutil import new_held_folder; "
                              f"print(new_held_folder(Path({str(work)!r}), 'streamsvd-eval-')[0], flush=True); "
                              "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        live = Path(child.stdout.readline().strip())
        kept = [live, work / "other-folder", mine]
        kept[1].mkdir()
        seen = []
        real = stream_eval.ActivationFile

        def spy(path, *args, **kwargs):
            seen.append(Path(path).parent)
            return real(path, *args, **kwargs)

        monkeypatch.setattr(stream_eval, "ActivationFile", spy)
        got = streaming_perplexity(model_dir, TEXT, 48, max_windows=3, work_dir=work, progress=False, on_disk=True)
        assert got["hidden_on_disk"] and len(set(seen)) == 1
        own = seen[0]
        assert own.parent == work and own.name.startswith("streamsvd-eval-") and own not in kept
        assert sorted(work.iterdir()) == sorted(kept)  # the stale folder and this eval's own are gone
    finally:
        child.kill()
        child.wait()
    # a folder made by new_held_folder here, then let go (its process ended): swept by the next eval
    folder, fd = new_held_folder(work, "streamsvd-eval-")
    os.close(fd)
    streaming_perplexity(model_dir, TEXT, 48, max_windows=3, work_dir=work, progress=False, on_disk=True)
    assert not folder.exists() and not live.exists() and (mine / "a.txt").read_text() == "important"


def test_hidden_states_go_to_disk_when_they_would_take_over_a_quarter_of_the_budget():
    assert not hidden_on_disk(100 << 20, 1 << 30)
    assert hidden_on_disk(200 << 20, 1 << 30)


def test_eval_cli_streams_by_default_and_in_memory_on_request(tmp_path, capsys):
    model_dir = make_tiny_checkpoint("qwen2", tmp_path / "model")
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    assert main(["eval", str(model_dir), "--text", str(text), "--seqlen", "40", "--max-windows", "3", "--json", "--no-progress"]) == 0
    streamed = json.loads(capsys.readouterr().out)
    assert main(["eval", str(model_dir), "--text", str(text), "--seqlen", "40", "--max-windows", "3", "--json",
                 "--in-memory", "--no-progress"]) == 0
    loaded = json.loads(capsys.readouterr().out)
    assert streamed["in_memory"] is False and loaded["in_memory"] is True
    assert set(loaded) == set(streamed) and loaded["batch_size"] == 1 and loaded["hidden_on_disk"] is False  # one schema
    assert streamed["perplexity"] == pytest.approx(loaded["perplexity"], rel=1e-4)


def test_eval_refuses_a_budget_too_small_for_one_block(tmp_path, capsys):
    model_dir = make_tiny_checkpoint("llama", tmp_path / "model")
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    capsys.readouterr()
    assert main(["eval", str(model_dir), "--text", str(text), "--seqlen", "40", "--max-mem", "10M", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --max-mem") and "fix:" in err and "Traceback" not in err


def test_the_budget_an_eval_refusal_names_is_taken(tmp_path, capsys):
    """The fix line named the bare need, rounded in GiB or to 0.1 MiB, and another process measures its baseline
    anew: the figure given was refused (682.4 MiB said, 682.6 MiB needed). It names whole MiB with the plan's margin."""
    import re

    from streamsvd.job.peak import rss_bytes

    model_dir = make_tiny_checkpoint("llama", tmp_path / "model")
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    flags = ["eval", str(model_dir), "--text", str(text), "--seqlen", "40", "--no-progress"]
    main(flags + ["--max-mem", "20M"])  # warm: imports and the first read (refused or not)
    capsys.readouterr()
    tight = f"{(rss_bytes() >> 20) + 2}M"  # above what is resident, below a block and a window
    assert main(flags + ["--max-mem", tight]) == 2
    err = capsys.readouterr().err
    assert "too small to evaluate" in err, err
    give = re.search(r"give --max-mem (\d+)M or more", err)
    assert give, err
    assert main(flags + ["--max-mem", f"{give[1]}M"]) == 0


def test_on_the_cpu_eval_takes_about_2048_tokens_a_batch_with_the_figure_of_one_batch(tmp_path):
    from streamsvd.job.plan import cpu_batch

    model_dir = make_tiny_checkpoint("llama", tmp_path / "model")
    seqlen = 256  # the tiny model's longest; cpu_batch: 8 windows of 256 tokens
    got = streaming_perplexity(model_dir, TEXT, seqlen, max_windows=20, progress=False, max_mem=8 << 30)
    assert got["windows"] == 20 and got["batch_size"] == cpu_batch(seqlen) == 8
    whole = streaming_perplexity(model_dir, TEXT, seqlen, max_windows=20, progress=False, max_mem=8 << 30, batch_size=20)
    assert whole["batch_size"] == 20
    beyond = streaming_perplexity(model_dir, TEXT, seqlen, max_windows=20, progress=False, max_mem=8 << 30,
                                  batch_size=100_000)  # reported as given (100000) for 20 windows: a probe, 2026-12-07
    assert beyond["batch_size"] == 20 and beyond["perplexity"] == whole["perplexity"]
    assert got["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-6)


def test_eval_in_memory_of_a_bfloat16_checkpoint_gives_the_streamed_figure(tmp_path, capsys):
    """--in-memory loaded a bfloat16 checkpoint in bfloat16 and computed there, while the streamed evaluation
    computes in float32: 1215.29 against 1214.02 here (1e-3 relative), not the "same figure" to 1e-4."""
    model_dir = make_tiny_checkpoint("llama", tmp_path / "model", num_hidden_layers=2, dtype=torch.bfloat16,
                                     initializer_range=0.2)  # sharp logits, so the rounding shows
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    flags = ["--text", str(text), "--seqlen", "48", "--max-windows", "3", "--json", "--no-progress"]
    assert main(["eval", str(model_dir), *flags]) == 0
    streamed = json.loads(capsys.readouterr().out)
    assert main(["eval", str(model_dir), *flags, "--in-memory"]) == 0
    loaded = json.loads(capsys.readouterr().out)
    assert loaded["perplexity"] == pytest.approx(streamed["perplexity"], rel=1e-5)


def test_eval_refuses_a_work_dir_inside_the_model_it_reads(tmp_path, capsys):
    """A killed eval's hidden states stayed there: `verify` passed the folder and `quantize` copied them into NEW_DIR
    as files of the output (a probe, 2026-12-07)."""
    model = make_tiny_checkpoint("llama", tmp_path / "m")
    text = tmp_path / "t.txt"
    text.write_text(default_text())
    for work in (model, model / "scratch"):
        work.mkdir(exist_ok=True)
        assert main(["eval", str(model), "--text", str(text), "--seqlen", "16", "--work-dir", str(work), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("error: ") == 1 and "is the model being evaluated or inside it" in err and "fix: " in err
    assert main(["eval", str(model), "--text", str(text), "--seqlen", "16", "--work-dir", str(tmp_path), "--no-progress"]) == 0


def test_an_interrupted_eval_says_nothing_is_kept_and_a_lost_rank_that_it_starts_over(tmp_path, capsys, monkeypatch):
    """Both said "finished blocks are kept ... resume", and the rank's message "during start" (a probe, 2026-12-07)."""
    import streamsvd.cli as cli
    from streamsvd.errors import RERUN
    from streamsvd.job.distributed import World

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "eval", interrupted)
    assert main(["eval", str(tmp_path), "--text", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert "nothing of the evaluation is kept" in err and "resume" not in err
    world = World(rank=0, size=2)
    world.rerun_fix, world.stage, world.block = RERUN["eval"], "evaluation", 3
    monkeypatch.setattr(world, "_lost_after", lambda: [1])
    lost = world._failed(RuntimeError("connection reset"))
    assert "rank 1 of 2 was lost" in lost.problem and "during block 3 (evaluation)" in lost.problem
    assert "start it over" in lost.fix and "resume" not in lost.fix
