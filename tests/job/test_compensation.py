"""Jobs with sequential calibration, compensation and the anchor (job/stages.py GroupStatistics, math/compensate.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

import streamsvd
from streamsvd.cli import main
from streamsvd.io.output import RUN_LOG
from streamsvd.job.pipeline import JobConfig, job_identity, run_job
from streamsvd.job.state import STATE_NAME
from streamsvd.model.architecture import linear_modules
from tiny_models import first_layer, make_tiny_checkpoint

VOLATILE = {RUN_LOG, STATE_NAME, "profile_log.json"}  # the profile's wall times vary too
COMPENSATED = dict(calibrate="sequential", compensate=True, anchor=0.1)
OFF = dict(calibrate="block", compensate=False, anchor=0.0)  # the behaviour before compensation


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("m") / "model", num_hidden_layers=4)


def _cfg(model_dir, out, **overrides):
    return JobConfig(**{"alloc": "uniform", **dict(model_dir=model_dir, out_dir=out, ratio=0.4, calib_samples=6, seqlen=32, progress=False), **overrides})


def _files(out):
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name not in VOLATILE}


def _tensors(out, prefix):
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    got = {}
    for name, shard in index.items():
        if name.startswith(prefix):
            with safe_open(str(out / shard), framework="pt") as f:
                got[name] = f.get_tensor(name)
    return got


def _interrupt_after(block, cfg):
    def stop(index):
        if index == block:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_job(cfg, on_block_done=stop)


def test_the_first_group_of_the_first_block_is_todays_factoring(model_dir, tmp_path):
    """Block 0's q/k/v see the embeddings in both streams (X = X'), so compensation changes nothing there."""
    plain = run_job(_cfg(model_dir, tmp_path / "plain", **OFF))
    comp = run_job(_cfg(model_dir, tmp_path / "comp", calibrate="sequential", compensate=True, anchor=0.0))
    a, b = _tensors(tmp_path / "plain", "model.layers.0.self_attn.q_proj"), _tensors(tmp_path / "comp", "model.layers.0.self_attn.q_proj")
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            assert torch.allclose(a[k], b[k], atol=1e-4), k
    # Later groups are fitted to other statistics: the output differs, at the same size.
    assert not torch.equal(*(_tensors(d, "model.layers.2.mlp.down_proj")["model.layers.2.mlp.down_proj.out_factor"]
                             for d in (tmp_path / "plain", tmp_path / "comp")))
    assert comp["linear_params_after"] == plain["linear_params_after"]
    record = comp["modules"]["model.layers.2.mlp.up_proj"]
    assert record["output_error"] >= 0 and "output_error" not in plain["modules"]["model.layers.2.mlp.up_proj"]


def test_compensation_fits_the_original_outputs_on_the_calibration_windows(model_dir, tmp_path):
    """On the tokens it was fitted on, the compensated model's last hidden states are far closer to the
    original's (whether that carries over to other text is the benchmark's question: docs/RESULTS.md)."""
    from transformers import AutoModelForCausalLM

    from streamsvd.io.calibration import default_text, load_tokenizer, sample_windows

    plain, comp = tmp_path / "plain", tmp_path / "comp"
    run_job(_cfg(model_dir, plain, **OFF))
    run_job(_cfg(model_dir, comp, calibrate="sequential", compensate=True, anchor=0.0))
    windows = sample_windows(load_tokenizer(model_dir), default_text(), 6, 32, 0)  # the job's own windows

    def last_block_output(model):
        """The last decoder block's output, before the final norm (a hook: transformers 5.25's hidden_states[-1]
        is after the norm, earlier versions' before it)."""
        got = {}
        handle = model.model.layers[-1].register_forward_hook(lambda m, i, o: got.setdefault("h", o[0] if isinstance(o, tuple) else o))
        model(windows)
        handle.remove()
        return got["h"]

    with torch.no_grad():
        reference = last_block_output(AutoModelForCausalLM.from_pretrained(model_dir).eval())
        errors = [float((last_block_output(streamsvd.load(d)) - reference).pow(2).mean()) for d in (plain, comp)]
    assert errors[1] < 0.5 * errors[0]


def test_a_compensated_job_resumes_byte_identical_and_rebuilds_both_streams(model_dir, tmp_path):
    run_job(_cfg(model_dir, tmp_path / "straight", **COMPENSATED))
    out = tmp_path / "interrupted"
    _interrupt_after(1, _cfg(model_dir, out, **COMPENSATED))
    resumed = []
    run_job(_cfg(model_dir, out, **COMPENSATED), on_block_done=resumed.append)
    assert resumed == [2, 3]
    assert _files(out) == _files(tmp_path / "straight")

    lost = tmp_path / "lost"
    _interrupt_after(1, _cfg(model_dir, lost, **COMPENSATED))
    shutil.rmtree(lost / ".streamsvd-work")  # both streams are rebuilt from the finished blocks
    run_job(_cfg(model_dir, lost, **COMPENSATED))
    assert _files(lost) == _files(tmp_path / "straight")


