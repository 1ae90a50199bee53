"""`streamsvd profile`: what rank allocation reads, measured once and reused by any number of runs.

One streamed pass over the model with the original model's activations (like `run --propagate
original`, one block in memory at a time) over the first `profile_samples` calibration windows (16 by
default: as good an allocation as all of them, measured, for less time; DEFAULT_PROFILE_SAMPLES) saves,
per linear:

- the whitened spectrum: the singular values of W S with G = S S^T from the eig of the input Gram
  (or the square roots of the eigenvalues of the output Gram W G W^T for the linears `run` factors
  on their output side), exactly the spectrum `run --svd exact` writes, so the truncation loss at
  every rank is known before any block is factored (math/allocate.py);
- a sensitivity weight: the mean squared gradient of the LM loss at the linear's output, over the
  first `sensitivity_samples` windows (8 by default, DEFAULT_SENSITIVITY), and the same per token (w_t). The LM loss is
  the sum of the next-token cross-entropies (a sum, so a token's gradient does not shrink with the
  number of tokens). This runs first: those windows go through the blocks once with each block's
  inputs kept on disk; the loss and its gradient at the final hidden states come from the final norm
  and the head (read from the checkpoint); then the blocks are walked backwards, each loaded alone,
  its forward recomputed from its saved inputs with grad enabled (transformers' own layer,
  model/capture.run_layer), the gradient at every linear's output read by a tensor hook, and the
  gradient at the block's input handed to the block before. Costs about three forwards of the
  subset; its seconds are in profile_log.json.
- weighted energies (`weighted.safetensors`, math/allocate.Matrix.weighted): in the statistics pass,
  each linear also accumulates the Gram of its inputs (its outputs where out < in) over the
  sensitivity windows' tokens, each token scaled by its own w_t (`WeightedEnergies`); along the
  directions the job truncates (U from the same eig / SVD as the spectrum) diag(U^T W G_w W^T U) is,
  per direction, the loss its truncation costs with each token weighted by how much the model's
  output depends on it there. Allocation ranks by these when the profile has them.

With `heldout_samples` H > 0 (`run --max-ppl-increase`), H more windows, disjoint from the calibration
windows (io/calibration.heldout_windows), ride in rows [S, S + H) of the activation files: each block runs
them after its statistics are taken (they enter none), and after the last block the final norm and the
head give the original model's perplexity on them, stored as `heldout` in profile.json (and H in the
identity), the figure `run --max-ppl-increase` measures the compressed model against.

The profile's folder holds `spectra.safetensors` (float64, by full module name) and `profile.json`
(written last: a folder without it is not a profile; nothing in it depends on the machine's speed, so a
job that profiles for itself still ends byte-identical after an interruption) with the identity (checkpoint fingerprint,
calibration digest, samples, seqlen, seed), the token count, the shapes and the weights, the sha256 of its
safetensors files (`files_sha256`) and of every decoder-layer tensor it read (`tensor_sha256`), and its own
content's (`meta_sha256`: a hand edit of profile.json is refused). A run
with other calibration settings or another model refuses it; so does a run whose weights differ from the
recorded ones (job/integrity.check_profile_matches), and any run when its files or figures are damaged (a
sensitivity weight missing for a matrix included) or it was written by a newer streamsvd. Profiling is not resumable: a killed
profile is redone.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .. import __version__, faults
from ..errors import StreamSVDError
from ..io.activations import ActivationFile
from ..io.calibration import heldout_windows, load_texts, load_tokenizer, sample_windows, text_digest, windows_digest
from ..io.checkpoint import Checkpoint
from ..io.fsutil import atomic_path, atomic_write_json, fsync_dir, remove_temporaries, within
from ..math.allocate import Matrix
from ..math.factorize import TALL_MIN_RATIO, project, weight_gram, whiten, whitened
from ..math.gram import GramAccumulator, OutputGramAccumulator
from ..model.architecture import check_weights_match, decoder_layers, empty_model, layer_prefix, linear_modules, load_config, check_seqlen, load_layer
from ..model.capture import capture_layer_kwargs, first_layer_inputs, layer_args_on, run_layer
from ..model.embedding import materialize_base_mapped
from ..timing import charged
from .evaluate import LOGIT_CHUNK, final_states_nll, head_key
from .peak import PeakSampler
from .stages import collect_statistics, output_side_linears

COMPUTE_DTYPE = torch.float32
PROFILE_JSON = "profile.json"
PROFILE_LOG = "profile_log.json"  # wall times of the pass that made the profile (not part of its identity)
SPECTRA_FILE = "spectra.safetensors"
WEIGHTED_FILE = "weighted.safetensors"  # per direction, the token-weighted energies (Matrix.weighted)
WORK_NAME = ".profile-work"
MATCHED_KEYS = ("checkpoint", "calib_digest", "calib_samples", "seqlen", "seed")
MAX_HELDOUT = 256
# Windows of the statistics pass (the spectra), the first ones of the calibration: measured on SmolLM2 and Gemma 3 at
# 64 x 512, ratio 0.4, a profile over the first 16 windows gave the default job the held-out perplexity of one over
# all 64 (within 1.1% in the calibration's domain, +-6% across) for 28-38% less profiling time (docs/RESULTS.md, "The
# profile's windows"). The sensitivity pass's windows (DEFAULT_SENSITIVITY) are the first of these.
DEFAULT_PROFILE_SAMPLES = 16
SENSITIVITY_SAMPLES = 16  # the backward pass's windows at most
# ... and by default: measured on SmolLM2 and Gemma 3 (64 x 512, ratio 0.4, statistics over 16 windows), 8 windows gave
# the default job the held-out perplexity of 16 (within 0.3% in the calibration's domain, 2.2% across) for 40-94 s less
# profiling (docs/RESULTS.md, "The profile's windows")
DEFAULT_SENSITIVITY = 8


@dataclass
class ProfileConfig:
    model_dir: Path
    profile_dir: Path
    max_mem: int | None = None
    calib: list[str] = field(default_factory=list)
    calib_samples: int = 64
    seqlen: int = 512
    seed: int = 0
    act_dtype: str = "float32"
    sensitivity_samples: int = DEFAULT_SENSITIVITY  # windows of the backward pass; 0: no sensitivity (every weight 1)
    heldout_samples: int = 0  # windows kept out of every statistic, for the original's held-out perplexity
    # windows of the statistics pass (the spectra and weighted energies): the first ones of the calibration (all of
    # them when there are fewer); at least the sensitivity pass's
    profile_samples: int = DEFAULT_PROFILE_SAMPLES
    work_dir: Path | None = None  # where the activation files go (default: inside the profile folder)
    progress: bool = True
    batch_size: int | None = None  # windows per batch (default: the plan's); under torchrun as for `run`
    device: str = "cpu"  # where the spectra's eighs and SVDs run (job/device.py; run --device)
    max_gpu_mem: int | None = None
    # a finished profile in the folder is reused whatever its sensitivity windows (a run's own profile: a job
    # resumed keeps the one it started with, made before DEFAULT_SENSITIVITY changed or not); `streamsvd profile`
    # makes the profile again for another --sensitivity-samples
    any_sensitivity: bool = False

    def job_config(self):
        """The JobConfig whose checks and memory plan the profile shares (propagate original)."""
        from .pipeline import JobConfig

        return JobConfig(model_dir=self.model_dir, out_dir=self.profile_dir, max_mem=self.max_mem, calib=self.calib,
                         calib_samples=self.calib_samples, seqlen=self.seqlen, seed=self.seed, propagate="original",
                         act_dtype=self.act_dtype, progress=self.progress, svd="exact", alloc="uniform", plots=False,
                         device=self.device, max_gpu_mem=self.max_gpu_mem)

    @classmethod
    def for_job(cls, cfg, profile_dir: Path, work_dir: Path | None = None) -> "ProfileConfig":
        """The profile a `run` without --profile makes for itself (`cfg` a JobConfig): its calibration and budget."""
        return cls(model_dir=cfg.model_dir, profile_dir=profile_dir, max_mem=cfg.max_mem, calib=cfg.calib,
                   calib_samples=cfg.calib_samples, seqlen=cfg.seqlen, seed=cfg.seed, act_dtype=cfg.act_dtype,
                   work_dir=work_dir, progress=cfg.progress, heldout_samples=cfg.heldout_rows, batch_size=cfg.batch_size,
                   device=cfg.device, max_gpu_mem=cfg.max_gpu_mem,
                   profile_samples=cfg.own_profile_samples, any_sensitivity=True)

    @property
    def statistics_windows(self) -> int:
        """Windows of the statistics pass: the first `profile_samples` of the calibration (all when fewer)."""
        return min(self.profile_samples, self.calib_samples)

    def plan(self, ckpt: Checkpoint, processes: int = 1, fixed_batch: int | None = None):
        """The memory plan of this profile (one process's share under torchrun): a `--propagate original` job's,
        plus the weighted Grams and the backward pass (with sensitivity), and the held-out windows."""
        from .plan import build_plan

        return build_plan(self.job_config(), ckpt, weighted_energies=self.sensitivity_samples > 0, processes=processes,
                          fixed_batch=fixed_batch or self.batch_size, profile=True,
                          sensitivity_samples=min(self.sensitivity_samples, self.calib_samples),
                          heldout_samples=self.heldout_samples)

    def validate(self) -> None:
        self.job_config().validate()
        if not 0 <= self.sensitivity_samples <= SENSITIVITY_SAMPLES:
            raise StreamSVDError(f"--sensitivity-samples {self.sensitivity_samples} is out of range",
                                 f"give 0 (no sensitivity) to {SENSITIVITY_SAMPLES} windows for the backward pass")
        if not 0 <= self.heldout_samples <= MAX_HELDOUT:
            raise StreamSVDError(f"--heldout-samples {self.heldout_samples} is out of range",
                                 f"give 0 (none) to {MAX_HELDOUT} held-out windows, e.g. 8")
        check_profile_samples(self.profile_samples, min(self.sensitivity_samples, self.calib_samples))
        if self.batch_size is not None and self.batch_size < 1:
            raise StreamSVDError(f"--batch-size {self.batch_size} is out of range", "give 1 or more windows, or leave it out")


SAVED_BYTES_PER_TENSOR = 512  # profile.json per decoder tensor (its name, shape, sensitivity, sha256: about 240)


def saved_bytes(ckpt: Checkpoint, weighted: bool) -> int:
    """What a profile keeps in its folder: the spectra (float64, the smaller side of every decoder linear), the
    weighted energies as many again when it has a sensitivity pass, and an allowance for profile.json and the
    safetensors headers."""
    linears = [k for k in ckpt.keys() if k.endswith(".weight") and len(ckpt.shape(k)) == 2 and ".layers." in k]
    spectra = sum(8 * min(ckpt.shape(k)) for k in linears)
    tensors = sum(1 for k in ckpt.keys() if ".layers." in k)
    return spectra * (2 if weighted else 1) + SAVED_BYTES_PER_TENSOR * tensors + 4096


def check_profile_samples(profile_samples: int, sensitivity_windows: int) -> None:
    """--profile-samples: at least the sensitivity pass's windows (the weighted energies are taken over them in the
    statistics pass), at most a bound that keeps a typo from meaning a week."""
    if not max(1, sensitivity_windows) <= profile_samples <= MAX_PROFILE_SAMPLES:
        raise StreamSVDError(f"--profile-samples {profile_samples} is out of range",
                             f"give {max(1, sensitivity_windows)} (the sensitivity pass's windows) to {MAX_PROFILE_SAMPLES} "
                             f"windows for the profile's statistics pass (default {DEFAULT_PROFILE_SAMPLES}; more than "
                             "--calib-samples means all of them)")


MAX_PROFILE_SAMPLES = 1 << 20


def profile_identity(ckpt: Checkpoint, text: str, calib_samples: int, seqlen: int, seed: int, heldout_samples: int = 0,
                     statistics_windows: int | None = None, windows: torch.Tensor | None = None) -> dict:
    """What a profile's measurements depend on; a run must match every MATCHED_KEYS key to use it (and
    `heldout_samples`, present only when > 0 so profiles from before keep their identity, for --max-ppl-increase;
    `profile_samples`, the statistics pass's windows, present only when fewer than the calibration's: profiles
    from before took every window; `windows_digest`, the calibration windows' token ids, matched where both have it:
    the same text cut by another tokenizer gave other windows, and its profile was reused)."""
    identity = {"checkpoint": ckpt.fingerprint(), "calib_digest": text_digest(text), "calib_samples": calib_samples,
                "seqlen": seqlen, "seed": seed}
    if windows is not None:
        identity["windows_digest"] = windows_digest(windows)
    if heldout_samples:
        identity["heldout_samples"] = heldout_samples
    if statistics_windows is not None and statistics_windows < calib_samples:
        identity["profile_samples"] = statistics_windows
    return identity


def check_heldout(profile: "Profile", heldout_samples: int, own: bool = False) -> dict:
    """The profile's original held-out figures for `run --max-ppl-increase` with `heldout_samples` windows;
    refused (one error, one fix) when the profile has none, other ones, or no sensitivity weights."""
    fix = (f"make the profile again with `streamsvd profile MODEL_DIR PROFILE_DIR --heldout-samples {heldout_samples}` "
           "(and the run's calibration flags), or leave --profile out: the run then profiles for itself")
    found = profile.meta.get("heldout")
    if not found:
        raise StreamSVDError(f"the profile in {profile.dir} has no held-out perplexity of the original model, which "
                             "--max-ppl-increase measures against (made without --heldout-samples, or before it existed)", fix)
    if found["samples"] != heldout_samples:
        raise StreamSVDError(f"the profile in {profile.dir} measured {found['samples']} held-out windows, not the "
                             f"--heldout-samples {heldout_samples} of this run", fix)
    if not profile.meta.get("sensitivity"):
        raise StreamSVDError(f"the profile in {profile.dir} has no sensitivity weights, which --max-ppl-increase "
                             "predicts from", fix + " (with --sensitivity-samples above 0)")
    return found


@dataclass
class Profile:
    dir: Path
    meta: dict  # profile.json
    spectra: dict[str, np.ndarray]
    weighted: dict[str, np.ndarray] | None = None  # weighted.safetensors (profiles made before it have none)
    reused: bool = False  # True when make_profile found it already made instead of profiling

    @property
    def timing(self) -> dict:
        """The log of the pass that made it ({} if it is gone): seconds, sensitivity_seconds, and since 2026-12 its
        peak RSS per stage against its plan (a job that profiles copies them into its run log as profile_*)."""
        try:
            return json.loads((self.dir / PROFILE_LOG).read_text())
        except (OSError, ValueError):
            return {}

    @property
    def digest(self) -> str:
        """Identifies the measurements: a job's identity records it, so another profile is another job."""
        h = hashlib.sha256((self.dir / SPECTRA_FILE).read_bytes())
        if self.weighted is not None:
            h.update((self.dir / WEIGHTED_FILE).read_bytes())
        h.update(json.dumps({k: self.meta[k] for k in ("identity", "sensitivity", "shapes")}, sort_keys=True).encode())
        return h.hexdigest()[:16]

    @property
    def tokens(self) -> int:
        return self.meta["tokens"]

    def tensors_differing(self, digests: dict[str, str]) -> list[str]:
        """Of `digests` (tensor name -> sha256 as the job read it), those whose contents differ from the weights
        this profile measured; [] for a profile made before it recorded them."""
        recorded = self.meta.get("tensor_sha256") or {}
        return sorted(n for n, d in digests.items() if n in recorded and recorded[n] != d)

    @property
    def statistics_samples(self) -> int:
        """Windows of its statistics pass (the spectra), the first ones of the calibration: all of them for a
        profile whose identity has no `profile_samples` (made before --profile-samples, or over every window)."""
        identity = self.meta["identity"]
        return identity.get("profile_samples", identity["calib_samples"])

    def matrices(self, names: list[str] | None = None) -> list[Matrix]:
        """math/allocate's input, in the model's order (or `names`' order)."""
        weights = self.meta.get("sensitivity") or {}
        weighted = self.weighted or {}
        return [Matrix(name, *self.meta["shapes"][name], self.spectra[name], float(weights.get(name, 1.0)), weighted.get(name))
                for name in (names or self.meta["order"])]


