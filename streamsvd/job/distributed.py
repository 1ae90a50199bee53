"""One `run` over several processes with torch.distributed (`torchrun --nproc-per-node N -m streamsvd run ...`).

Without torchrun's environment (RANK and WORLD_SIZE), or with one process, `World` is the single
process and every method below returns at once: the one-process job is unchanged.

Under torchrun (gloo: the job computes on the CPU):

- Windows: the job's batches (the planner's batch size, the same on every rank) are split into N
  contiguous runs, rank r taking the r-th; each rank embeds, streams and propagates only its own
  windows, in activation files of its own (WORK/rank-R-of-N), so memory and disk split too. The
  batches are exactly the one-process job's batches.
- Statistics: after each pass, every accumulated sum (input Grams, output Grams and their input
  diagonals, the cross-statistics of compensation) is reduced in rank order, in float64:
  total = ((p_0 + p_1) + p_2) + ..., rank r's partial broadcast by rank r in turn, so every rank
  holds bit-identical totals. Token counts are integers; the output energies of compensation are
  kept per batch and summed in the global batch order, exactly as the one process sums them.
- Factorisations: the linears of a factor call are dealt round-robin to the ranks; the owner
  factors (from the identical totals, with the same code, so the same bytes rank 0 alone would
  make) and broadcasts the factors; every rank then swaps in the same modules.
- Writing: rank 0 alone writes OUT_DIR (shards, state, report; `ReadOnlyOutput` on the others)
  and takes the OUT_DIR lock; the others adopt rank 0's state at start.
- A lost rank: every collective has COLLECTIVE_TIMEOUT_S; a collective that fails (a dead peer's
  connection closes at once; a frozen peer times out) ends the job with one `error:` line, from the
  lowest surviving rank, naming the lost rank(s).

docs/DESIGN.md, "Distributed runs", has the byte-identity argument.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import signal
import socket
import time
from pathlib import Path

import torch

from ..errors import RERUN, StreamSVDError
from ..timing import charged
from .launcher import env_world  # torch-free, so cli.main asks it without importing torch

# The longest any rank waits in one collective before the job ends with an error naming the ranks it
# lost (a rank that died closes its connections and is noticed at once; this bounds a frozen one).
COLLECTIVE_TIMEOUT_S = 60
_ENV_TIMEOUT = "STREAMSVD_COLLECTIVE_TIMEOUT_S"  # tests shorten it; never longer than the default


def collective_timeout_s() -> float:
    try:
        value = float(os.environ.get(_ENV_TIMEOUT, COLLECTIVE_TIMEOUT_S))
    except ValueError:
        value = COLLECTIVE_TIMEOUT_S
    return min(max(value, 1.0), COLLECTIVE_TIMEOUT_S)


class RankLost(StreamSVDError):
    """A collective failed: a rank died or stopped answering."""


class World:
    """This process's place in the job: rank, size, and the job's few collectives."""

    _current: "World | None" = None

    def __init__(self, rank: int = 0, size: int = 1):
        self.rank, self.size = rank, size
        self._peers: list[tuple[str, int]] = []
        self.block: int | None = None  # what the job was doing, for the lost-rank message: the block,
        self.stage = "start"  # and the stage (the plan's stage names, set by CompressionJob._stage)
        self.rerun_fix = RERUN["run"]  # what a rerun does, for that message (errors.RERUN: an eval starts over)
        self.ending = False  # an error was decided: a SIGTERM from torchrun now only hurries the exit along
        self._dealt = 0  # linears dealt so far (`spread`): the next call starts at the next rank
        self._gathers = 0  # gathers so far: every rank must be at the same one (`_gather` checks)
        # what the collectives cost this process (the run log's `per_process`, tools/bench_distributed.py): tensor
        # bytes this rank contributed to statistics reductions, and pickled factor bytes it sent to the others
        self.traffic = {"reduced_bytes": 0, "reductions": 0, "factor_bytes_sent": 0, "gradient_bytes_sent": 0}

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def writes(self) -> bool:
        """Whether this process writes OUT_DIR (rank 0, or the one process)."""
        return self.rank == 0

    @classmethod
    def current(cls) -> "World":
        if cls._current is None:
            cls._current = World()
        return cls._current

    @classmethod
    def start(cls) -> "World":
        """The world torchrun's environment describes (the single process without it); joins the process group."""
        rank, size = env_world()
        world = World(rank, size)
        if world.active:
            import torch.distributed as dist

            if not dist.is_initialized():
                try:
                    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=collective_timeout_s()))
                except (RuntimeError, ValueError) as exc:
                    raise StreamSVDError(f"rank {rank} of {size} could not join the job's torch.distributed process group "
                                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
                                         "start the job with torchrun (it sets MASTER_ADDR, MASTER_PORT, RANK and "
                                         "WORLD_SIZE), e.g. torchrun --nproc-per-node 2 -m streamsvd run ...; if it was, "
                                         "its launcher or another node is gone: start the same command again") from None
            world._peers = world._gather((socket.gethostname(), os.getpid()), "start")
            signal.signal(signal.SIGTERM, world._terminated)
        from ..math.gram import keep_diag_terms
        from .state import set_writer

        set_writer(world.writes)
        keep_diag_terms(world.active)
        cls._current = world
        return world

    def stop(self) -> None:
        if self.active:
            import torch.distributed as dist

            if dist.is_initialized():
                try:
                    dist.destroy_process_group()
                except Exception:  # noqa: BLE001 - a group whose peer is gone may not close cleanly
                    pass

    # ---------------------------------------------------------------- failures
    def _lost(self) -> list[int]:
        """Ranks on this host whose process is gone (or a zombie); empty when none can be named."""
        here = socket.gethostname()
        lost = []
        for r, (host, pid) in enumerate(self._peers):
            if r == self.rank or host != here:
                continue
            try:
                with open(f"/proc/{pid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
                if state in ("Z", "X", "T", "t"):
                    lost.append(r)
            except (OSError, IndexError):
                lost.append(r)
        return lost

    def _lost_after(self, wait_s: float = 3.0) -> list[int]:
        """`_lost()`, polled for up to `wait_s`: a killed peer's sockets close (and our collective fails) a moment
        before the kernel marks the process a zombie, so a first look can still see it running."""
        deadline = time.monotonic() + wait_s
        while True:
            lost = self._lost()
            if lost or time.monotonic() >= deadline:
                return lost
            time.sleep(0.05)

    def _failed(self, exc: BaseException) -> RankLost:
        lost = self._lost_after()
        if lost:
            who = ", ".join(str(r) for r in lost)
            what = f"rank {who} of {self.size} was lost (killed, crashed or stopped)"
        else:
            detail = (str(exc).strip().splitlines() or [""])[0][:200]
            what = (f"a rank of {self.size} (not one on this host) stopped answering, within the {collective_timeout_s():.0f} s "
                    f"collective timeout ({type(exc).__name__}: {detail})")
        where = self.stage if self.block is None else f"block {self.block} ({self.stage})"
        err = RankLost(f"{what} during {where}; the job stopped", self.rerun_fix)
        printer = min((r for r in range(self.size) if r not in lost), default=0)
        err.quiet = printer != self.rank
        self.ending = True
        return err

    def _terminated(self, signum, frame):
        """torchrun stops the other ranks with SIGTERM when one fails: end with the lost-rank error, or as interrupted."""
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        if self.ending:  # this rank is already on its way out with its error (said once, by one rank)
            return
        if self._lost():
            raise self._failed(InterruptedError("SIGTERM from the launcher"))
        raise KeyboardInterrupt

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as exc:  # torch.distributed's errors (DistBackendError, timeouts) are RuntimeErrors
            raise self._failed(exc) from None

    # ---------------------------------------------------------------- collectives
    def _gather(self, value, what: str) -> list:
        """Every rank's `value`, in rank order; refuses ranks that are not at the same gather, the `what`-th one
        (a bug, never a silently mixed result)."""
        import torch.distributed as dist

        self._gathers += 1
        out = [None] * self.size
        self._call(dist.all_gather_object, out, ((self._gathers, what), self.stage, value))
        if len({step for step, _, _ in out}) > 1:
            self.ending = True
            err = StreamSVDError("the processes fell out of step (" + ", ".join(
                f"rank {r} at gather {n} ({w}) in {stage}" for r, ((n, w), stage, _) in enumerate(out)) + "); the job stopped",
                "this is a bug in streamsvd: please report it; the same command resumes from the finished blocks")
            err.quiet = self.rank != 0
            raise err
        return [v for _, _, v in out]

    def from_rank0(self, value):
        """Rank 0's `value` on every rank."""
        if not self.active:
            return value
        import torch.distributed as dist

        box = [value if self.rank == 0 else None]
        self._call(dist.broadcast_object_list, box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            self._call(dist.barrier)

    def agree(self, fn=None):
        """Run `fn` (None: nothing) on every rank; if it raised a StreamSVDError anywhere, every rank raises the
        lowest rank's, printed once (by rank 0)."""
        result, error = None, None
        try:
            result = fn() if fn is not None else None
        except RankLost:
            raise
        except StreamSVDError as exc:
            if not self.active:
                raise
            error = (type(exc).__name__, exc.problem, exc.fix)
        if not self.active:
            return result
        errors = [e for e in self._gather(error, "agree") if e is not None]
        if errors:
            _, problem, fix = errors[0]
            err = StreamSVDError(problem, fix)
            err.quiet = self.rank != 0
            self.ending = True
            raise err
        return result

    def on_rank0(self, fn):
        """`fn` on rank 0 alone (the writer); its result (or its StreamSVDError) on every rank."""
        if not self.active:
            return fn()
        return self.from_rank0(self.agree(fn if self.writes else None))

    def all_true(self, flag: bool) -> bool:
        return all(self._gather(bool(flag), "all_true")) if self.active else bool(flag)

    def min_int(self, value: int) -> int:
        return min(self._gather(int(value), "min_int")) if self.active else int(value)

    def agreed_batch(self, fixed: int | None, propose) -> int | None:
        """The batch every process streams: `fixed` when given (--batch-size, a resumed job's); under torchrun
        otherwise the smallest of the processes' `propose()` (each one's plan for its share of the windows, so
        that every process has batches and stays in its budget); None for one process (its plan decides)."""
        if fixed is not None or not self.active:
            return fixed
        return self.min_int(propose())

    def combined_digest(self, local: str) -> str:
        """One digest for the ranks' activation files (each rank's own file's digest, in rank order)."""
        if not self.active:
            return local
        parts = self._gather(local, "digest")
        return hashlib.sha256(("\n".join([f"{self.size} ranks"] + parts)).encode()).hexdigest()

    # ---------------------------------------------------------------- windows
    def shares(self, samples: int, batch: int) -> list[tuple[int, int]]:
        return [World(r, self.size).share(samples, batch) for r in range(self.size)]

    def share(self, samples: int, batch: int, allow_empty: bool = False) -> tuple[int, int]:
        """Rank r's windows [lo, hi): the r-th of N contiguous runs of the job's batches. `allow_empty`: a rank
        may get none (the held-out windows of --max-ppl-increase, fewer batches than processes)."""
        batches = -(-samples // batch)
        if batches < self.size and not allow_empty:
            raise StreamSVDError(
                f"{samples} calibration windows in batches of {batch} make {batches} batch(es), fewer than the "
                f"{self.size} processes", f"give at least {self.size * batch} windows (--calib-samples), or start fewer processes")
        first, last = batches * self.rank // self.size, batches * (self.rank + 1) // self.size
        return first * batch, min(samples, last * batch)

    # ---------------------------------------------------------------- statistics
    def _ordered_sum(self, local: torch.Tensor) -> torch.Tensor:
        """sum over ranks of `local`, added in rank order: ((p_0 + p_1) + p_2) + ..., identical bits on every rank."""
        import torch.distributed as dist

        self.traffic["reduced_bytes"] += local.numel() * local.element_size()
        total = None
        for src in range(self.size):
            buf = local if src == self.rank else torch.empty_like(local)
            self._call(dist.broadcast, buf, src)
            if total is None:
                total = buf.clone() if buf is local else buf
            else:
                total += buf
        return total

    def sum_in_rank_order(self, local: torch.Tensor) -> torch.Tensor:
        """The ranks' `local` tensors added in rank order (identical bits on every rank); `local` itself for one
        process. A tensor each rank fills only in its own rows (zeros elsewhere) comes back whole, exactly."""
        return self._ordered_sum(local) if self.active else local

    def reduce_statistics(self, stats) -> None:
        """Replace every partial sum in `stats` (a GramCollector or GroupStatistics, or anything with `grams`,
        `output_grams` or `cross` dicts of accumulators) by the job's total, in place.

        A rank may have seen no tokens for an accumulator (the profile's weighted Grams cover only the
        sensitivity windows): its partial is zeros. Partials kept as an upper triangle (GramAccumulator) are
        mirrored before the sum when any rank's is, so the total is whole on every rank (the same bits as
        mirroring the total)."""
        if not self.active:
            return
        with charged("reduce"):  # its wall time, waiting for the slowest rank included
            self._reduce_statistics(stats)
        self.traffic["reductions"] += 1

    def _reduce_statistics(self, stats) -> None:
        parts = []
        for kind in ("grams", "output_grams", "cross"):
            for name, acc in sorted(getattr(stats, kind, {}).items()):
                parts.append((kind, name, acc))
        layout = [(kind, name, tuple(acc.sum.shape)) for kind, name, acc in parts]
        meta = self._gather({"layout": layout, "tokens": [acc.tokens for _, _, acc in parts],
                             "upper": [getattr(acc, "_upper_only", False) for _, _, acc in parts],
                             "eps": [getattr(acc, "product_eps", 0.0) for _, _, acc in parts],
                             "energies": getattr(stats, "energy_terms", {}),
                             "diag_terms": [getattr(acc, "diag_terms", None) for _, _, acc in parts]}, "statistics")
        if any(m["layout"] != layout for m in meta):
            raise RuntimeError("the ranks collected different statistics (a bug: they run the same hooks)")
        for i, (kind, name, acc) in enumerate(parts):
            if any(m["upper"][i] for m in meta):
                acc._symmetric_sum()  # mirrors this rank's upper triangle (a zero partial stays zero)
            acc.sum = self._ordered_sum(acc.sum.to("cpu")).to(acc.sum.device)  # gloo adds host tensors (run --device)
            acc.tokens = sum(m["tokens"][i] for m in meta)
            if hasattr(acc, "product_eps"):
                acc.product_eps = max(m["eps"][i] for m in meta)
            if hasattr(acc, "input_diag_sum"):  # the chunks' terms, in the global order, as one process adds them
                acc.diag_terms = [t for m in meta for t in m["diag_terms"][i]]
                acc.input_diag_sum = torch.zeros_like(acc.input_diag_sum)
                for term in acc.diag_terms:
                    acc.input_diag_sum += term.to(acc.input_diag_sum.device)
        if hasattr(stats, "energy_terms"):
            from .stages import energy_means

            terms = {n: [x for m in meta for x in m["energies"][n]] for n in stats.energy_terms}
            tokens = next((acc.tokens for kind, _, acc in parts if kind != "cross"), 0)
            stats.energy_terms = terms
            stats.e0 = energy_means(terms, tokens)

    # ---------------------------------------------------------------- factorisations
    def spread(self, names: list[str], solve) -> dict | None:
        """`solve(name)` for every name, dealt round-robin to the ranks, every result broadcast by its owner.
        None on a single process (the caller solves as it goes).

        The deal goes on from call to call (sequential calibration factors one or a few linears per call), so
        the ranks take turns. Whichever rank solves a linear makes the same bytes: same totals, same code."""
        if not self.active:
            return None
        import torch.distributed as dist

        owner = {name: (self._dealt + i) % self.size for i, name in enumerate(names)}
        self._dealt += len(names)
        mine = {name: solve(name) for name in names if owner[name] == self.rank}
        out = {}
        with charged("share factors"):  # waiting for the owners' factorisations included
            for name in names:
                box = [mine.get(name)]
                self._call(dist.broadcast_object_list, box, src=owner[name])
                out[name] = box[0]
                if owner[name] == self.rank:
                    self.traffic["factor_bytes_sent"] += _payload_bytes(box[0])
        return out

    def from_rank(self, src: int, tensors: list[torch.Tensor]) -> None:
        """Overwrite `tensors` (same shapes and dtype on every rank) with rank `src`'s, in place, as one flat
        broadcast; nothing on one process. (Refinement's gradients: the traffic counts them as gradient bytes.)"""
        if not self.active or not tensors:
            return
        import torch.distributed as dist

        dtype = tensors[0].dtype
        if any(t.dtype != dtype for t in tensors):
            raise ValueError("from_rank: the tensors must share one dtype")
        if self.rank == src:
            flat = torch.cat([t.detach().reshape(-1) for t in tensors])
            self.traffic["gradient_bytes_sent"] += flat.numel() * flat.element_size()
        else:
            flat = torch.empty(sum(t.numel() for t in tensors), dtype=dtype)
        self._call(dist.broadcast, flat, src)
        if self.rank != src:
            at = 0
            for t in tensors:
                t.copy_(flat[at:at + t.numel()].view_as(t))
                at += t.numel()

    def gather(self, value, what: str) -> list:
        """Every rank's `value` (picklable), in rank order, on every rank; [value] for one process."""
        return self._gather(value, what) if self.active else [value]

    # ---------------------------------------------------------------- OUT_DIR
    def work_folder(self, base: Path) -> Path:
        return base / f"rank-{self.rank}-of-{self.size}" if self.active else base


def _payload_bytes(value, depth: int = 0) -> int:
    """The tensor and array bytes in `value` (what a broadcast of it mostly moves), without pickling it again."""
    import numpy as np

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if depth > 4:
        return 0
    if isinstance(value, dict):
        return sum(_payload_bytes(v, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_payload_bytes(v, depth + 1) for v in value)
    if hasattr(value, "__dict__"):
        return _payload_bytes(vars(value), depth + 1)
    return 0


class ReadOnlyOutput:
    """Rank > 0's view of OUT_DIR: reads as the writer does, writes nothing (rank 0 writes)."""

    def __init__(self, writer):
        self._writer = writer

    def __getattr__(self, name):
        return getattr(self._writer, name)

    def __setattr__(self, name, value):
        if name == "_writer":
            object.__setattr__(self, name, value)
        else:
            setattr(self._writer, name, value)

    def prepare(self) -> None:
        pass

    def write_extra_shard(self) -> None:
        pass

    def write_block(self, index, tensors, spectra) -> None:
        pass

    def log_run(self, figures: dict) -> dict:
        return figures

    def finish(self, config_section, report, before_index=None, pictures=None) -> None:
        if before_index is not None:
            before_index()
