"""The budget as a checked promise: a thread that samples this process's RSS and keeps the peak per stage.

RSS is what the OS counts (psutil: resident anonymous memory plus resident pages of mapped files,
safetensors and numpy memmaps included). The job names its stage (`sampler.stage("statistics")`)
as it goes; every sample is charged to the stage running when it was taken, and each stage change
takes a sample at once, so a short stage is not missed entirely.
"""

from __future__ import annotations

import contextlib
import functools
import ctypes
import ctypes.util
import threading
import time

import psutil

INTERVAL_S = 0.02


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def high_water_bytes() -> int:
    """This process's peak RSS as the kernel counts it since the program started.

    /proc/self/status VmHWM where there is one: getrusage's ru_maxrss is kept across exec on Linux,
    so a job started by a large process (a test runner, a notebook) would report its parent's RSS.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_high_water() -> bool:
    """Set the kernel's high-water mark (VmHWM) to the current RSS, so that it counts from here on (Linux 4.0 on:
    /proc/self/clear_refs "5"); False where it cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class JobHighWater:
    """The kernel's high-water mark for work started in this process, not before it.

    A job run inside a process that held more memory earlier (a notebook that had loaded a model, the quickstart's
    own dequantisation of the GGUF) reported that earlier peak as its own: 1.2 GiB against a job whose every stage
    peaked under 0.9 GiB. The mark is reset at the start where the kernel allows it; where it does not, a mark that
    has not risen since the start is the earlier one's, and only the sampler's figure is the job's.
    """

    def __init__(self):
        reset_high_water()
        self.at_start = high_water_bytes()

    def peak(self, sampled: int) -> int:
        """The job's peak RSS: the kernel's mark where it was set since the start, else the sampler's `sampled`."""
        mark = high_water_bytes()
        return max(mark, sampled) if mark > self.at_start else sampled


HEAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest mmap threshold on 64-bit (M_MMAP_THRESHOLD refuses more)
# Stages whose plan counts step by step what is live (a factorisation's workspace, a quantisation's): there every
# allocation of 1 MiB or more is a mapping of its own again, so RSS is what is live. With the 32 MiB heap, what a step
# frees under 32 MiB stays resident beside its later large buffers: tests/tools/test_bench_compensate_memory.py
# measured the 4096 x 1024 compensated step at 134 MiB against the plan's 126. glibc also serves a request of any size
# from a free chunk of the heap before it maps one, so these stages start with the heap's holes plugged (plug_heap_holes).
EXACT_STAGES = frozenset({"factorize", "quantize"})
EXACT_THRESHOLD_BYTES = 1 << 20


def stage_threshold(stage: str) -> int:
    """The heap thresholds for `stage`: 1 MiB in EXACT_STAGES, else 32 MiB (a forward batch's intermediates reused)."""
    return EXACT_THRESHOLD_BYTES if stage in EXACT_STAGES else HEAP_THRESHOLD_BYTES


@functools.lru_cache(maxsize=1)
def _libc():
    """glibc, opened once: by its soname first (find_library starts `ldconfig -p` as a child process, which a kill at
    that moment left running), by find_library where that name is not there."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return ctypes.CDLL(ctypes.util.find_library("c"))


def fix_heap_thresholds(threshold: int = HEAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap and trim thresholds at `threshold` bytes, so its heap behaves the same all job long.

    Allocations of `threshold` bytes or more are fresh mappings, returned to the OS when freed; smaller ones
    (a forward batch's intermediates at the CPU's batch of 2,048 tokens, the statistics' chunks) are served
    from the heap and reused, instead of the kernel zeroing new pages for each (docs/RESULTS.md, "Smaller
    batches with the heap reused": sys time 177 s -> 37 s on SmolLM2's default job). Left dynamic, glibc
    moves the mmap threshold up to 32 MiB and the trim threshold to 64 MiB after the first large frees;
    fixed, what the heap keeps of freed memory is bounded by the trim threshold at its top and by
    `trim_heap()` (called between stages) elsewhere; the stages planned step by step run with 1 MiB
    (`stage_threshold`). Returns False where it cannot be set (not glibc).
    """
    try:
        libc = _libc()
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, threshold)) and bool(libc.mallopt(m_trim_threshold, threshold))
    except (OSError, AttributeError):
        return False


def trim_heap() -> bool:
    """Give the heap's free pages back to the OS (glibc's malloc_trim(0): every arena, not only its top), so RSS
    is what is live. Cheap next to a stage (a walk of the free lists); False where there is no glibc."""
    try:
        return bool(_libc().malloc_trim(0))
    except (OSError, AttributeError):
        return False


# The largest hole plug_heap_holes tries first; it halves from there down to EXACT_THRESHOLD_BYTES.
_PLUG_FIRST_BYTES = 1 << 30
_IS_MMAPPED = 0x2  # glibc's chunk header: the size field's bit for a chunk that is a mapping of its own


