"""`streamsvd eval --device`: the streamed (and in-memory) evaluation with its blocks, and its head where it fits, on a
GPU. Without one, the GPU path runs on the simulated device of tests/sim_device.py (CPU kernels behind a device of
its own, where a tensor left on the host fails as on CUDA), so it must give the CPU's perplexity exactly; where torch
sees a GPU, the CLI test compares it with the CPU to round-off instead."""

import json

import pytest
import torch

import streamsvd
from streamsvd.cli import main
from streamsvd.errors import StreamSVDError
from streamsvd.io.calibration import default_text, load_tokenizer
from streamsvd.io.checkpoint import Checkpoint
from streamsvd.job import stream_eval
from streamsvd.job.device import GPU_SLACK_BYTES
from streamsvd.job.evaluate import perplexity
from streamsvd.job.pipeline import JobConfig, run_job
from streamsvd.job.stream_eval import eval_sizes, gpu_eval_batch_size, head_fits_gpu, streaming_perplexity
from streamsvd.model.architecture import load_config
from tiny_models import CONFIGS, make_tiny_checkpoint

TEXT = default_text()[:60_000]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny checkpoint and its compressed output (pivoted factors, the default stored form)."""
    root = tmp_path_factory.mktemp("evaldev")
    model_dir = make_tiny_checkpoint("llama", root / "model")
    out = root / "out"
    run_job(JobConfig(alloc="uniform", model_dir=model_dir, out_dir=out, ratio=0.5, calib_samples=4, seqlen=32,
                      progress=False, plots=False))
    return model_dir, out


def _on_sim(monkeypatch):
    from sim_device import SIM

    from streamsvd.job import device

    made = []

    def resolve(name, local_rank=0):
        made.append(name)
        return SIM

    monkeypatch.setattr(device, "resolve_device", resolve)
    return made


@pytest.mark.parametrize("which", ["original", "compressed"])
@pytest.mark.parametrize("head", ["head on the device", "head on the host"])
@pytest.mark.parametrize("on_disk", [False, True], ids=["states in RAM", "states on disk"])
def test_streamed_eval_on_a_simulated_gpu_gives_the_cpus_perplexity_exactly(models, tmp_path, monkeypatch, which,
                                                                              head, on_disk):
    from sim_device import SimDevice

    path = models[0] if which == "original" else models[1]
    kw = dict(max_windows=5, progress=False, batch_size=2, on_disk=on_disk, work_dir=tmp_path)
    cpu = streaming_perplexity(path, TEXT, 48, **kw)
    made = _on_sim(monkeypatch)
    if head == "head on the host":
        monkeypatch.setattr(stream_eval, "head_fits_gpu", lambda *a: False)
    with SimDevice():
        sim = streaming_perplexity(path, TEXT, 48, device="cuda", **kw)
    assert made == ["cuda"]
    assert sim["perplexity"] == cpu["perplexity"] and sim["tokens_scored"] == cpu["tokens_scored"] == 5 * 47
    assert sim["head_on_device"] == (head == "head on the device") and cpu["device"] == "cpu"
    assert list(tmp_path.iterdir()) == []  # the on-disk states' scratch is gone


def test_a_forgotten_move_fails_on_the_simulated_gpu(models, monkeypatch):
    """The check above can fail: a block's batch left on the host meets the block's weights on the device."""
    from sim_device import SimDevice

    _on_sim(monkeypatch)
    real = stream_eval.layer_args_on
    monkeypatch.setattr(stream_eval, "layer_args_on", lambda args, device: real(args, torch.device("cpu")))
    with SimDevice(), pytest.raises(RuntimeError, match="same device"):
        streaming_perplexity(models[0], TEXT, 48, max_windows=2, progress=False, device="cuda")


def test_in_memory_eval_on_a_simulated_gpu_gives_the_cpus_perplexity_exactly(models):
    from sim_device import SIM, SimDevice

    out = models[1]
    tokenizer = load_tokenizer(out)
    cpu = perplexity(streamsvd.load(out), tokenizer, TEXT, 48, max_windows=3, progress=False)
    with SimDevice():
        sim = perplexity(streamsvd.load(out).to(SIM), tokenizer, TEXT, 48, max_windows=3, progress=False, device=SIM)
    assert sim["perplexity"] == cpu["perplexity"]


def test_the_gpu_budget_sets_the_batch_and_a_too_small_one_names_what_works(models):
    ckpt = Checkpoint(models[0])
    config = load_config(ckpt)
    block, per_window, _ = eval_sizes(config, ckpt, 48)
    with pytest.raises(StreamSVDError) as refused:
        gpu_eval_batch_size(config, ckpt, 48, 10, GPU_SLACK_BYTES + block)
    assert "--max-gpu-mem" in refused.value.problem and "lower --seqlen" in refused.value.fix
    need = refused.value.fix.split("at least ")[1].split(",")[0]
    from streamsvd.job.memory import parse_size

    smallest = parse_size(need)
    assert gpu_eval_batch_size(config, ckpt, 48, 10, smallest) >= 1  # the budget the fix names works
    many = gpu_eval_batch_size(config, ckpt, 48, 10_000, smallest + 100 * per_window * 11 // 10)
    assert 99 <= many <= 101
    assert gpu_eval_batch_size(config, ckpt, 48, 3, 1 << 40) == 3  # never more than the windows


def test_the_head_goes_to_the_gpu_only_where_it_fits(models):
    config = load_config(Checkpoint(models[0]))
    head = 4 * config.vocab_size * config.hidden_size
    assert head_fits_gpu(config, 48, None)
    assert head_fits_gpu(config, 48, 1 << 34)
    assert not head_fits_gpu(config, 48, GPU_SLACK_BYTES + head)  # the allowance leaves too little beside the weight


def _eval(model, text, *flags):
    return main(["eval", str(model), "--text", str(text), "--seqlen", "40", "--max-windows", "3", "--json",
                 "--no-progress", *flags])


@pytest.mark.parametrize("mode", [[], ["--in-memory"]], ids=["streamed", "in memory"])
def test_eval_on_cuda_matches_the_cpu_or_is_refused_before_reading(models, tmp_path, capsys, mode):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    assert _eval(models[1], text, *mode) == 0
    cpu = json.loads(capsys.readouterr().out)
    code = _eval(models[1], text, *mode, "--device", "cuda")
    captured = capsys.readouterr()
    if not torch.cuda.is_available():
        err = captured.err.strip().splitlines()
        assert code == 2 and captured.out == ""
        assert err[0].startswith("error: --device cuda:") and err[1].strip().startswith("fix:"), err
        return
    assert code == 0
    gpu = json.loads(captured.out)
    assert gpu["perplexity"] == pytest.approx(cpu["perplexity"], rel=1e-5)
    if not mode:
        assert gpu["device"] == "cuda:0" and 0 < gpu["gpu_peak_bytes"] <= gpu["max_gpu_mem_bytes"]


@pytest.mark.parametrize("flags, match", [
    (["--max-gpu-mem", "4G"], "error: --max-gpu-mem without --device cuda"),
    (["--device", "tpu"], "error: unknown --device 'tpu'"),
    (["--device", "cuda", "--max-gpu-mem", "0"], "error: --max-gpu-mem"),
])
def test_bad_eval_device_flags_are_one_error(models, tmp_path, capsys, flags, match):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    assert _eval(models[0], text, *flags) == 2
    err = capsys.readouterr().err
    assert err.startswith(match) and "fix:" in err and "Traceback" not in err


def test_out_of_memory_in_eval_is_one_error_naming_evals_levers(models, tmp_path, capsys, monkeypatch):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)

    def failing(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")

    monkeypatch.setattr(stream_eval, "run_layer", failing)
    assert _eval(models[0], text) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB)")
    assert "--batch-size" in err and "finished blocks" not in err and "Traceback" not in err


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_every_family_evaluates_on_the_simulated_gpu_to_the_cpus_perplexity(model_type, tmp_path, monkeypatch):
    """Each family's per-block arguments (masks, rotary tables, Gemma's local and global ones, softcapping) reach the
    device with the block: the CPU's perplexity exactly."""
    from sim_device import SimDevice

    model_dir = make_tiny_checkpoint(model_type, tmp_path / "model")
    cpu = streaming_perplexity(model_dir, TEXT, 48, max_windows=3, progress=False)
    _on_sim(monkeypatch)
    with SimDevice():
        sim = streaming_perplexity(model_dir, TEXT, 48, max_windows=3, progress=False, device="cuda")
    assert sim["perplexity"] == cpu["perplexity"] and sim["head_on_device"]


def test_what_the_simulated_gpu_holds_during_eval_stays_under_its_count(tmp_path, monkeypatch):
    """The most the simulated device holds during a streamed eval (tests/sim_device.Ledger) against what
    gpu_eval_batch_size and head_fits_gpu count: a block and the batch's working set, or the head's phase."""
    import gc

    from sim_device import LEDGER, SimDevice

    model_dir = make_tiny_checkpoint("llama", tmp_path / "model", hidden_size=256, intermediate_size=688,
                                     num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                                     max_position_embeddings=512)
    ckpt = Checkpoint(model_dir)
    config = load_config(ckpt)
    block, per_window, logits = eval_sizes(config, ckpt, 128)
    _on_sim(monkeypatch)
    gc.collect()
    base = LEDGER.now
    LEDGER.reset_peak()
    with SimDevice():
        got = streaming_perplexity(model_dir, TEXT, 128, max_windows=8, progress=False, batch_size=8, device="cuda")
    held = LEDGER.reset_peak() - base
    head = 4 * config.vocab_size * config.hidden_size + logits + 2 * 4 * 128 * config.hidden_size
    assert got["batch_size"] == 8 and block < held <= max(block + 8 * per_window, head)
