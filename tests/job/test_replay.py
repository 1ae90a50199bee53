"""Group by group, the finished attention and MLP are replayed from their last linear's saved inputs (stages.Replay)."""

from __future__ import annotations

import pytest
import torch

from streamsvd.io.output import RUN_LOG
from streamsvd.job import pipeline, stages
from streamsvd.job.pipeline import JobConfig, run_job
from streamsvd.job.state import STATE_NAME
from streamsvd.model.architecture import SUPPORTED
from tiny_models import first_layer, make_tiny_checkpoint

VOLATILE = {RUN_LOG, STATE_NAME, "profile_log.json"}
COMPENSATED = dict(calibrate="sequential", compensate=True, anchor=0.1)


def _cfg(model_dir, out, **overrides):
    return JobConfig(**{"alloc": "uniform", **dict(model_dir=model_dir, out_dir=out, ratio=0.4, calib_samples=5, seqlen=32,
                                                    progress=False, batch_size=2), **overrides})


def _files(out):
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name not in VOLATILE}


@pytest.mark.parametrize("family", sorted(SUPPORTED))
def test_every_family_replays_its_attention_and_mlp_as_their_last_linear(family, tmp_path):
    """The probe finds, in each family, the attention returning o_proj's tensor (with None beside it) and
    the MLP returning down_proj's; replaying them from those linears' inputs gives the block's bits.
    Gemma 2's eager attention also returns its weights, so it is run, not replayed."""
    layer, hidden, forward = first_layer(make_tiny_checkpoint(family, tmp_path / "m"))
    parts = stages.replayable_parts(layer, hidden, forward)
    expected = {"mlp": "mlp.down_proj", **({} if family == "gemma2" else {"self_attn": "self_attn.o_proj"})}
    assert {c: t for c, (t, _) in parts.items()} == expected
    assert parts["mlp"][1] == 0 and parts.get("self_attn", (None, 2))[1] >= 2

    expected = forward(layer, hidden)
    replay = stages.Replay(tmp_path, 1, hidden.shape[1], layer, parts)
    saves = [layer.get_submodule(t).register_forward_pre_hook(lambda m, i, t=t: replay.save(t, i[0]))
             for t, _ in parts.values()]
    forward(layer, hidden)
    for h in saves:
        h.remove()
    replay.saved.update(t for t, _ in parts.values())
    replay.done_factoring(stages.linear_modules(layer))
    calls = []
    linears = stages.linear_modules(layer)
    # a linear of each part other than its last: q_proj, qkv_proj, up_proj, ...
    firsts = {child: next(n for n in linears if n.startswith(child + ".") and n != tail) for child, (tail, _) in parts.items()}
    for child, name in firsts.items():
        linears[name].register_forward_hook(lambda *a, child=child: calls.append(child))
    replay.batch = (0, 1)
    with replay.replaying():
        replayed = forward(layer, hidden)
    assert calls == []  # neither part ran
    assert torch.equal(replayed, expected)
    forward(layer, hidden)
    assert sorted(calls) == sorted(parts)  # and they run again once the replay is over
    replay.remove()
    assert not list(tmp_path.glob(stages.Replay.PREFIX + "*"))


def test_a_part_that_does_not_return_its_linears_tensor_is_not_replayed(tmp_path):
    """A change after the last linear (here a scale on the MLP's output) rules the part out: replaying it
    would drop the change."""
    layer, hidden, forward = first_layer(make_tiny_checkpoint("llama", tmp_path / "m"))
    mlp_forward = type(layer.mlp).forward
    layer.mlp.forward = lambda x: 2 * mlp_forward(layer.mlp, x)
    assert set(stages.replayable_parts(layer, hidden, forward)) == {"self_attn"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("m") / "model", num_hidden_layers=3)


@pytest.mark.parametrize("settings", [COMPENSATED, dict(calibrate="sequential", compensate=False, anchor=0.0),
                                      dict(COMPENSATED, quant="int4", group_size=16)],
                         ids=["compensated", "sequential", "int4"])
def test_replaying_changes_no_bit_of_the_output(model_dir, tmp_path, monkeypatch, settings):
    """The job with the replay writes exactly what it writes running every part again; the saved inputs are
    the bytes the plan counts, and none is left."""
    job = pipeline.CompressionJob(_cfg(model_dir, tmp_path / "replayed", **settings))
    planned = job.plan.disk["replayed inputs"]
    removed, replays = [], []
    remove, make = stages.Replay.remove, stages.Replay._forward

    def recording_remove(self):
        removed.append(sum(f.path.stat().st_size for f in self.files.values()))
        remove(self)

    def counting(self, child):
        fn = make(self, child)
        return lambda *a, **k: (replays.append(child), fn(*a, **k))[1]

    monkeypatch.setattr(stages.Replay, "remove", recording_remove)
    monkeypatch.setattr(stages.Replay, "_forward", counting)
    job.run()
    n_layers = job.config.num_hidden_layers
    assert removed == [planned] * n_layers
    batches = 3  # 5 windows in batches of 2
    # per block: the attention in the gate/up and down passes and in propagate, the MLP in propagate
    assert replays.count("self_attn") == 3 * batches * n_layers and replays.count("mlp") == batches * n_layers
    assert not list((tmp_path / "replayed").rglob(stages.Replay.PREFIX + "*"))

    monkeypatch.setattr(pipeline, "replayable_parts", lambda *a: {})
    run_job(_cfg(model_dir, tmp_path / "rerun", **settings))
    assert _files(tmp_path / "replayed") == _files(tmp_path / "rerun")


def test_refinement_propagates_without_the_replay(model_dir, tmp_path, monkeypatch):
    """Refinement changes the factors after their inputs were saved: the propagate stage runs the block."""
    replays = []
    make = stages.Replay._forward
    monkeypatch.setattr(stages.Replay, "_forward",
                        lambda self, child: (lambda *a, **k: (replays.append(child), make(self, child)(*a, **k))[1]))
    run_job(_cfg(model_dir, tmp_path / "refined", **COMPENSATED, refine_steps=2, refine_lr=1e-4))
    assert replays and "mlp" not in replays  # the passes still replay the attention; propagate replays nothing