def _malloc_api():
    libc = _libc()
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.restype, libc.free.argtypes = None, [ctypes.c_void_p]
    libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_ssize_t]
    libc.gnu_get_libc_version  # noqa: B018  (glibc only: AttributeError elsewhere, where nothing is plugged)
    return libc


def plug_heap_holes(max_plugs: int = 4096) -> list[int]:
    """Take the free chunks of EXACT_THRESHOLD_BYTES or more out of the main heap, untouched; `unplug_heap` them.

    glibc serves a request from a free chunk of its heap before it maps fresh memory, whatever the mmap threshold:
    after `trim_heap` the holes an earlier stage left (its freed buffers under the 32 MiB threshold) are no longer
    resident, but a step's temporary served from one makes those pages resident again and they stay so once it is
    freed, beside the step's next, larger buffers, where the plan does not count them (the 4096 x 1024 compensated
    step: up to 129 MiB against the plan's 126, tests/tools/test_bench_compensate_memory.py). With the holes held
    by plugs, every request of EXACT_THRESHOLD_BYTES or more is a mapping of its own, returned to the OS when freed.

    A plug is malloc'd and never written: only its chunk headers' pages become resident (a few KiB each). Plugs are
    taken largest first (1 GiB, halving), so a hole is a few plugs, not one per MiB. Only what lies inside the heap
    as it is now is kept: a chunk that is a mapping of its own, or that grew the heap, is freed at once (untouched)
    and the size halved, so this ends whatever the thresholds. Call it from the thread that allocates (the main
    heap is the main thread's). Returns the plugs' addresses; none where the C library is not glibc.
    """
    try:
        libc = _malloc_api()
    except (OSError, AttributeError):
        return []
    end = libc.sbrk(0) or 0  # the heap's end: nothing at or past it is a hole
    plugs, size = [], _PLUG_FIRST_BYTES
    while size >= EXACT_THRESHOLD_BYTES and len(plugs) < max_plugs:
        address = libc.malloc(size)
        if not address:
            size //= 2
            continue
        header = ctypes.c_size_t.from_address(address - ctypes.sizeof(ctypes.c_size_t)).value
        if header & _IS_MMAPPED or address + size > end:
            libc.free(address)  # no hole this large: a fresh mapping or the heap's new top, never written
            size //= 2
        else:
            plugs.append(address)
    return plugs


def unplug_heap(plugs: list[int]) -> None:
    """Give plug_heap_holes' chunks back to the heap (free, never resident: a later trim or reuse finds them so)."""
    if plugs:
        libc = _malloc_api()
        for address in plugs:
            libc.free(address)
        plugs.clear()


class PeakSampler:
    """Samples RSS every INTERVAL_S seconds in a daemon thread; `peaks` maps stage -> peak bytes and
    `seconds` stage -> wall time spent in it."""

    def __init__(self, first_stage: str = "embed", interval_s: float = INTERVAL_S, trim: bool = True):
        """`trim`: at each stage change, give the heap's free pages back and set its thresholds for the new stage
        (`stage_threshold`), so that each stage starts from what is live, as the plan counts it; in EXACT_STAGES also
        plug the heap's holes (`plug_heap_holes`), unplugged at the next stage change or `stop`."""
        self.interval_s = interval_s
        self.trim = trim
        self.peaks: dict[str, int] = {}
        self.current = first_stage
        self.seconds: dict[str, float] = {}
        self._since = time.perf_counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="streamsvd-rss", daemon=True)
        self._proc = psutil.Process()
        self._plugs: list[int] = []  # plug_heap_holes' chunks while an EXACT_STAGES stage runs

    def _sample(self) -> None:
        rss = self._proc.memory_info().rss
        with self._lock:
            if rss > self.peaks.get(self.current, 0):
                self.peaks[self.current] = rss

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def start(self) -> "PeakSampler":
        self._sample()
        self._thread.start()
        return self

    def _charge_time(self) -> None:
        now = time.perf_counter()
        self.seconds[self.current] = self.seconds.get(self.current, 0.0) + now - self._since
        self._since = now

    def stage(self, name: str) -> None:
        self._sample()  # the end of the previous stage
        if self.trim:
            unplug_heap(self._plugs)
            fix_heap_thresholds(stage_threshold(name))
            trim_heap()  # each stage starts from what is live (the plan's parts), not the last stage's freed heap
            if name in EXACT_STAGES:
                self._plugs = plug_heap_holes()  # and there its large buffers are mappings of their own (see there)
        with self._lock:
            self._charge_time()
            self.current = name
        self._sample()

    @contextlib.contextmanager
    def during(self, name: str):
        previous = self.current
        self.stage(name)
        try:
            yield
        finally:
            self.stage(previous)

    def stop(self) -> dict[str, int]:
        unplug_heap(self._plugs)
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._sample()
        with self._lock:
            self._charge_time()
        return dict(self.peaks)

    @property
    def peak(self) -> int:
        return max(self.peaks.values(), default=0)
