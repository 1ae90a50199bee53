"""What keeps a job from ending silently wrong: locks, trusted scratch, repair, identity by content.

`JobIntegrity(job)` holds the job-level pieces that `CompressionJob` calls:

- `lock`: one job per OUT_DIR and per work directory (`job.lock`);
- `remove_own_files` (`run --restart`): only streamsvd's own files, after saying which;
- `inputs_trusted` / `activation_digest`: an activation file is trusted only when the state,
  written after the file was complete and fsynced, records its sha256 and the file still has it;
- `reopen_if_damaged`: a finished OUT_DIR whose files fail verify's check (sizes, headers, sha256) is
  reopened at the first damaged piece instead of being reported complete;
- `check_model_unchanged`: the checkpoint's tensors are hashed as the job reads them and recorded
  per block; on a resume, the finished blocks whose MODEL_DIR shards changed on disk (size, mtime
  or inode) are read and hashed again, and a difference refuses the resume.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path

from ..errors import StreamSVDError
from ..io.checkpoint import INDEX_NAME
from ..io.checksums import file_sha256, group_digest, tensor_sha256
from ..io.fsutil import fsync_dir, is_serializer_temporary, remove_temporaries
from ..io.output import REPORT_JSON, REPORT_MD, RUN_LOG, SPECTRA_DIR
from ..io.plots import ALLOCATION_PNG, SPECTRA_PNG
from ..model.architecture import layer_prefix
from ..model.remote import MODELING_FILE, modeling_source
from .lock import LOCK_NAME, JobLocked, entries_besides_lock
from .state import RESTART_FIX, STATE_NAME
from .verify import check_files

_LAYER_INDEX_KEY = "layers."


class ModelChanged(StreamSVDError):
    pass


def _say(message: str) -> None:
    print(f"streamsvd: {message}", file=sys.stderr, flush=True)


def _empty_keeping_locks(folder: Path) -> None:
    """Remove what `folder` holds but lock files, at any depth (a folder left empty goes, `folder` stays)."""
    for q in entries_besides_lock(folder):
        if q.is_dir() and not q.is_symlink():
            _empty_keeping_locks(q)
            with contextlib.suppress(OSError):
                q.rmdir()
        else:
            q.unlink(missing_ok=True)


class JobIntegrity:
    def __init__(self, job):
        self.job = job

    # ---------------------------------------------------------------- locks
    def lock(self) -> None:
        job = self.job
        out = Path(job.cfg.out_dir)
        # Folders made here and still empty when the locks go (a refusal here, or on another rank under torchrun)
        # are removed with them: a refused run leaves no new empty OUT_DIR or work folder behind.
        try:
            if job.world.writes:  # under torchrun rank 0 holds OUT_DIR for the job; each rank its own work folder
                job.locks.take(out, "OUT_DIR", make=True)
                job.locks.take_folder(out, "OUT_DIR")  # no quantize, export, eval or load reads it meanwhile
            if job.cfg.work_dir is not None or job.world.active:
                # Under torchrun also in OUT_DIR: a rank of an earlier launch whose rank 0 was killed (the launcher
                # gone, another node) went on, and removed the new launch's activation files under it by their path.
                job.locks.take(job.work, "--work-dir" if job.cfg.work_dir is not None else "OUT_DIR", make=True)
        except JobLocked:
            job.locks.release()
            raise

    def reread_state(self) -> bool:
        """Read the state again under the lock (another job may have moved it on); True if it changed."""
        fresh = self.job._open_state()
        if fresh.digest == self.job.state.digest:
            return False
        self.job.state = fresh
        return True

    # ---------------------------------------------------------------- --restart
    def own_files(self) -> list[Path]:
        """streamsvd's files in OUT_DIR (and its work folders); never anything it did not write."""
        job, out = self.job, Path(self.job.cfg.out_dir)
        found: list[Path] = []
        if not out.is_dir():
            return found
        copies = {p.name: p for p in job.out.other_files()}
        for p in sorted(out.iterdir()):
            name = p.name
            if name == LOCK_NAME:
                continue
            if p.is_file() and (
                name in (STATE_NAME, INDEX_NAME, REPORT_JSON, REPORT_MD, RUN_LOG, ALLOCATION_PNG, SPECTRA_PNG)
                or (name.startswith("model-") and "-of-" in name and name.endswith(".safetensors"))
                or (name.startswith(".") and ".tmp-" in name)
                or is_serializer_temporary(p)
                or (name == "config.json" and _has_streamsvd_section(p))
                or (name == MODELING_FILE and p.read_bytes() == modeling_source())
                or (name in copies and _same_bytes(p, copies[name]))
            ):
                found.append(p)
            elif p.is_dir() and name == SPECTRA_DIR:
                found += [q for q in sorted(p.iterdir()) if q.is_file() and (q.name.startswith("block-") or ".tmp-" in q.name
                                                                                 or is_serializer_temporary(q))]
                found.append(p)
            elif p.is_dir() and name == ".streamsvd-work":
                found.append(p)
            elif p.is_dir() and name == "profile" and job.cfg.needs_profile and job.cfg.profile is None:
                found.append(p)  # the profile `run` made for itself
        if job.cfg.work_dir is not None and job.work.is_dir():
            found.append(job.work)
        return found

    def check_restart_target(self) -> None:
        """--restart on an OUT_DIR without a state: only if everything in it is streamsvd's (nothing is overwritten)."""
        from .state_schema import is_own_debris

        out = Path(self.job.cfg.out_dir)
        if not out.is_dir() or (out / STATE_NAME).exists():
            return
        own = set(self.own_files())
        foreign = sorted(p.name for p in out.iterdir() if p not in own and not is_own_debris(p))
        if foreign:
            raise StreamSVDError(
                f"{out} holds no streamsvd job state and files streamsvd did not write ({', '.join(foreign[:5])})",
                "choose a new or empty OUT_DIR so nothing in it is overwritten",
            )

    def remove_own_files(self) -> None:
        job = self.job
        # The state goes last: a kill half-way leaves a state that still refuses, never files that look foreign.
        files = sorted(self.own_files(), key=lambda p: p.name == STATE_NAME)
        if files:
            _say("--restart removes " + ", ".join(str(p) for p in files))
        for p in files:
            if p.is_dir() and (p == job.work or p.name == ".streamsvd-work"):
                _empty_keeping_locks(p)  # the ranks' work folders' lock files, held by this job's processes
            elif p.is_dir():
                if p.name == SPECTRA_DIR:
                    with contextlib.suppress(OSError):
                        p.rmdir()  # only if nothing but streamsvd's files was in it
                else:
                    shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        fsync_dir(Path(job.cfg.out_dir))

    def reset_state(self) -> None:
        """After --restart removed the files (on rank 0 under torchrun): a fresh state and plan, on every rank."""
        job = self.job
        job.state = type(job.state)(fingerprint=job.job_fp, settings=job.settings())
        job.batch_size = job._batch_size()

    # ---------------------------------------------------------------- scratch
    def activation_digest(self, name: str) -> str:
        """The file's sha256; under torchrun, one digest of every rank's own file (job/distributed.py)."""
        return self.job.world.combined_digest(file_sha256(self.job.work / name))

    def inputs_trusted(self) -> bool:
        state, job = self.job.state, self.job
        path = job.work / state.inputs_file
        try:
            whole = path.stat().st_size == job._activation_nbytes()
        except OSError:
            whole = False
        if not job.world.active:
            return whole and file_sha256(path) == state.inputs_digest
        # every rank takes part in both collectives, whatever its own file is like
        whole = job.world.all_true(whole)
        return whole and self.activation_digest(state.inputs_file) == state.inputs_digest

    def remove_scratch(self) -> None:
        """No scratch left behind after a finished job, whichever run finished it."""
        job, out = self.job, Path(self.job.cfg.out_dir)
        shutil.rmtree(job.work, ignore_errors=True)
        if not job.world.writes:  # under torchrun OUT_DIR is rank 0's to tidy (its temporary files may be in flight)
            return
        shutil.rmtree(out / ".streamsvd-work", ignore_errors=True)
        if job.world.active and job.cfg.work_dir is not None:
            shutil.rmtree(job.work.parent, ignore_errors=True)  # the job's folder that holds the ranks' folders
        for folder in (out, out / SPECTRA_DIR):
            remove_temporaries(folder)

    # ---------------------------------------------------------------- repair
    def forget_extra(self) -> None:
        self.job.state.extra_shard_done = False
        self.job.state.weights.pop("extra", None)

    def rewind(self, block: int) -> None:
        """Back to `block` finished blocks: what the state says about later blocks goes."""
        state = self.job.state
        state.blocks_done = block
        state.inputs_file = state.inputs_digest = None
        state.modules = {n: r for n, r in state.modules.items() if _block_of(n) is not None and _block_of(n) < block}
        state.weights = {k: v for k, v in state.weights.items() if k == "extra" or int(k) < block}

    def reopen_if_damaged(self) -> list[str]:
        """A finished OUT_DIR: every recorded file checked as `streamsvd verify` checks it (sizes, headers and the
        sha256 of the contents: one read of the output, about 1 GB/s per core); if anything is damaged, reopen the
        job to redo it. Verify's fix line for a damaged file is this rerun, so it must see what verify sees (a
        changed byte inside a shard passed the cheap check, and the rerun said "already complete")."""
        job, state = self.job, self.job.state
        damaged = [name for name, _ in check_files(job.out.dir, state.files, deep=True)]
        if not damaged:
            return []
        _say(f"the finished output in {job.cfg.out_dir} is damaged ({', '.join(damaged)}); redoing what is needed")
        index = Path(job.cfg.out_dir) / INDEX_NAME
        index.unlink(missing_ok=True)  # first: an unfinished OUT_DIR never has an index
        fsync_dir(index.parent)
        names = {job.out.block_path(i).name: i for i in range(job.config.num_hidden_layers)}
        names.update({str(job.out.spectra_path(i).relative_to(job.out.dir)): i for i in range(job.config.num_hidden_layers)})
        blocks = [names[d] for d in damaged if d in names]
        if job.out.extra_path().name in damaged:
            self.forget_extra()
        if blocks:
            self.rewind(min(blocks))
        state.complete = False
        state.inputs_file = state.inputs_digest = None
        state.save(job.out.dir)
        return damaged

    # ---------------------------------------------------------------- identity
    def digest_of_reads(self) -> str:
        ckpt = self.job.ckpt
        digests, ckpt.read_digests = ckpt.read_digests or {}, None
        return group_digest(digests)

    def check_profile_matches(self, index: int | None) -> None:
        """Refuse block `index` (before it is written; None: the embeddings and head, before the state records them)
        where the weights it was read from differ from those the profile measured: the ranks would come from another
        model's spectra (a given --profile of a fine-tune with the same shapes, or MODEL_DIR changed under a resumed
        job after its first block, past the digests of the finished blocks)."""
        job = self.job
        if job.profile is None or job.ckpt.read_digests is None:
            return
        differ = job.profile.tensors_differing(job.ckpt.read_digests)
        if not differ:
            return
        own = job.cfg.profile is None
        what = "the embeddings and head" if index is None else f"block {index}'s weights"
        raise ModelChanged(
            f"{what} in MODEL_DIR {job.ckpt.dir} differ from those "
            + (f"this job profiled ({differ[0]}" if own else f"the profile in {job.cfg.profile} was made from ({differ[0]}")
            + (f" and {len(differ) - 1} more)" if len(differ) > 1 else ")"),
            ("MODEL_DIR changed since this job started: restore the original checkpoint and rerun, or "
             + RESTART_FIX.replace("run the same", "run the") + " from the new weights") if own else
            f"make the profile from this MODEL_DIR (`streamsvd profile {job.ckpt.dir} NEW_PROFILE_DIR`), or leave "
            "--profile out (the job profiles for itself)" + ("" if index is None else
            f"; either way add --restart (or give a new OUT_DIR): {job.cfg.out_dir} holds blocks made with that "
            "profile's ranks"),
        )

    def check_given_profile(self) -> None:
        """A given --profile against MODEL_DIR's embeddings and head, streamed from the checkpoint (one small buffer)
        before anything is written: another model of the same shapes was refused only after OUT_DIR held its state,
        work files and first shard, and the fix's commands then met "holds a different streamsvd job" (a probe,
        2026-12-07). The blocks are checked as each is read (check_profile_matches): a fine-tune that kept the
        embeddings is refused at its first changed block."""
        from ..io.streamcopy import stored_sha256

        job = self.job
        recorded = job.profile.meta.get("tensor_sha256") or {}
        names = [n for n in job.out.extra_names() if n in recorded]
        if not names:
            return
        job.ckpt.read_digests = {n: stored_sha256(job.ckpt, n) for n in names}
        try:
            self.check_profile_matches(None)
        finally:
            job.ckpt.read_digests = None

    def model_file_stats(self) -> dict:
        ckpt = self.job.ckpt
        stats = {}
        for shard in sorted(ckpt.headers):
            st = (ckpt.dir / shard).stat()
            stats[shard] = [st.st_size, st.st_mtime_ns, st.st_ino]
        return stats

    def check_model_unchanged(self) -> None:
        """Refuse a resume whose MODEL_DIR weights differ from those the finished blocks were made from."""
        job, state = self.job, self.job.state
        now = self.model_file_stats()
        changed = {s for s, st in now.items() if state.model_files.get(s) != st}
        # whether MODEL_DIR's files differ (size, mtime or inode) from the last run's: what the job's own profile,
        # made from every block's weights before any block is finished, cannot be checked against (pipeline.py)
        self.model_files_changed = bool(state.model_files) and bool(changed)
        if state.model_files and changed:
            for key in sorted(state.weights, key=lambda k: (k != "extra", int(k) if k.isdigit() else -1)):
                names = job.out.extra_names() if key == "extra" else [
                    k for k in job.ckpt.keys() if k.startswith(layer_prefix(job.model, int(key)))]
                if not any(job.ckpt.weight_map[n] in changed for n in names):
                    continue
                digest = group_digest({n: tensor_sha256(job.ckpt.get(n)) for n in names})
                if digest != state.weights[key]:
                    what = "the embeddings and head" if key == "extra" else f"block {key}"
                    raise ModelChanged(
                        f"the weights in MODEL_DIR {job.ckpt.dir} changed since this job started: {what} now differs "
                        f"from what the finished part of {job.cfg.out_dir} was computed from",
                        "restore the original checkpoint and rerun, or " + RESTART_FIX.replace("run the same", "run the")
                        + " from the new weights",
                    )
        state.model_files = now


def _block_of(name: str) -> int | None:
    head, sep, tail = name.partition(".layers.")
    if not sep:
        return None
    number = tail.split(".", 1)[0]
    return int(number) if number.isdigit() else None


def _has_streamsvd_section(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "streamsvd" in data


def _same_bytes(a: Path, b: Path) -> bool:
    try:
        return a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes()
    except OSError:
        return False