def test_the_settings_are_part_of_the_identity_and_old_jobs_keep_theirs(model_dir, tmp_path):
    from streamsvd.io.checkpoint import Checkpoint

    ckpt = Checkpoint(model_dir)
    legacy = job_identity(_cfg(model_dir, tmp_path / "a", **OFF), ckpt, "text")
    assert not {"calibrate", "compensate", "anchor"} & set(legacy)
    ids = {json.dumps(job_identity(_cfg(model_dir, tmp_path / "a", **{**OFF, **kw}), ckpt, "text"), sort_keys=True)
           for kw in ({}, {"calibrate": "sequential"}, {"compensate": True}, {"anchor": 0.1}, {"anchor": 0.2})}
    assert len(ids) == 5
    # The default is compensated, where it can be; with cholesky or original propagation it is off.
    default = job_identity(_cfg(model_dir, tmp_path / "a"), ckpt, "text")
    assert (default["calibrate"], default["compensate"], default["anchor"]) == ("sequential", True, 0.1)
    for kw in ({"method": "cholesky"}, {"propagate": "original"}):
        assert not {"calibrate", "compensate", "anchor"} & set(job_identity(_cfg(model_dir, tmp_path / "a", **kw), ckpt, "text"))
    out = tmp_path / "job"
    _interrupt_after(0, _cfg(model_dir, out, **COMPENSATED))
    with pytest.raises(streamsvd.errors.StreamSVDError):
        run_job(_cfg(model_dir, out, calibrate="sequential", compensate=True, anchor=0.2))


@pytest.mark.parametrize("flags, message", [
    (["--anchor", "-1"], "--anchor -1.0 is out of range"),
    (["--compensate", "--method", "cholesky"], "need --method eig"),
    (["--compensate", "--propagate", "original"], "need the compressed model's activations"),
    (["--no-compensate", "--calibrate", "sequential", "--propagate", "original"],
     "error: --calibrate sequential needs the compressed model's activations"),
    (["--no-compensate", "--calibrate", "sequential", "--propagate", "original"],
     "fix: drop --propagate original, or add --calibrate block\n"),
    (["--no-compensate", "--anchor", "0", "--method", "svd", "--shrink", "0.3", "--svd", "exact"],
     "--shrink 0.3, --svd exact with --method svd does nothing"),
    (["--no-compensate", "--anchor", "0", "--method", "cholesky", "--precision", "float32"],
     "--precision float32 with --method cholesky does nothing"),
    (["--calibrate", "sideways"], "invalid choice"),
])
def test_bad_settings_are_one_error_line(model_dir, tmp_path, capsys, flags, message):
    code = None
    try:
        code = main(["run", str(model_dir), str(tmp_path / "out"), "--no-progress", *flags])
    except SystemExit as e:  # argparse's own refusal
        code = e.code
    err = capsys.readouterr().err
    assert code != 0 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_the_work_files_hold_both_streams_and_the_disk_check_counts_them(model_dir, tmp_path):
    from streamsvd.job.pipeline import CompressionJob

    one = CompressionJob(_cfg(model_dir, tmp_path / "one", **OFF))
    two = CompressionJob(_cfg(model_dir, tmp_path / "two", compensate=True))
    assert two._activation_nbytes() == 2 * one._activation_nbytes()
    stash = two.plan.disk["original inputs"]  # one block's original inputs to the later groups (stages.OriginalInputs)
    assert stash > 0 and "original inputs" not in one.plan.disk
    replayed = two.plan.disk["replayed inputs"]  # one block's saved inputs of o_proj and down_proj (stages.Replay)
    assert replayed > 0 and "replayed inputs" not in one.plan.disk
    assert two._disk_needs()[two.work] == 2 * one._disk_needs()[one.work] + stash + replayed
    assert two.plan.disk["work files"] == 2 * one.plan.disk["work files"]
    # The original block and the cross statistics, net of the process baseline: the overall peak may sit in a
    # stage compensation does not touch (the embedding), and the baseline is measured anew by each plan.
    for stage in ("statistics", "factorize"):
        net = [sum(v for k, v in p.components[stage].items() if k != "baseline") for p in (one.plan, two.plan)]
        assert net[1] > net[0], stage
    assert "original block" in two.plan.components["statistics"] and "original block" not in one.plan.components["statistics"]


def test_sequential_groups_follow_the_forward(model_dir):
    from streamsvd.job.stages import forward_groups

    layer, hidden, forward = first_layer(model_dir)
    groups = forward_groups(layer, hidden, forward)
    assert groups == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                      ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    assert sorted(n for g in groups for n in g) == sorted(linear_modules(layer))