def read_profile(path: Path, identity: dict | None = None) -> Profile:
    """The profile in `path`; refused (one error, one fix) if it is missing, damaged, or made from other settings."""
    path = Path(path)
    fix = "make one with `streamsvd profile MODEL_DIR PROFILE_DIR` and the same --calib, --calib-samples, --seqlen and --seed as the run"
    try:
        meta = json.loads((path / PROFILE_JSON).read_text())
        spectra = {k: v.numpy() for k, v in load_file(str(path / SPECTRA_FILE)).items()}
        weighted = ({k: v.numpy() for k, v in load_file(str(path / WEIGHTED_FILE)).items()}
                    if (path / WEIGHTED_FILE).exists() else None)
    except FileNotFoundError:
        raise StreamSVDError(f"{path} is not a finished streamsvd profile (no {PROFILE_JSON} or {SPECTRA_FILE})", fix) from None
    except Exception as e:  # noqa: BLE001 - a truncated safetensors file is safetensors' own SafetensorError
        raise StreamSVDError(f"the profile in {path} cannot be read ({type(e).__name__}: {str(e)[:200]})", fix) from None
    if isinstance(meta, dict) and _newer_version(meta.get("version")):
        raise StreamSVDError(f"the profile in {path} was written by streamsvd {meta['version']}, newer than this one "
                             f"({__version__}), which cannot tell what that version's profile.json means",
                             "read it with the streamsvd that made it, or make the profile again with this one: "
                             "`streamsvd profile MODEL_DIR PROFILE_DIR` (and the run's calibration flags)")
    if (not isinstance(meta, dict) or not {"identity", "shapes", "order", "tokens"} <= set(meta)
            or not isinstance(meta["order"], list) or not all(isinstance(n, str) for n in meta["order"])
            or set(meta["order"]) != set(spectra) or (weighted is not None and set(weighted) != set(spectra))):
        raise StreamSVDError(f"the profile in {path} is damaged ({PROFILE_JSON} does not match {SPECTRA_FILE})", fix)
    problem = _damage(path, meta, spectra, weighted)
    if problem:
        raise StreamSVDError(f"the profile in {path} is damaged: {problem}", fix)
    if identity is not None:
        differ = [k for k in MATCHED_KEYS if meta["identity"].get(k) != identity[k]]
        made, want = meta["identity"].get("windows_digest"), identity.get("windows_digest")
        if made is not None and want is not None and made != want:  # profiles made before it have none
            differ.append("windows_digest")
        if differ:
            what = ", ".join(_IDENTITY_WORDS.get(k, k) for k in differ)
            raise StreamSVDError(f"the profile in {path} was made with other settings than this run: {what}", fix)
    return Profile(path, meta, spectra, weighted)


