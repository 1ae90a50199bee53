"""The measured peak is the job's own, whoever started it."""

import json
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


HEAP_SCRIPT = """
import json, torch
from streamsvd.job.peak import fix_heap_thresholds, rss_bytes, trim_heap
assert fix_heap_thresholds()
figures = {}
kept = [torch.ones(1 << 20) for _ in range(100)]  # 4 MiB each: under the 32 MiB threshold, from the heap
figures["full"] = rss_bytes()
del kept[::2]  # 200 MiB freed in holes between live tensors: the heap keeps the pages, ready for the next batch
figures["holes"] = rss_bytes()
again = [torch.ones(1 << 20) for _ in range(50)]  # the same sizes again: served from those holes
figures["reused"] = rss_bytes()
del again
figures["before_trim"] = rss_bytes()
assert trim_heap()
figures["trimmed"] = rss_bytes()
big = torch.ones(16 << 20)  # 64 MiB: over the threshold, a mapping of its own
figures["big"] = rss_bytes()
del big
figures["big_freed"] = rss_bytes()
print(json.dumps(figures))
"""


def test_the_heap_reuses_a_batchs_intermediates_and_a_trim_gives_them_back():
    # Why the job fixes glibc's thresholds at 32 MiB (job/peak.py): a forward batch's intermediates come back from
    # the heap instead of as fresh pages the kernel zeroes; the trim between stages keeps RSS to what is live.
    out = subprocess.run([sys.executable, "-c", HEAP_SCRIPT], capture_output=True, text=True, check=True)
    f = {k: v / (1 << 20) for k, v in json.loads(out.stdout).items()}
    assert f["holes"] > f["full"] - 20  # freed below the threshold: still resident
    assert f["reused"] < f["holes"] + 80  # and mostly reused (fresh pages would add 200 MiB)
    assert f["before_trim"] - f["trimmed"] > 150  # the trim returns the holes (200 MiB)
    assert f["big"] - f["trimmed"] > 60 and f["big_freed"] < f["trimmed"] + 8  # a large tensor leaves RSS when freed


def test_each_stage_starts_from_a_trimmed_heap(monkeypatch):
    import streamsvd.job.peak as peak

    calls, thresholds = [], []
    monkeypatch.setattr(peak, "trim_heap", lambda: calls.append(1) or True)
    monkeypatch.setattr(peak, "fix_heap_thresholds", lambda t: thresholds.append(t) or True)
    sampler = peak.PeakSampler("embed", interval_s=10)
    sampler.start()
    sampler.stage("statistics")
    sampler.stage("factorize")
    with sampler.during("write"):
        pass
    sampler.stop()
    assert len(calls) == 4  # statistics, factorize, write, and back to factorize
    # the factorisations, planned step by step, with every buffer of 1 MiB or more a mapping of its own
    assert thresholds == [32 << 20, 1 << 20, 32 << 20, 1 << 20]
    untrimmed = peak.PeakSampler("embed", interval_s=10, trim=False)
    untrimmed.start()
    untrimmed.stage("statistics")
    untrimmed.stop()
    assert len(calls) == 4 and len(thresholds) == 4
