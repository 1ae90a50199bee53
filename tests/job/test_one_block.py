"""One block in memory at a time: when a pass loads block i, no block loaded for an earlier turn is still alive.

Checked by weak reference on each loaded block's first linear (after a garbage collection), for the profile's passes,
a job's blocks, and a resumed job rebuilding its lost activation files. Found twice: the profile's statistics pass kept
the previous block's linears in a local until the next one had loaded, and the rebuild kept the previous block's
original until the next block had loaded (two and three blocks at once, on the host and on a GPU, where the plan
counts one). The compensated job loads each block twice on purpose (the compressed stream's, and the original beside
it); those two die together before the next block.
"""

import gc
import shutil
import weakref

import pytest
from torch import nn

from streamsvd.job import pipeline, profile
from streamsvd.job.pipeline import JobConfig, run_job
from streamsvd.job.profile import ProfileConfig, make_profile
from tiny_models import make_tiny_checkpoint


def _watch(monkeypatch, cls, method: str) -> tuple[list, list]:
    """Every block `cls.method` loads, and each (earlier block, block being loaded) where the earlier one was alive."""
    real, loaded, outlived = getattr(cls, method), [], []

    def load(owner, index, *rest):  # a method (self, index) or stored_layer (model, index, checkpoint, dtype)
        gc.collect()
        outlived.extend((i, index) for i, ref in loaded if ref() is not None and i != index)
        layer = real(owner, index, *rest)
        loaded.append((index, weakref.ref(next(m for m in layer.modules() if isinstance(m, nn.Linear)))))
        return layer

    monkeypatch.setattr(cls, method, load)
    return loaded, outlived


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_checkpoint("llama", tmp_path_factory.mktemp("one-block") / "model")


def _job(model, out, **kw):
    return JobConfig(model_dir=model, out_dir=out, calib_samples=4, seqlen=32, progress=False, plots=False, alloc="uniform",
                     **kw)


def test_the_profiles_passes_hold_one_block(model, tmp_path, monkeypatch):
    loaded, outlived = _watch(monkeypatch, profile.Profiler, "_layer")
    make_profile(ProfileConfig(model, tmp_path / "p", calib_samples=6, seqlen=48, sensitivity_samples=4, progress=False))
    assert len({i for i, _ in loaded}) >= 2 and not outlived, outlived


@pytest.mark.parametrize("settings", [{}, {"refine_steps": 2},
                                      {"compensate": False, "calibrate": "block", "anchor": 0.0, "refine_steps": 2}],
                         ids=["default", "refine", "refine uncompensated (its original block for the target)"])
def test_a_job_holds_one_block_and_its_original(model, tmp_path, monkeypatch, settings):
    loaded, outlived = _watch(monkeypatch, pipeline.CompressionJob, "_load_layer")
    run_job(_job(model, tmp_path / "out", **settings))
    assert len({i for i, _ in loaded}) >= 2 and not outlived, outlived


def test_a_streamed_eval_holds_one_block(model, monkeypatch):
    from streamsvd.io.calibration import default_text
    from streamsvd.job import stream_eval

    loaded, outlived = _watch(monkeypatch, stream_eval, "stored_layer")
    stream_eval.streaming_perplexity(model, default_text()[:20_000], 32, max_windows=3, progress=False)
    assert len({i for i, _ in loaded}) >= 2 and not outlived, outlived


def test_a_resumed_job_rebuilding_its_activations_holds_one_block(model, tmp_path, monkeypatch):
    class Stop(Exception):
        pass

    def stop(index):
        if index == 1:
            raise Stop

    out = tmp_path / "out"
    with pytest.raises(Stop):
        run_job(_job(model, out), on_block_done=stop)
    shutil.rmtree(out / ".streamsvd-work")  # the activation files are lost: the finished blocks run again
    loaded, outlived = _watch(monkeypatch, pipeline.CompressionJob, "_load_layer")
    run_job(_job(model, out))
    assert [i for i, _ in loaded][:4] == [0, 0, 1, 1]  # the rebuild: each finished block and its original
    assert not outlived, outlived