def _meta_digest(meta: dict) -> str:
    """sha256 of profile.json's content but this digest itself: a hand edit (an original perplexity, a token count)
    changed what runs read, unseen."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _version_key(version) -> tuple[int, ...] | None:
    """"0.1.0" -> (0, 1, 0) (a suffix such as ".dev1" or "rc1" ignored), an int n -> (n,); None if neither."""
    if isinstance(version, int) and not isinstance(version, bool):
        return (version,)
    if not isinstance(version, str):
        return None
    parts = []
    for part in version.split("."):
        digits = part[: len(part) - len(part.lstrip("0123456789"))]
        if not digits:
            break
        parts.append(int(digits))
        if digits != part:
            break
    return tuple(parts) or None


def _newer_version(version) -> bool:
    """Whether a profile.json's `version` is later than this streamsvd's (one that is no version at all is left to
    _damage: damaged, not newer)."""
    key = _version_key(version)
    return key is not None and key > _version_key(__version__)


def _refuse_overflow(spectra: dict, weighted: dict | None, sensitivity: dict | None) -> None:
    """Measurements that are not finite come from a model that overflows float32 on the calibration text (a weight
    scaled far out of range): refused by the first matrix's name before the profile is written (it was written, then
    refused as damaged with a fix to make it again, which gave the same)."""
    bad = _bad_figure(spectra, weighted, {k: float(v) for k, v in (sensitivity or {}).items()})
    if bad is not None:
        raise StreamSVDError(f"the profile's figures for {bad[0]} are non-finite figures (NaN or infinite): the model "
                             "overflows float32 on the calibration text",
                             "check MODEL_DIR's weights for values far out of range (a damaged or wrongly scaled "
                             "checkpoint); `streamsvd run --alloc uniform` names the linear whose outputs overflow")


def _bad_figure(spectra: dict, weighted: dict | None, sensitivity: dict | None = None) -> tuple[str, str] | None:
    """(matrix, which figures) of the first matrix whose spectrum, weighted energies or sensitivity weight is NaN,
    infinite or negative beyond round-off (eigh's: -3e-8 of the largest seen on a random tiny model); None if none.
    What the profile refuses to write (_refuse_overflow) and to read (_damage)."""
    for name in spectra:
        for what, array in (("spectrum", spectra[name]), ("weighted energies", (weighted or {}).get(name)),
                            ("sensitivity weight", None if sensitivity is None or name not in sensitivity
                             else np.array([sensitivity[name]]))):
            if array is not None and not (np.isfinite(array).all() and (array >= -1e-6 * np.abs(array).max()).all()):
                return name, what
    return None


_IDENTITY_WORDS = {"checkpoint": "the model (config.json, shard sizes)", "calib_digest": "the calibration text",
                   "calib_samples": "--calib-samples", "seqlen": "--seqlen", "seed": "--seed",
                   "windows_digest": "the calibration windows' tokens (other windows, or another tokenizer)"}


def _damage(path: Path, meta: dict, spectra: dict, weighted: dict | None) -> str | None:
    """What makes a readable profile unusable (its files' recorded sha256, shapes, values); None if nothing. NaN or
    negative figures drove ranks to 1 with 'predicted relative loss 0.0000', shapes at odds with the spectra were a
    ValueError traceback from the allocator."""
    problem = _malformed(meta)
    if problem:
        return problem
    recorded = meta.get("files_sha256") or {}  # profiles made before 2026-12-06 have none
    for name, digest in sorted(recorded.items()):
        if not (path / name).is_file() or hashlib.sha256((path / name).read_bytes()).hexdigest() != digest:
            return f"{name} is not the file the profile wrote (sha256)"
    shapes = meta["shapes"]
    for name, values in spectra.items():
        shape = shapes.get(name)
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and d > 0 for d in shape)):
            return f"{name} has no shape [out, in] in {PROFILE_JSON}"
        if values.shape != (min(shape),):
            return f"{name}'s spectrum has {values.size} values, its shape {shape} needs {min(shape)}"
    bad = _bad_figure(spectra, weighted)
    if bad is not None:
        return f"{bad[0]}'s {bad[1]} hold NaN, infinite or negative values"
    if "version" in meta and _version_key(meta["version"]) is None:
        return f"its version {meta['version']!r} is not a streamsvd version"
    sensitivity = meta.get("sensitivity")
    # written as None (no sensitivity pass) or one weight per matrix, since the first profile; a partial or empty
    # dict gave the missing matrices weight 1 unseen
    if sensitivity is None:
        if meta.get("sensitivity_samples"):
            return f"it measured {meta['sensitivity_samples']} sensitivity windows but holds no sensitivity weights"
    elif not isinstance(sensitivity, dict) or set(sensitivity) != set(spectra):
        return "its sensitivity weights are not one per matrix of the spectra"
    elif not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in sensitivity.values()):
        return "its sensitivity weights are not finite non-negative numbers"
    heldout = meta.get("heldout")
    if heldout is not None and not (isinstance(heldout, dict) and isinstance(heldout.get("perplexity"), (int, float))
                                    and math.isfinite(heldout["perplexity"]) and heldout["perplexity"] > 0):
        return "its held-out perplexity is not a finite positive number"
    # last, so that the checks above name what is wrong; this one catches any other hand edit (an original perplexity)
    if "meta_sha256" in meta and meta["meta_sha256"] != _meta_digest(meta):  # profiles before 2026-12-06 have none
        return f"{PROFILE_JSON} is not as the profile wrote it (edited since: its meta_sha256 differs)"
    return None


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _malformed(meta: dict) -> str | None:
    """What in profile.json is not of the form the profile writes (a hand edit, another program's file): an identity,
    shapes or records that are not mappings were an AttributeError traceback, a token count of 0 or text a
    ZeroDivisionError or TypeError one, a negative or NaN count or a matrix listed twice silently other ranks, and a
    files_sha256 name outside the folder was read wherever it pointed. None if nothing."""
    identity = meta["identity"]
    if not isinstance(identity, dict):
        return "its identity is not a mapping"
    for key in ("shapes", "tensor_sha256", "files_sha256"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            return f"its {key} is not a mapping"
    for name, digest in (meta.get("files_sha256") or {}).items():
        if name not in (SPECTRA_FILE, WEIGHTED_FILE) or not isinstance(digest, str):
            return f"its files_sha256 names {name!r}, not one of the profile's own files with its sha256"
    order = meta["order"]
    if not isinstance(order, list) or len(order) != len(set(order)):
        return "its order lists a matrix more than once"
    windows = identity.get("profile_samples", identity.get("calib_samples"))
    if not (_positive_int(meta["tokens"]) and _positive_int(windows) and _positive_int(identity.get("seqlen"))
            and meta["tokens"] == windows * identity["seqlen"]):
        return (f"its token count {meta['tokens']!r} is not its statistics windows ({windows!r}) x its seqlen "
                f"({identity.get('seqlen')!r})")
    heldout = meta.get("heldout")
    if isinstance(heldout, dict) and not _positive_int(heldout.get("samples")):
        return "its held-out record has no positive window count (samples)"
    return None


def check_profile_shapes(profile: "Profile", matrices: list[Matrix]) -> None:
    """Refuse a profile whose matrices' shapes are not the model's (the identity matched, so only an edit of
    profile.json makes them differ): an [out, in] edited to [64, 6400] kept its spectrum's length and gave ranks for a
    budget of another model (--ratio 0.4 came out 0.011)."""
    shapes = profile.meta["shapes"]
    for mat in matrices:
        if shapes.get(mat.name) != [mat.m, mat.n]:
            raise StreamSVDError(f"the profile in {profile.dir} is damaged: {mat.name} has shape {shapes.get(mat.name)} in "
                                 f"{PROFILE_JSON}, [{mat.m}, {mat.n}] in the model",
                                 "make one with `streamsvd profile MODEL_DIR PROFILE_DIR` and the same --calib, "
                                 "--calib-samples, --seqlen and --seed as the run")
    if set(shapes) != {mat.name for mat in matrices}:
        extra = sorted(set(shapes) - {mat.name for mat in matrices})
        raise StreamSVDError(f"the profile in {profile.dir} is damaged: it lists {extra[0]}, which the model lacks",
                             "make one with `streamsvd profile MODEL_DIR PROFILE_DIR` and the same --calib, "
                             "--calib-samples, --seqlen and --seed as the run")


def _check_places(cfg: ProfileConfig) -> None:
    """Refusals before anything is written: MODEL_DIR an output, PROFILE_DIR not a folder we can write."""
    from .preflight import check_can_create, check_original

    check_original(cfg.model_dir, "profile the original checkpoint")
    if within(cfg.profile_dir, cfg.model_dir):  # its files landed among the checkpoint's
        raise StreamSVDError(f"PROFILE_DIR {cfg.profile_dir} is MODEL_DIR or inside it",
                             "choose a directory outside the checkpoint's for PROFILE_DIR (the checkpoint stays as it came)")
    check_can_create(cfg.profile_dir, "PROFILE_DIR", "choose a PROFILE_DIR in a directory you can write to")
    from .preflight import streamsvd_section
    from .state import STATE_NAME

    if (Path(cfg.profile_dir) / STATE_NAME).exists() or streamsvd_section(cfg.profile_dir):  # its files went among the output's
        raise StreamSVDError(f"PROFILE_DIR {cfg.profile_dir} is a streamsvd output",
                             "give the profile a folder of its own (a job's own profile is OUT_DIR/profile)")
    folder = Path(cfg.profile_dir)
    if folder.is_dir():
        # a folder of other files (a finished output's spectra/, say) took the profile's files beside its own, and
        # those of the same names were replaced (a probe, 2026-12-07): a new or empty folder, or a profile's
        from .lock import LOCK_NAME

        names = {entry.name for entry in folder.iterdir()}
        ours = {PROFILE_JSON, WORK_NAME, SPECTRA_FILE, WEIGHTED_FILE, PROFILE_LOG, LOCK_NAME}
        if names and not names & ours and not any(name.startswith(".") and ".tmp-" in name for name in names):
            raise StreamSVDError(f"PROFILE_DIR {folder} is not empty and holds no profile",
                                 "choose a new or empty folder for the profile, so nothing in it is overwritten")
    if cfg.work_dir is not None and within(cfg.work_dir, cfg.model_dir):  # a killed profile's files stayed there
        raise StreamSVDError(f"--work-dir {cfg.work_dir} is MODEL_DIR or inside it",
                             "give a directory outside the checkpoint's (it stays as it came), or leave --work-dir out")
    if cfg.work_dir is not None:
        check_can_create(cfg.work_dir, "--work-dir", "give --work-dir a directory you can write to (or leave it out)")


def _say(message: str) -> None:
    tqdm.write(f"streamsvd: {message}", file=sys.stderr)


class Profiler:
    def __init__(self, cfg: ProfileConfig, tokenizer=None):
        """`tokenizer`: the model's, already loaded (a job profiling for itself passes its own: a second copy of a
        large vocabulary's tokenizer is hundreds of MiB, Gemma 3's 257 MiB, that the job's plan does not count)."""
        cfg.validate()
        self.cfg = cfg
        self.ckpt = Checkpoint(cfg.model_dir)
        self.config = load_config(self.ckpt)
        check_seqlen(self.config, cfg.seqlen)
        self.text, self.text_source = load_texts(cfg.calib)
        _check_places(cfg)
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.ckpt.dir)
        self.windows = sample_windows(tokenizer, self.text, cfg.calib_samples, cfg.seqlen, cfg.seed)
        self.identity = profile_identity(self.ckpt, self.text, cfg.calib_samples, cfg.seqlen, cfg.seed, cfg.heldout_samples,
                                         cfg.statistics_windows, self.windows)
        self.heldout = heldout_windows(tokenizer, self.text, cfg.calib_samples, cfg.seqlen, cfg.seed, cfg.heldout_samples)
        self.model = empty_model(self.config, COMPUTE_DTYPE)
        check_weights_match(self.model, self.ckpt)
        from .device import hold_to_budget, resolve_device
        from .distributed import World
        from .plan import refuse_if_too_small

        self.device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))

        # Under torchrun (job/distributed.py) each process streams its share of the windows: the statistics pass a
        # contiguous run of whole batches, the sensitivity pass a contiguous run of the sensitivity windows (which
        # go one window at a time, on one process too, so that every share is the one process's computation).
        self.world = world = World.current()
        fixed = world.agreed_batch(cfg.batch_size, lambda: cfg.plan(self.ckpt, processes=world.size).batch_size)
        self.plan = plan = cfg.plan(self.ckpt, processes=world.size, fixed_batch=fixed)
        refuse_if_too_small(plan)
        if self.device.type == "cuda":
            hold_to_budget(self.device, plan.gpu_budget_bytes)
        self.batch_size = plan.batch_size
        windows = cfg.statistics_windows
        if windows < world.size:
            raise StreamSVDError(f"the profile's statistics pass has {windows} window(s), fewer than the {world.size} "
                                 "processes", f"give --profile-samples {world.size} or more, or start fewer processes")
        # The statistics pass's batches: at most a process's share of its windows, so that every process has one
        # (one process: the plan's batch, or all the windows in one batch when they are fewer)
        self.stat_batch = min(self.batch_size, -(-windows // world.size))
        self.lo, self.hi = world.share(windows, self.stat_batch)
        # the held-out windows split the same way (a process may hold none): their NLLs are added in window order
        held = world.share(len(self.heldout), self.batch_size, allow_empty=True) if len(self.heldout) else (0, 0)
        self.heldout = self.heldout[held[0]:held[1]]
        keep = self._keep()
        self.sens_lo, self.sens_hi = keep * world.rank // world.size, keep * (world.rank + 1) // world.size
        # in --work-dir, named by the profile's folder: two profiles given one --work-dir wrote the same activation files
        self.work_base = (Path(cfg.profile_dir) / WORK_NAME if cfg.work_dir is None else
                          Path(cfg.work_dir) / f"streamsvd-profile-{_path_tag(cfg.profile_dir)}")
        self.work = world.work_folder(self.work_base)

    def _layer(self, index: int):
        """Block `index` as stored, on the profile's device (--device: its passes and spectra run there)."""
        return load_layer(self.model, index, self.ckpt, COMPUTE_DTYPE).to(self.device)

    def _args(self, index: int):
        """Block `index`'s arguments (masks, rotary tables) on the profile's device."""
        return layer_args_on(self.layer_args[index], self.device)

    def disk_needs(self) -> dict[Path, int]:
        """Bytes the pass writes: two activation files (calibration and held-out windows), the saved block
        inputs and final states of the sensitivity windows (float32), and the spectra."""
        from ..io.activations import activation_bytes

        cfg, config = self.cfg, self.config
        keep = self.sens_hi - self.sens_lo  # this process's share (all of them for one process)
        window = (cfg.seqlen, config.hidden_size)
        work = 2 * activation_bytes((self.hi - self.lo + len(self.heldout), *window), cfg.act_dtype)
        work += (config.num_hidden_layers + 1) * activation_bytes((keep, *window), "float32") if keep else 0
        return {Path(cfg.profile_dir): saved_bytes(self.ckpt, self._keep() > 0), self.work: work}

    def existing(self) -> Profile | None:
        """A finished profile of the same settings already in the folder (the same command run twice)."""
        if not (Path(self.cfg.profile_dir) / PROFILE_JSON).exists():
            return None
        try:
            found = read_profile(self.cfg.profile_dir, self.identity)
        except StreamSVDError as e:  # read_profile's fix is to make a profile: this command, which it refused
            raise StreamSVDError(e.problem, f"give another PROFILE_DIR for these settings, or remove "
                                 f"{self.cfg.profile_dir} and run the same command again") from e
        # Another number of held-out windows, of the statistics pass's or of the sensitivity pass's: the same
        # calibration, other measurements; made again.
        same = (found.meta["identity"].get("heldout_samples", 0) == self.cfg.heldout_samples
                and found.statistics_samples == self.cfg.statistics_windows
                and (self.cfg.any_sensitivity or found.meta.get("sensitivity_samples", 0) == self._keep()))
        return found if same else None

    def run(self) -> Profile:
        """Under the lock of PROFILE_DIR (rank 0's): two profiles into one folder shared its activation files, and the
        first to finish removed them under the other (a traceback), or mixed two settings' statistics."""
        from .lock import JobLocks

        self.locks = JobLocks()
        try:
            return self._run_locked()
        finally:
            self.locks.release()

    def _run_locked(self) -> Profile:
        world = self.world
        seen = []  # rank 0's look (the one process's): read once; the other ranks read it after rank 0 said so

        def look() -> bool:
            seen.append(self.existing())
            return seen[-1] is not None

        if world.on_rank0(look):
            found = seen[-1] if seen else self.existing()
            if world.writes:
                _say(f"profile reused: {self.cfg.profile_dir} already holds a profile of these settings")
            found.reused = True
            return found
        from ..io.diskspace import check_free_space

        world.agree(lambda: check_free_space(self.disk_needs()))
        started = time.time()
        out = Path(self.cfg.profile_dir)
        world.agree(lambda: self._take_locks(out))  # refused on any rank: every rank stops before it touches a file
        self.work.mkdir(parents=True, exist_ok=True)
        # the process's RSS per planned stage, for profile_log.json (a job that profiles has its own sampler too)
        self.sampler = PeakSampler(first_stage="embed").start()
        try:
            materialize_base_mapped(self.model, self.ckpt, COMPUTE_DTYPE)
            self.layer_args = capture_layer_kwargs(self.model, self.windows[:1])
            sens_started = time.time()
            sensitivity, token_weights = self._sensitivity() if self._keep() else (None, None)
            sens_seconds = time.time() - sens_started
            spectra, weighted, shapes, heldout = self._forward(token_weights)
            if sensitivity is not None:
                sensitivity = {name: sensitivity[name] for name in spectra}  # the model's order
            _refuse_overflow(spectra, weighted, sensitivity)
        finally:
            self.sampler.stop()
            shutil.rmtree(self.work, ignore_errors=True)
        if world.writes:
            self._write(out, spectra, weighted, shapes, sensitivity, heldout, started, sens_seconds)
        world.barrier()  # rank 0 has written it: every process reads the same profile
        if world.active and world.writes:
            shutil.rmtree(self.work_base, ignore_errors=True)  # the ranks' work folders' parent
        return read_profile(out, self.identity)

    def _take_locks(self, out: Path) -> None:
        """PROFILE_DIR's lock (rank 0's), and under torchrun each rank's own work folder's: a second torchrun profile
        into the same folder went on past rank 0's refusal on its other ranks, and removed the running profile's
        activation files on its way out (the same rank's folder)."""
        if self.world.writes:
            self.locks.take(out, "PROFILE_DIR", make=True)
        if self.world.active:
            self.locks.take(self.work, "PROFILE_DIR" if self.cfg.work_dir is None else "--work-dir", make=True)

    def _write(self, out: Path, spectra, weighted, shapes, sensitivity, heldout, started: float, sens_seconds: float) -> None:
        # a profile killed while writing left its temporaries (never renamed into place): gone, not kept beside the profile
        remove_temporaries(out, (PROFILE_LOG, WEIGHTED_FILE, SPECTRA_FILE, PROFILE_JSON))
        # An earlier profile made again (other held-out or sensitivity windows): its profile.json goes first, so a kill
        # while the data files are replaced leaves an unfinished folder that the same command makes again. Left in
        # place, it named the new files as not its own, and every rerun was refused with "make one with streamsvd
        # profile", the command that was refused (a probe, 2026-12-07).
        if (out / PROFILE_JSON).exists():
            (out / PROFILE_JSON).unlink()
            fsync_dir(out)
        atomic_write_json(out / PROFILE_LOG, {"seconds": round(time.time() - started, 2),
                                              "sensitivity_seconds": round(sens_seconds, 2) if sensitivity else None,
                                              # rank 0's peak RSS per stage against its plan (job/plan.py)
                                              "peak_rss_by_stage": dict(sorted(self.sampler.peaks.items())),
                                              "planned_bytes_by_stage": self.plan.stage_bytes,
                                              "max_mem_bytes": self.plan.budget_bytes})
        if weighted:
            with atomic_path(out / WEIGHTED_FILE) as tmp:
                save_file({k: torch.from_numpy(weighted[k]) for k in spectra}, str(tmp))
        else:
            (out / WEIGHTED_FILE).unlink(missing_ok=True)
        with atomic_path(out / SPECTRA_FILE) as tmp:
            save_file({k: torch.from_numpy(v) for k, v in spectra.items()}, str(tmp))
        files = [SPECTRA_FILE] + ([WEIGHTED_FILE] if weighted else [])
        meta = {
            "version": __version__,
            "identity": self.identity,
            "calibration_source": self.text_source,
            "tokens": self.cfg.statistics_windows * self.cfg.seqlen,  # the statistics pass's
            "order": list(spectra),
            "shapes": shapes,
            "sensitivity": sensitivity,
            "sensitivity_samples": min(self.cfg.sensitivity_samples, self.cfg.calib_samples) if sensitivity else 0,
            **({"heldout": heldout} if heldout else {}),
            # sha256 of every decoder-layer tensor the spectra were measured on: a job refuses the profile for a
            # block whose weights differ (the checkpoint fingerprint is config and shard sizes: a fine-tune of the
            # same shapes passes it, and so did MODEL_DIR changed under a resumed job after its first block)
            # and of the tensors outside them (embeddings, final norm, head): the inputs of block 0 and the sensitivity
            # pass's head, which a profile of a model differing only there measured otherwise
            "tensor_sha256": dict(sorted({**self.tensor_digests, **self._outside_digests()}.items())),
            # the measurements' files as written: a changed byte in them changed the ranks unseen
            "files_sha256": {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in files},
        }
        atomic_write_json(out / PROFILE_JSON, {**meta, "meta_sha256": _meta_digest(meta)})

    def _outside_digests(self) -> dict[str, str]:
        """sha256 of every tensor outside the decoder layers, as a job's copy of them records it (streamed)."""
        from ..io.streamcopy import stored_sha256
        from ..model.architecture import SUPPORTED

        layers = SUPPORTED[self.config.model_type] + "."
        return {n: stored_sha256(self.ckpt, n) for n in self.ckpt.keys() if not n.startswith(layers)}

    # ------------------------------------------------------------ forward: spectra
    def _batches(self, n: int | None = None, lo: int = 0):
        """Batches [start, stop) of windows [lo, n); default: this process's windows of the statistics pass."""
        lo, n, batch = (self.lo, self.hi, self.stat_batch) if n is None else (lo, n, self.batch_size)
        for start in range(lo, n, batch):
            yield start, min(n, start + batch)

    def _file(self, name: str, samples: int | None = None, create: bool = True) -> "_Rows":
        """An activation file of this process's windows, addressed by the job's window numbers: its calibration
        windows (then the held-out ones), or with `samples` its sensitivity windows (float32: the backward pass
        reads exact inputs)."""
        if samples is None:
            lo, rows = self.lo, self.hi - self.lo + len(self.heldout)
        else:
            lo, rows = self.sens_lo, samples
        if not rows:  # a process with none of the sensitivity windows (fewer of them than processes)
            return _Rows(None, lo)
        file = ActivationFile(self.work / name, (rows, self.cfg.seqlen, self.config.hidden_size),
                              "float32" if samples is not None else self.cfg.act_dtype, create=create)
        return _Rows(file, lo)

    def _keep(self) -> int:
        """Windows of the backward pass (the first ones of the calibration)."""
        return min(self.cfg.sensitivity_samples, self.cfg.calib_samples)

    @torch.no_grad()
    def _forward(self, token_weights: dict[str, torch.Tensor] | None):
        """The statistics pass: every calibration window through the original blocks; per linear its spectrum
        and, with `token_weights`, its weighted energies (block_spectra)."""
        self.sampler.stage("embed")
        src = self._file("acts-0.bin")
        for start, stop in self._batches():
            src.write(start, first_layer_inputs(self.model, self.windows[start:stop]))
        S, H = self.hi, len(self.heldout)  # held-out rows follow this process's windows (its run of the held-out ones)
        for start, stop in self._batches(H, 0):
            src.write(S + start, first_layer_inputs(self.model, self.heldout[start:stop]))
        spectra, weighted, shapes = {}, {}, {}
        self.tensor_digests = {}
        n_layers = len(decoder_layers(self.model))
        for index in tqdm(range(n_layers), desc="profile", unit="block", disable=not self.cfg.progress):
            dst = self._file(f"acts-{(index + 1) % 2}.bin")
            self._profile_block(index, src, dst, token_weights, spectra, weighted, shapes)
            src = dst
            faults.point("profile-block")
        heldout = None
        if self.cfg.heldout_samples:  # every process takes part (gathered in window order), with windows or without
            self.sampler.stage("heldout")
            total, count = final_states_nll(self.model, self.ckpt, lambda a, b, src=src: src.read(S + a, S + b), self.heldout,
                                            world=self.world)
            heldout = {"samples": self.cfg.heldout_samples, "tokens": count, "nll_per_token": total / count,
                       "perplexity": math.exp(total / count)}
        return spectra, weighted, shapes, heldout

    def _profile_block(self, index: int, src, dst, token_weights: dict[str, torch.Tensor] | None, spectra: dict,
                       weighted: dict, shapes: dict) -> None:
        """Block `index` in the statistics pass: its statistics (and weighted Grams) over `src`'s windows, its outputs
        (and the held-out windows') into `dst`, and its linears' spectra added to `spectra`, `weighted` and `shapes`.
        A method of its own so that the block and everything holding it are gone when it returns, before the next
        block loads (one block at a time, on the host and on a GPU)."""
        S, H = self.hi, len(self.heldout)
        self.sampler.stage("statistics")
        self.ckpt.read_digests = {}  # the block's tensors by content: a job checks its own reads against them
        layer = self._layer(index)
        self.tensor_digests.update(self.ckpt.read_digests)
        self.ckpt.read_digests = None
        prefix = layer_prefix(self.model, index)
        weighing = None
        if token_weights is not None:
            linears = linear_modules(layer)
            weighing = WeightedEnergies(linears, {n: token_weights[prefix + n] for n in linears})

        def read(start, stop):
            if weighing is not None:
                weighing.rows = (start, stop)
            return src.read(start, stop)

        args, kwargs = self._args(index)
        try:
            stats = collect_statistics(layer, self._batches(), read,
                                       lambda lyr, h: run_layer(lyr, h.to(self.device), args, kwargs),
                                       on_output=dst.write, output_side=output_side_linears(layer, "eig"))
        finally:
            if weighing is not None:
                weighing.close()
        for start, stop in self._batches(H, 0):  # the held-out windows: after the statistics, in none of them
            dst.write(S + start, run_layer(layer, src.read(S + start, S + stop).to(self.device), args, kwargs))
        self.world.reduce_statistics(stats)
        if weighing is not None:
            self.world.reduce_statistics(weighing)
        self.sampler.stage("factorize")  # the spectra: an eigh or SVD per linear
        for name, (s, d) in block_spectra(layer, stats, weighing, spread=self.world.spread, device=self.device).items():
            spectra[prefix + name] = s
            if d is not None:
                weighted[prefix + name] = d
            linear = layer.get_submodule(name)
            shapes[prefix + name] = [linear.out_features, linear.in_features]

    # ------------------------------------------------------------ backward: sensitivity
    @torch.no_grad()
    def _sensitivity_forward(self, keep: int) -> ActivationFile:
        """The first `keep` windows through the original blocks, each block's inputs saved (float32) for the backward
        walk; returns the final states."""
        mine = range(self.sens_lo, self.sens_hi)  # this process's share, a window at a time (see __init__)
        src = self._file("inputs-0.bin", len(mine))
        for w in mine:
            src.write(w, first_layer_inputs(self.model, self.windows[w : w + 1]))
        n_layers = len(decoder_layers(self.model))
        for index in tqdm(range(n_layers), desc="sensitivity (forward)", unit="block", disable=not self.cfg.progress):
            layer = self._layer(index)
            args, kwargs = self._args(index)
            dst = self._file(f"inputs-{index + 1}.bin", len(mine))
            for w in mine:
                dst.write(w, run_layer(layer, src.read(w, w + 1).to(self.device), args, kwargs))
            del layer, args, kwargs  # before the next block is loaded
            src = dst
        return src

    def _head_gradient(self, final: ActivationFile, keep: int) -> torch.Tensor:
        """d(summed next-token NLL) / d(final hidden states), window by window and LOGIT_CHUNK positions at a time
        (the final norm and the head act on each position alone, so a chunk's gradient is its own: the logits
        of a whole window would be a gigabyte at a 128k vocabulary). The last position predicts nothing: 0."""
        head = self.ckpt.get(head_key(self.ckpt)).to(COMPUTE_DTYPE)
        softcap = getattr(self.config, "final_logit_softcapping", None)
        norm = self.model.model.norm
        lo, positions = self.sens_lo, self.cfg.seqlen - 1
        grads = torch.zeros(self.sens_hi - lo, self.cfg.seqlen, self.config.hidden_size, dtype=COMPUTE_DTYPE)
        for w in range(lo, self.sens_hi):
            hidden = final.read(w, w + 1)
            for start in range(0, positions, LOGIT_CHUNK):
                stop = min(positions, start + LOGIT_CHUNK)
                part = hidden[:, start:stop].clone().requires_grad_(True)
                with torch.enable_grad():
                    logits = norm(part) @ head.T
                    if softcap:
                        logits = torch.tanh(logits / softcap) * softcap
                    targets = self.windows[w : w + 1, start + 1 : stop + 1]
                    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
                    grads[w - lo, start:stop] = torch.autograd.grad(loss, part)[0][0]
        return grads

    def _sensitivity(self) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """Per linear: the mean squared gradient at its output (the weight), and the same per token (keep x seqlen).

        Under torchrun each process walks its share of the windows and fills their rows; the rows are then
        put together on every process (a sum in rank order of tensors that are zero outside each one's rows)."""
        keep, lo = self._keep(), self.sens_lo
        self.sampler.stage("sensitivity (blocks)")  # its forward: one window at a time, inputs kept on disk
        final = self._sensitivity_forward(keep)
        self.sampler.stage("sensitivity (head)")
        grads = self._head_gradient(final, keep)
        self.sampler.stage("sensitivity (blocks)")
        per_token: dict[str, torch.Tensor] = {}
        window = [0]
        layers = decoder_layers(self.model)
        for index in tqdm(range(len(layers) - 1, -1, -1), desc="sensitivity", unit="block", disable=not self.cfg.progress):
            layer = self._layer(index)
            layer.requires_grad_(False)  # only the activations' gradients are wanted
            prefix = layer_prefix(self.model, index)
            for name in linear_modules(layer):
                per_token[prefix + name] = torch.zeros(keep, self.cfg.seqlen, dtype=torch.float64)
            handles = [m.register_forward_hook(_gradient_reader(per_token[prefix + name], window))
                       for name, m in linear_modules(layer).items()]
            saved = self._file(f"inputs-{index}.bin", self.sens_hi - lo, create=False)
            args, kwargs = self._args(index)
            for w in range(lo, self.sens_hi):
                window[0] = w
                x = saved.read(w, w + 1).to(self.device).requires_grad_(True)
                with torch.enable_grad():
                    out = run_layer(layer, x, args, kwargs)
                    below = grads[w - lo : w - lo + 1].to(self.device)
                    grads[w - lo : w - lo + 1] = torch.autograd.grad(out, x, grad_outputs=below)[0]
            for h in handles:
                h.remove()
            del layer, handles, args, kwargs  # before the next block is loaded
            faults.point("profile-block")
        if self.world.active:
            names = list(per_token)
            whole = self.world.sum_in_rank_order(torch.stack([per_token[n] for n in names]))
            per_token = {n: whole[i] for i, n in enumerate(names)}
        return {name: float(t.mean()) for name, t in per_token.items()}, per_token


class _Rows:
    """An activation file holding windows [lo, lo + rows) of the job, read and written by window number."""

    def __init__(self, file: ActivationFile | None, lo: int):
        self.file, self.lo = file, lo

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self.file.read(start - self.lo, stop - self.lo)

    def write(self, start: int, hidden: torch.Tensor) -> None:
        self.file.write(start - self.lo, hidden)


def _gradient_reader(per_token: torch.Tensor, window: list[int]):
    """A forward hook that puts a tensor hook on the linear's output: each token's mean squared gradient."""

    def on_grad(grad):
        per_token[window[0]] += grad.detach().double().pow(2).mean(-1).reshape(-1).to(per_token.device)

    def hook(module, inputs, output):
        if output.requires_grad:
            output.register_hook(on_grad)

    return hook


class WeightedEnergies:
    """Forward pre-hooks that accumulate, per linear, the Gram of its inputs (or of its outputs, the smaller side)
    over the sensitivity windows' tokens, each token scaled by its mean squared gradient at the linear's output.

    With U the directions the job truncates along (block_spectra), diag(U^T W G_w W^T U) is then, per direction j,
    E_t[w_t a_tj^2]: the sensitivity-weighted energy the direction carries (math/allocate.Matrix.weighted).
    A profile-only statistic: one more Gram per linear of the block while it is in memory.
    """

    def __init__(self, linears: dict, token_weights: dict[str, torch.Tensor]):
        self.rows = (0, 0)  # the window rows of the batch being run (set by the reader)
        self.keep = next(iter(token_weights.values())).shape[0] if token_weights else 0
        self.grams: dict[str, GramAccumulator] = {}
        # the one weight per matrix, for the directions too faint to resolve on the tall route (energies())
        self.mean_weight = {name: float(w.mean()) for name, w in token_weights.items()}
        for name, m in linears.items():
            out_f, in_f = m.weight.shape
            self.grams[name] = OutputGramAccumulator(m.weight) if out_f < in_f else GramAccumulator(in_f, m.weight.device)
        self._handles = [m.register_forward_pre_hook(self._hook(name, token_weights[name])) for name, m in linears.items()]

    def _hook(self, name: str, weights: torch.Tensor):
        def fn(module, inputs):
            start, stop = self.rows
            if start >= self.keep:
                return
            x = inputs[0][: self.keep - start]
            w = weights[start : start + x.shape[0]].to(device=x.device, dtype=x.dtype).sqrt()
            with charged("accumulate"):
                self.grams[name].add_batch(x * w[..., None])

        return fn

    def energies(self, name: str, u: torch.Tensor | None, weight: torch.Tensor, tall: tuple | None = None) -> np.ndarray:
        """diag(U^T W G_w W^T U) for U (out x k) orthonormal, float64.

        `tall` = (V, s, S, W^T W) instead of U for a tall whitened weight A = W S (out > in), whose U = A V / s is
        never formed (math/factorize._tall_eig): U^T W = diag(1/s) V^T S^T (W^T W), all in x in. Directions with s below
        TALL_MIN_RATIO s_0 cannot be resolved that way; they get the matrix's one weight times s^2 (their
        energy is that small anyway)."""
        acc = self.grams.pop(name)
        g = acc.gram.to(weight.device, torch.float64)  # where the directions were found (--device)
        if isinstance(acc, OutputGramAccumulator):
            b = u.T  # the Gram is already W G_w W^T
        elif tall is None:
            b = project(u, weight)  # U^T W over W's float64 row chunks
        else:
            v, s, root, wtw = tall  # wtw: W^T W, summed over W's float64 row chunks
            faint = s <= TALL_MIN_RATIO * s[0]
            b = (v.T @ (root.T @ wtw)) / torch.where(faint, 1.0, s)[:, None]
            d = ((b @ g) * b).sum(1)
            d[faint] = self.mean_weight[name] * s[faint] ** 2
            return d.cpu().numpy()
        return ((b @ g) * b).sum(1).cpu().numpy()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@torch.no_grad()
def block_spectra(layer, stats, weighing: WeightedEnergies | None = None, spread=None,
                  device: torch.device | None = None) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Each linear's whitened spectrum from the block's statistics, as job/stages.factor_block computes it (eig, exact),
    and with `weighing` its weighted energies along the same directions (None without).

    `spread` (World.spread under torchrun) deals the linears to the processes, each solving its own from the
    identical totals and sending the results to all; without it (or for one process) they are solved here in turn.
    `device` (--device; None: the CPU): where each linear's eigh or SVD runs, its weight and statistics moved there
    as it is solved (as job/stages.factor_block does)."""
    whitenings = {}
    linears = linear_modules(layer)
    device = torch.device("cpu") if device is None else device

    def solve(name: str) -> tuple[np.ndarray, np.ndarray | None]:
        # in float64 only a row chunk at a time, except for the unweighted SVD
        w = linears[name].weight.detach().to(device)
        k = min(w.shape)
        u, tall, h = None, None, None  # h: an out x out (W S)(W S)^T, eigendecomposed below
        if name in stats.output_grams:
            h = stats.output_grams.pop(name).gram.to(device, torch.float64)
        else:
            group = stats.group_of[name]
            if group not in whitenings:
                whitenings[group] = whiten(stats.grams.pop(group).gram.to(device), "eig")
            root = whitenings[group].s
            if weighing is None:
                s = torch.linalg.svdvals(w.to(torch.float64) @ root)
            elif w.shape[0] > w.shape[1]:  # the job's tall route: the in x in S^T (W^T W) S, no out x in A or U
                wtw = weight_gram(w)
                evals, v = torch.linalg.eigh(root.T @ wtw @ root)
                s, v = evals.flip(0).clamp_min(0).sqrt(), v.flip(1)
                tall = (v, s, root, wtw)
            else:  # the job's square / wide route: the out x out A A^T, as on the output side (math/factorize._wide_eig)
                a = whitened(w, root)
                h = a @ a.T
                del a
        if h is not None:
            if weighing is None:
                evals = torch.linalg.eigvalsh(h).flip(0)
            else:
                evals, vecs = torch.linalg.eigh(h)
                evals, u = evals.flip(0), vecs.flip(1)[:, :k]
            s = evals.clamp_min(0).sqrt()[:k]
        d = weighing.energies(name, u, w, tall) if weighing is not None else None
        return s.cpu().numpy().astype(np.float64), d

    names = list(linears)
    solved = spread(names, solve) if spread is not None else None
    return {name: solved[name] if solved is not None else solve(name) for name in names}


def _path_tag(path: Path) -> str:
    """12 hex digits naming a folder by its resolved path."""
    return hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:12]


def make_profile(cfg: ProfileConfig, tokenizer=None) -> Profile:
    return Profiler(cfg, tokenizer).run()
