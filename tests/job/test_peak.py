"""The measured peak is the job's own, whoever started it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from streamsvd.job.peak import high_water_bytes
from tiny_models import make_tiny_checkpoint

REPO = Path(__file__).resolve().parents[2]


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


HOLE_SCRIPT = """
import json, time, torch
from streamsvd.job.peak import PeakSampler, fix_heap_thresholds, rss_bytes
assert fix_heap_thresholds()
kept = [torch.ones(1 << 20) for _ in range(40)]  # 4 MiB each, from the heap (an earlier stage's batch)
del kept[::2]  # 80 MiB of holes between live tensors
sampler = PeakSampler("forward", interval_s=0.01).start()
sampler.stage("factorize")  # trimmed: the holes are no longer resident, but glibc still serves from them
figures = {"start": rss_bytes()}
temporaries = [torch.ones(1 << 20) for _ in range(10)]  # a step's 40 MiB of temporaries, served from the holes
figures["held"] = rss_bytes()
del temporaries
time.sleep(0.2)
figures["freed"] = rss_bytes()
sampler.stop()
print(json.dumps(figures))
"""


def test_a_factorisation_steps_freed_temporaries_leave_rss_even_when_served_from_the_heaps_holes():
    # glibc serves a request from a free chunk of the heap before it maps fresh memory, whatever the mmap threshold,
    # so in the factorize stage a temporary landing in a hole an earlier (32 MiB threshold) stage left stayed resident
    # after it was freed, beside the step's next buffers: the 4096 x 1024 compensated step measured up to 129 MiB
    # against the plan's 126 (tests/tools/test_bench_compensate_memory.py). Those stages start with the holes plugged.
    out = subprocess.run([sys.executable, "-c", HOLE_SCRIPT], capture_output=True, text=True, check=True)
    f = {k: v / (1 << 20) for k, v in json.loads(out.stdout).items()}
    assert f["held"] - f["start"] > 30  # the temporaries were resident while held
    assert f["freed"] < f["start"] + 8  # and are not once freed


PLUG_SCRIPT = """
import json, torch
from streamsvd.job.peak import fix_heap_thresholds, plug_heap_holes, rss_bytes, trim_heap, unplug_heap
figures = {"unfixed": len(plug_heap_holes())}  # glibc's own thresholds: ends, whatever it finds
assert fix_heap_thresholds()
kept = [torch.ones(1 << 20) for _ in range(40)]  # 4 MiB each, from the heap
del kept[::2]  # 80 MiB of holes
assert trim_heap()
before = rss_bytes()
plugs = plug_heap_holes()
figures["plugs"] = len(plugs)
figures["plug_rss"] = rss_bytes() - before
unplug_heap(plugs)
figures["unplugged"] = len(plugs)
print(json.dumps(figures))
"""


def test_the_heaps_holes_are_plugged_without_making_them_resident():
    out = subprocess.run([sys.executable, "-c", PLUG_SCRIPT], capture_output=True, text=True, check=True, timeout=60)
    f = json.loads(out.stdout)
    assert 20 <= f["plugs"] <= 200  # twenty 4 MiB holes (joined where adjacent), a few plugs each
    # only the chunk headers' pages (a few hundred KiB; 2.2 MiB once in CI, a transparent huge page under a header
    # perhaps): far below the 80 MiB the holes would make resident
    assert f["plug_rss"] < 8 << 20
    assert f["unplugged"] == 0  # unplug_heap empties the list it freed


EARLIER_PEAK_SCRIPT = """
import sys, torch
import streamsvd.job.peak as peak
from streamsvd.cli import main
if sys.argv[1] == "no-reset":
    peak.reset_high_water = lambda: False  # a kernel without /proc/self/clear_refs
ballast = torch.ones(1536 << 20, dtype=torch.uint8)  # 1.5 GiB, touched: what the process held before the job
del ballast
sys.exit(main(sys.argv[2:]))
"""


def test_a_job_started_in_a_process_that_held_more_before_reports_its_own_peak(tmp_path):
    # The quickstart dequantises the GGUF in its own process before `run`: the job reported that earlier 1.2 GiB
    # (the kernel's high-water mark) as its peak, against stages that each peaked under 0.9 GiB.
    model = make_tiny_checkpoint("llama", tmp_path / "model")
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 400)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", EARLIER_PEAK_SCRIPT, "reset", "run", str(model), str(out), "--calib",
                           str(text), "--calib-samples", "4", "--seqlen", "32", "--no-progress", "--no-plots",
                           "--alloc", "uniform", "--max-mem", "4G"], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    run = json.loads((out / "streamsvd_runs.jsonl").read_text().splitlines()[-1])
    assert run["peak_rss_bytes"] < 1 << 30, run  # the ballast alone was 1.5 GiB
    assert run["peak_rss_bytes"] >= max(run["peak_rss_by_stage"].values())


def test_where_the_mark_cannot_be_reset_a_mark_that_did_not_rise_is_not_the_jobs(monkeypatch):
    import streamsvd.job.peak as peak

    marks = iter([2 << 30, 2 << 30, 3 << 30])  # at the start, then at two ends
    monkeypatch.setattr(peak, "reset_high_water", lambda: False)
    monkeypatch.setattr(peak, "high_water_bytes", lambda: next(marks))
    high = peak.JobHighWater()
    assert high.peak(500 << 20) == 500 << 20  # the earlier 2 GiB is not the job's: the sampler's peak
    assert high.peak(500 << 20) == 3 << 30  # it rose during the job: the kernel's figure
