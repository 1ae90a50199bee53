"""The measured peak is the job's own, whoever started it."""

import subprocess
import sys

import torch

from streamsvd.job.peak import high_water_bytes


def test_a_child_of_a_large_process_reports_its_own_peak():
    # Linux keeps getrusage's ru_maxrss across exec: a run started from a big test runner or notebook
    # would report its parent's peak. high_water_bytes reads the kernel's figure for this program only.
    ballast = torch.ones(1536 << 20, dtype=torch.uint8)  # 1.5 GiB, touched
    assert high_water_bytes() >= ballast.numel()
    out = subprocess.run([sys.executable, "-c", "from streamsvd.job.peak import high_water_bytes; print(high_water_bytes())"],
                         capture_output=True, text=True, check=True)
    child = int(out.stdout)
    assert 0 < child < 1 << 30
    del ballast
