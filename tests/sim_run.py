"""`python tests/sim_run.py COMMAND ARGS...`: `streamsvd COMMAND ARGS...` with its device replaced by the simulated GPU
of tests/sim_device.py, for the tests that need a process of its own (torchrun's ranks, tests/job/test_distributed.py).

Every --device (the default cpu included, as in tests/job/test_device_run.py: a cpu device plans no GPU budget, which
the simulated device has none of) resolves to the simulated device, so the blocks, the statistics and every
factorisation take --device's code path, collectives included, while computing the CPU's bits.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sim_device import SIM, SimDevice  # noqa: E402
from streamsvd.cli import main  # noqa: E402
from streamsvd.job import device, pipeline  # noqa: E402


def _resolve(name, local_rank=0):
    return SIM


if __name__ == "__main__":
    pipeline.resolve_device = device.resolve_device = _resolve
    with SimDevice():
        code = main(sys.argv[1:])
    sys.exit(code)