REFINED = dict(calibrate="sequential", compensate=True, anchor=0.1, refine_steps=12, refine_lr=1e-4)


@pytest.fixture
def periodic_text(tmp_path):
    """Calibration text whose held-out windows look like its training windows (a random tiny model
    has nothing else that generalises, so on ordinary text its fit only over-fits)."""
    path = tmp_path / "periodic.txt"
    path.write_text("the cat sat on the mat and looked at the dog. " * 400)
    return str(path)


def test_refinement_is_deterministic_across_an_interruption_and_reported(model_dir, tmp_path, periodic_text):
    refined = {**REFINED, "calib": [periodic_text]}
    straight = run_job(_cfg(model_dir, tmp_path / "straight", **refined))
    figures = straight["this_run"]["refinement"]
    assert set(figures) == {"0", "1", "2", "3"}
    for f in figures.values():
        assert 1 <= f["steps"] <= 12 and 0 <= f["best_step"] <= f["steps"]
        assert f["heldout_after"] <= f["heldout_before"] * (1 + 1e-6)  # never worse on the held-out windows
    assert any(f["best_step"] > 0 and f["heldout_after"] < f["heldout_before"] for f in figures.values())
    out = tmp_path / "interrupted"
    _interrupt_after(1, _cfg(model_dir, out, **refined))
    run_job(_cfg(model_dir, out, **refined))
    assert _files(out) == _files(tmp_path / "straight")
    unrefined = tmp_path / "unrefined"
    run_job(_cfg(model_dir, unrefined, calibrate="sequential", compensate=True, anchor=0.1, calib=[periodic_text]))
    assert _files(unrefined) != _files(tmp_path / "straight")


def test_refinement_without_compensation_targets_the_original_block(model_dir, tmp_path):
    report = run_job(_cfg(model_dir, tmp_path / "out", refine_steps=8, refine_lr=1e-3, **OFF))
    assert set(report["this_run"]["refinement"]) == {"0", "1", "2", "3"}
    model = streamsvd.load(tmp_path / "out")
    ids = torch.randint(0, 384, (1, 12))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_a_fit_that_does_not_help_the_held_out_windows_changes_nothing(model_dir, tmp_path):
    """On ordinary text a random tiny model's fit only over-fits (measured: the held-out error rises from the
    first step); early stopping then keeps the factors it started from, byte for byte."""
    plain = tmp_path / "plain"
    run_job(_cfg(model_dir, plain, calibrate="sequential", compensate=True, anchor=0.1))
    wrecked = run_job(_cfg(model_dir, tmp_path / "wrecked", calibrate="sequential", compensate=True, anchor=0.1,
                           refine_steps=10, refine_lr=1e-3))
    assert all(f["best_step"] == 0 for f in wrecked["this_run"]["refinement"].values())
    a, b = _tensors(plain, "model.layers."), _tensors(tmp_path / "wrecked", "model.layers.")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_original_block_runs_once_per_block_and_its_stash_is_what_the_plan_counts(model_dir, tmp_path, monkeypatch):
    """Compensating group by group, the original block runs in one pass per block (not in every group's), its
    inputs to the later groups go to disk in exactly the bytes the plan counts, and nothing of it is left."""
    from streamsvd.job import pipeline, stages

    job = pipeline.CompressionJob(_cfg(model_dir, tmp_path / "out", **COMPENSATED))
    planned = job.plan.disk["original inputs"]
    stashed, passes, widths = [], [], []
    remove, collect = stages.OriginalInputs.remove, pipeline.collect_group_statistics

    def recording_remove(self):
        stashed.append(sum(f.path.stat().st_size for f in self.files.values()))
        widths.append({name.rsplit(".", 1)[-1]: f.shape[-1] for name, f in self.files.items()})
        remove(self)

    def recording_collect(*args, **kwargs):
        passes.append(kwargs["original"] is not None)
        return collect(*args, **kwargs)

    monkeypatch.setattr(stages.OriginalInputs, "remove", recording_remove)
    monkeypatch.setattr(pipeline, "collect_group_statistics", recording_collect)
    job.run()
    n_layers = job.config.num_hidden_layers
    assert len(passes) == 4 * n_layers  # q/k/v, o, gate/up, down
    assert sum(passes) == n_layers and all(passes[::4])  # the original block in each block's first pass only
    assert stashed == [planned] * n_layers
    # o and gate/up pair their inputs (C); down_proj, alone with out < in, its outputs W x (W C), hidden wide
    hidden, inter = job.config.hidden_size, job.config.intermediate_size
    assert widths == [{"o_proj": hidden, "gate_proj": hidden, "down_proj": hidden}] * n_layers and inter > hidden
    assert not list((tmp_path / "out").rglob(stages.OriginalInputs.PREFIX + "*"))
