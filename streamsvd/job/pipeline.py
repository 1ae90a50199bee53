"""`streamsvd run`: stream calibration activations through the model block by block and compress.

One block is in memory at a time. For each block: accumulate the Gram of every distinct linear
input (pass 1), factor each linear, then push the inputs through the compressed block to make the
next block's inputs (pass 2). The shard, the spectra and the next inputs are on disk before the
state file says the block is done, so a killed job resumes at the first unfinished block. The
activation files are scratch: if they are lost (another --work-dir, a cleaned /tmp) or a finished
shard was removed, the inputs are rebuilt from the finished blocks instead of starting over.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from .. import __version__, faults, timing
from ..io.activations import DTYPES as ACT_DTYPES
from ..io.activations import ActivationFile, activation_bytes
from ..model.architecture import (
    decoder_layers,
    check_weights_match,
    empty_model,
    layer_prefix,
    linear_modules,
    load_config,
    load_layer,
    check_seqlen,
)
from ..io.calibration import (heldout_windows, load_texts, load_tokenizer, sample_windows, text_digest,
                              warn_thin_statistics, windows_digest)
from ..model.capture import capture_layer_kwargs, first_layer_inputs, layer_args_on, run_layer
from ..io.checkpoint import Checkpoint
from ..io.diskspace import check_free_space
from ..errors import JobMismatch, StreamSVDError
from ..math.compensate import projects_cross
from ..math.factorize import METHODS, PRECISIONS, rank_for_ratio, stored_numel
from ..math.pivot import FACTOR_FORMS
from ..math.quantize import DEFAULT_GROUP_SIZE, DEFAULT_ROUNDING, QUANT_BITS, ROUNDINGS, QuantSpec, stored_linear_bytes
from ..model.quantized import dequantizing_getter, logical_keys
from ..model.lowrank import module_from_tensors, replace_module
from ..model.remote import modeling_source
from ..model.embedding import materialize_base_mapped
from .defaults import DEFAULT_ANCHOR, DEFAULT_REFINE_LR, DEFAULT_REFINE_STEPS
from .device import check_device_flags, hold_to_budget, peak_bytes, resolve_device
from .memory import format_size
from .peak import JobHighWater, PeakSampler
from .plan import COMPENSATE_MAX_IN, SVD_MODES, build_plan, keep_stage, plot_disk_bytes, refuse_if_too_small
from ..io.output import SPECTRA_DIR, OutputWriter
from ..io.plots import plots, read_spectra
from ..math.allocate import (ALLOCATORS, Matrix, allocate, check_smallest_ranks, max_loss, max_ppl_increase,
                             predicted_nll_increase, relative_loss)
from .profile import MAX_HELDOUT, ProfileConfig, check_heldout, make_profile, profile_identity, read_profile
from .evaluate import final_states_nll
from .stages import (FactoredBlock, OriginalInputs, Replay, collect_group_statistics, refine_block, collect_statistics, factor_block, forward_groups, replayable_parts,
                     output_side_linears, quantize_block)
from .state import JobState, fingerprint
from .integrity import JobIntegrity
from .distributed import ReadOnlyOutput, World
from .lock import JobLocked, JobLocks, holder_of, refuse_while_made
from .preflight import check_paths

COMPUTE_DTYPE = torch.float32
CALIBRATE_MODES = ("block", "sequential")
WORK_DIR_NAME = ".streamsvd-work"
OWN_PROFILE = "profile"  # where `run` profiles when no --profile is given
# --max-ppl-increase's held-out windows: 8 x 512 = 4,096 scored tokens for one extra forward of 1/8 of the
# default 64 calibration windows; the figure is a ratio of two perplexities on the same windows, so most of
# the windows' own variation cancels (docs/DESIGN.md).
DEFAULT_HELDOUT = 8


@dataclass
class JobConfig:
    model_dir: Path
    out_dir: Path
    ratio: float = 0.4
    method: str = "eig"
    max_mem: int | None = None
    calib: list[str] = field(default_factory=list)
    calib_samples: int = 64
    seqlen: int = 512
    seed: int = 0
    propagate: str = "compressed"
    act_dtype: str = "float32"
    work_dir: Path | None = None  # where the activation files go (default: inside OUT_DIR)
    progress: bool = True
    restart: bool = False  # remove streamsvd's own files from OUT_DIR and start over
    factors: str = "pivoted"  # stored form of a compressed linear: pivoted (r (m + n - r) numbers) or plain
    svd: str = "auto"  # exact, randomized or auto: the SVD of the whitened weights (job/plan.py choose_svd)
    precision: str = "float64"  # float64 or float32: eig's exact routes (math/factorize.py; the whitening stays float64)
    # where each linear's factorisation runs (job/device.py): cpu, cuda or cuda:N; not part of the job's identity
    device: str = "cpu"
    max_gpu_mem: int | None = None  # the GPU's budget with --device cuda (None: DEFAULT_GPU_SHARE of its free memory)
    # Each input group calibrated on the inputs the block's already-compressed groups give it
    # ("sequential"), or all groups once per block on the block's inputs ("block").
    # None: the measured default (`resolve_defaults`): on wherever the job can do it (eig, compressed
    # propagation), off otherwise, so `--method cholesky` or `--propagate original` still run as before.
    calibrate: str | None = None
    compensate: bool | None = None  # fit the original model's outputs (math/compensate.py); two activation streams
    anchor: float | None = None  # pull toward the original weights: lam = anchor x the Gram's mean diagonal
    refine_steps: int = DEFAULT_REFINE_STEPS  # Adam steps tuning each block's factors to the original block's outputs (0: off)
    refine_lr: float = DEFAULT_REFINE_LR
    # rank allocation (math/allocate.py): uniform, v2 or global; None: the measured default (`resolve_defaults`)
    alloc: str | None = None
    rank_multiple: int = 1  # every rank a multiple of this (or full rank)
    alloc_floor: float = 0.0  # global: every matrix keeps at least this fraction of its uniform rank
    shrink: float = 0.0  # input Grams read as (1 - a) G + a diag(G) when factoring (math/gram.shrink_gram)
    plots: bool = True  # allocation.png and spectra.png at the end (io/plots.py)
    profile: Path | None = None  # a saved `streamsvd profile` to allocate from (else one is made in OUT_DIR/profile)
    # windows of the statistics pass of the profile the job makes for itself (None: job/profile.DEFAULT_PROFILE_SAMPLES)
    profile_samples: int | None = None
    max_loss: float | None = None  # instead of --ratio: the largest relative weighted loss (math/allocate.relative_loss)
    # instead of --ratio: the largest predicted increase of held-out perplexity, a fraction (0.25: +25%), measured
    # on `heldout_samples` windows kept out of every statistic (None: DEFAULT_HELDOUT with the target)
    max_ppl_increase: float | None = None
    heldout_samples: int | None = None
    quant: str | None = None  # int8 or int4: every factor stored quantised per group (math/quantize.py); None: full precision
    group_size: int | None = None  # columns per quantisation group (None: DEFAULT_GROUP_SIZE with --quant)
    quant_rounding: str | None = None  # rtn or gptq (None: DEFAULT_ROUNDING with --quant)
    # windows per batch (None: the plan's, about 2,048 tokens on the CPU and the largest that fits on a GPU, within
    # --max-mem; under torchrun at most a rank's share).
    # Not part of the job's identity: a resumed job keeps the batch size it started with.
    batch_size: int | None = None

    @property
    def quant_spec(self) -> QuantSpec | None:
        if self.quant is None:
            return None
        # Refinement tunes full-precision factors; they are rounded after it, to nearest (the Grams are gone).
        rounding = "rtn" if self.refine_steps else (self.quant_rounding or DEFAULT_ROUNDING)
        return QuantSpec(self.quant, self.group_size or DEFAULT_GROUP_SIZE, rounding=rounding)

    @property
    def targeted(self) -> bool:
        """A quality target (--max-loss, --max-ppl-increase) sets the size: `ratio` is then an unused default."""
        return self.max_loss is not None or self.max_ppl_increase is not None

    @property
    def needs_profile(self) -> bool:
        """Anything but today's per-matrix ranks needs every matrix's spectrum before block 0."""
        self.resolve_defaults()
        return (self.alloc != "uniform" or self.rank_multiple != 1 or self.profile is not None or self.max_loss is not None
                or self.max_ppl_increase is not None)

    @property
    def own_profile_samples(self) -> int:
        """Windows of the statistics pass of the job's own profile (job/profile.py)."""
        from .profile import DEFAULT_PROFILE_SAMPLES

        return DEFAULT_PROFILE_SAMPLES if self.profile_samples is None else self.profile_samples

    @property
    def heldout_rows(self) -> int:
        """Held-out windows the job carries through the compressed model (only with --max-ppl-increase)."""
        if self.max_ppl_increase is None:
            return 0
        return DEFAULT_HELDOUT if self.heldout_samples is None else self.heldout_samples

    def resolve_defaults(self) -> None:
        """Compensation, sequential calibration and the anchor by default where they apply (docs/RESULTS.md:
        at ratio 0.4 on SmolLM2 they lowered held-out perplexity from 107.6 to 82 in the calibration's domain
        and from 1371 to 393 across domains)."""
        possible = self.method == "eig" and self.propagate == "compressed"
        if self.compensate is None:
            self.compensate = possible
        if self.calibrate is None:
            self.calibrate = "sequential" if self.compensate else "block"
        if self.anchor is None:
            self.anchor = DEFAULT_ANCHOR if self.compensate else 0.0
        if self.alloc is None:
            # global (docs/RESULTS.md: lower held-out perplexity than uniform at 0.2, 0.4 and 0.6 on both models, in
            # and across domains), under torchrun too (the profile splits over the processes like the job)
            self.alloc = "global"

    def validate(self) -> None:
        self.resolve_defaults()
        if not 0.0 < self.ratio < 1.0:
            raise StreamSVDError(
                f"--ratio {self.ratio} is out of range", "give the fraction of parameters to remove, between 0 and 1 (e.g. 0.4)"
            )
        if self.method not in METHODS:
            raise StreamSVDError(f"unknown --method {self.method!r}", f"choose one of {', '.join(METHODS)}")
        if self.factors not in FACTOR_FORMS:
            raise StreamSVDError(f"unknown --factors {self.factors!r}", f"choose one of {', '.join(FACTOR_FORMS)}")
        if self.propagate not in ("compressed", "original"):
            raise StreamSVDError(f"unknown --propagate {self.propagate!r}", "choose compressed or original")
        if self.act_dtype not in ACT_DTYPES:
            raise StreamSVDError(f"unknown --act-dtype {self.act_dtype!r}", f"choose one of {', '.join(ACT_DTYPES)}")
        if self.max_mem is not None and self.max_mem <= 0:
            raise StreamSVDError(f"--max-mem {self.max_mem} is not a positive size", "give a budget such as 8G")
        if self.batch_size is not None and self.batch_size < 1:
            raise StreamSVDError(f"--batch-size {self.batch_size} is not positive", "give 1 or more windows, or leave it out")
        if self.calib_samples < 1:
            raise StreamSVDError(f"--calib-samples {self.calib_samples} is not positive", "use at least 1 sample")
        if self.batch_size is not None and self.batch_size > self.calib_samples:  # planned as given: 14.7 TiB for 4
            raise StreamSVDError(f"--batch-size {self.batch_size} is more than the {self.calib_samples} calibration "
                                 "windows", f"give at most {self.calib_samples} (one batch of every window), or leave it out")
        if self.seqlen < 2:
            raise StreamSVDError(f"--seqlen {self.seqlen} is too short", "use at least 2 tokens per window")
        if self.svd not in SVD_MODES:
            raise StreamSVDError(f"unknown --svd {self.svd!r}", f"choose one of {', '.join(SVD_MODES)}")
        if self.precision not in PRECISIONS:
            raise StreamSVDError(f"unknown --precision {self.precision!r}", f"choose one of {', '.join(PRECISIONS)}")
        check_device_flags(self.device, self.max_gpu_mem)
        if self.alloc not in ALLOCATORS:
            raise StreamSVDError(f"unknown --alloc {self.alloc!r}", f"choose one of {', '.join(ALLOCATORS)}")
        if self.rank_multiple < 1:
            raise StreamSVDError(f"--rank-multiple {self.rank_multiple} is not positive", "give 1 or more, e.g. 64")
        if not 0.0 <= self.shrink < 1.0:
            raise StreamSVDError(f"--shrink {self.shrink} is out of range",
                                 "give the weight of the Gram's diagonal, in [0, 1), e.g. 0.3")
        if not 0.0 <= self.alloc_floor <= 1.0:
            raise StreamSVDError(f"--alloc-floor {self.alloc_floor} is out of range",
                                 "give the fraction of its uniform rank every matrix keeps at least, in [0, 1], e.g. 0.5")
        if self.max_loss is not None and not 0.0 <= self.max_loss < 1.0:
            raise StreamSVDError(f"--max-loss {self.max_loss} is out of range",
                                 "give the fraction of the weighted output energy that may be dropped, in [0, 1), e.g. 0.05")
        if self.max_loss is not None and self.alloc == "v2":
            raise StreamSVDError("--max-loss follows the global allocator's order, not v2's", "use --alloc global (or leave --alloc out)")
        if self.max_ppl_increase is not None and not (self.max_ppl_increase > 0 and self.max_ppl_increase <= 1e6):
            raise StreamSVDError(f"--max-ppl-increase {self.max_ppl_increase} is out of range",
                                 "give the largest held-out perplexity increase allowed as a fraction above 0, e.g. 0.25 for +25%")
        if self.max_ppl_increase is not None and self.alloc == "v2":
            raise StreamSVDError("--max-ppl-increase follows the global allocator's order, not v2's",
                                 "use --alloc global (or leave --alloc out)")
        if self.profile_samples is not None:
            if not self.needs_profile:
                raise StreamSVDError("--profile-samples without a profile does nothing (--alloc uniform needs none)",
                                     "drop --profile-samples, or use --alloc global")
            if self.profile is not None:
                raise StreamSVDError("--profile-samples sets the windows of the profile a run makes for itself; with "
                                     "--profile the run makes none", "drop --profile-samples (or --profile)")
            from .profile import DEFAULT_SENSITIVITY, check_profile_samples

            check_profile_samples(self.profile_samples, min(DEFAULT_SENSITIVITY, self.calib_samples))
        if self.heldout_samples is not None and self.max_ppl_increase is None:
            raise StreamSVDError("--heldout-samples without --max-ppl-increase does nothing",
                                 "add --max-ppl-increase F, or drop --heldout-samples")
        if self.heldout_samples is not None and not 1 <= self.heldout_samples <= MAX_HELDOUT:
            raise StreamSVDError(f"--heldout-samples {self.heldout_samples} is out of range",
                                 f"give 1 to {MAX_HELDOUT} held-out windows (default {DEFAULT_HELDOUT})")
        if self.calibrate not in CALIBRATE_MODES:
            raise StreamSVDError(f"unknown --calibrate {self.calibrate!r}", f"choose one of {', '.join(CALIBRATE_MODES)}")
        if not (0.0 <= self.anchor <= 100.0) or self.anchor != self.anchor:
            raise StreamSVDError(f"--anchor {self.anchor} is out of range",
                                 "give a fraction of the Gram's mean diagonal between 0 and 100 (e.g. 0.1; 0 turns it off)")
        if (self.compensate or self.anchor > 0) and self.method != "eig":
            raise StreamSVDError(f"--compensate and --anchor need --method eig, not {self.method}",
                                 "drop --method (eig is the default) or turn compensation off with --no-compensate --anchor 0")
        # flags the method never reads (the output was byte-identical without them; a probe, 2026-12-07)
        unread = [flag for flag, given in ((f"--shrink {self.shrink}", self.method == "svd" and self.shrink > 0),
                                           (f"--svd {self.svd}", self.method == "svd" and self.svd != "auto"),
                                           (f"--precision {self.precision}", self.method != "eig" and self.precision != "float64"))
                  if given]
        if unread:
            raise StreamSVDError(f"{', '.join(unread)} with --method {self.method} does nothing (" +
                                 ("plain SVD reads no activation statistics" if self.method == "svd" else
                                  "--precision sets eig's exact routes") + ")",
                                 f"drop {', '.join(f.split()[0] for f in unread)}, or use --method eig")
        if (self.compensate or self.calibrate == "sequential") and self.propagate != "compressed":
            # name only what is on (it named --compensate beside --no-compensate; a probe, 2026-12-07)
            on = [f for f, given in (("--compensate", self.compensate), ("--calibrate sequential", self.calibrate == "sequential"))
                  if given]
            off = [f for f, given in (("--no-compensate", self.compensate), ("--calibrate block", self.calibrate == "sequential"))
                   if given]
            raise StreamSVDError(f"{' and '.join(on)} need{'s' if len(on) == 1 else ''} the compressed model's activations",
                                 f"drop --propagate original, or add {' '.join(off)}")
        if self.refine_steps < 0 or self.refine_steps > 1_000_000:
            raise StreamSVDError(f"--refine-steps {self.refine_steps} is out of range", "give 0 (off) or a number of steps such as 200")
        if not (self.refine_lr > 0 and self.refine_lr < 1):
            raise StreamSVDError(f"--refine-lr {self.refine_lr} is out of range", "give a small positive step size such as 1e-4")
        check_quant_flags(self.quant, self.group_size, self.quant_rounding)
        if self.refine_steps and self.quant_rounding == "gptq":
            raise StreamSVDError("--quant-rounding gptq cannot follow --refine-steps: refined factors are rounded after "
                                 "refinement, when the input Grams are gone", "drop --quant-rounding (or --refine-steps)")
        if self.refine_steps and self.propagate != "compressed":
            raise StreamSVDError("--refine-steps needs the compressed model's activations", "drop --propagate original")

    @property
    def streams(self) -> int:
        """Activation streams on disk: the compressed model's, and the original model's when compensating."""
        return 2 if self.compensate else 1

    @property
    def grouped(self) -> bool:
        """Whether statistics are collected group by group (job/stages.py collect_group_statistics)."""
        return self.compensate or self.calibrate == "sequential" or self.anchor > 0


def job_identity(cfg: JobConfig, ckpt: Checkpoint, text: str, profile_digest: str | None = None,
                 windows: torch.Tensor | None = None) -> dict:
    """Everything that changes the output bytes; a resume must match it exactly.

    `profile_digest`: the digest of a given --profile; a job that profiles for itself records "own"
    (its profile is fixed by the calibration settings already here). `windows`: the calibration windows, whose token
    ids' digest is recorded (`windows_digest`): a tokenizer changed in MODEL_DIR between a kill and the resume gave
    other windows from the same text, and the resumed job mixed blocks made from both (a probe, 2026-12-07). A state
    recorded before that key existed resumes without it (state.JobState.open).
    """
    cfg.resolve_defaults()
    identity = {
        "checkpoint": ckpt.fingerprint(),
        "ratio": cfg.ratio,
        "method": cfg.method,
        "calib_digest": text_digest(text),
        "calib_samples": cfg.calib_samples,
        "seqlen": cfg.seqlen,
        "seed": cfg.seed,
        "propagate": cfg.propagate,
        "act_dtype": cfg.act_dtype,
        "svd": cfg.svd,
        "version": __version__,
    }
    if windows is not None:
        identity["windows_digest"] = windows_digest(windows)
    if cfg.factors != "plain":
        # Jobs from before pivoted factors were plain and had no such key: they still resume with --factors plain.
        identity["factors"] = cfg.factors
    # Likewise, jobs from before compensation resume when these are at their old behaviour.
    if cfg.calibrate != "block":
        identity["calibrate"] = cfg.calibrate
    if cfg.compensate:
        identity["compensate"] = True
    if cfg.anchor:
        identity["anchor"] = cfg.anchor
    if cfg.refine_steps:
        identity["refine"] = [cfg.refine_steps, cfg.refine_lr]
    # Only when not the defaults, so jobs from before allocation still resume.
    if cfg.alloc != "uniform":
        identity["alloc"] = cfg.alloc
    if cfg.rank_multiple != 1:
        identity["rank_multiple"] = cfg.rank_multiple
    if cfg.shrink:
        identity["shrink"] = cfg.shrink
    if cfg.precision != "float64":  # absent at the default, so jobs from before --precision still resume
        identity["precision"] = cfg.precision
    if cfg.alloc == "global" and cfg.alloc_floor:
        identity["alloc_floor"] = cfg.alloc_floor
    if cfg.max_loss is not None:
        identity["max_loss"] = cfg.max_loss
    if cfg.max_ppl_increase is not None:
        identity["max_ppl_increase"] = [cfg.max_ppl_increase, cfg.heldout_rows]
    if cfg.needs_profile:
        identity["profile"] = profile_digest or "own"
        windows = min(cfg.own_profile_samples, cfg.calib_samples)
        if profile_digest is None and windows < cfg.calib_samples:
            # the own profile's statistics windows (absent: all of them, as before --profile-samples)
            identity["profile_samples"] = windows
    world = World.current()
    if world.active:  # absent for one process: its identity is as before. N ranks sum in another order (job/distributed.py)
        identity["processes"] = world.size
    spec = cfg.quant_spec
    if spec is not None:  # absent without --quant, so unquantised jobs from before still resume
        identity["quant"] = spec.section()
    return identity


def check_quant_flags(quant: str | None, group_size: int | None, rounding: str | None = None) -> None:
    """--quant, --group-size and --quant-rounding, for `run` and `streamsvd quantize`."""
    if rounding is not None and rounding not in ROUNDINGS:
        raise StreamSVDError(f"unknown --quant-rounding {rounding!r}", f"choose one of {', '.join(ROUNDINGS)}")
    if rounding is not None and quant is None:
        raise StreamSVDError("--quant-rounding without --quant does nothing", "add --quant int8 or --quant int4, or drop it")
    if quant is not None and quant not in QUANT_BITS:
        raise StreamSVDError(f"unknown --quant {quant!r}", f"choose one of {', '.join(QUANT_BITS)}")
    if group_size is not None and quant is None:
        raise StreamSVDError("--group-size without --quant does nothing", "add --quant int8 or --quant int4, or drop --group-size")
    if group_size is not None and not 1 <= group_size <= 1 << 20:
        raise StreamSVDError(f"--group-size {group_size} is out of range",
                             f"give the number of input columns sharing one scale, e.g. {DEFAULT_GROUP_SIZE}")


def model_matrices(model) -> list[Matrix]:
    """The matrices allocation ranks, shapes only (no spectrum): every decoder linear of `model` (a meta model is
    enough), as the profile lists them."""
    return [Matrix(layer_prefix(model, i) + name, m.out_features, m.in_features)
            for i, layer in enumerate(decoder_layers(model)) for name, m in linear_modules(layer).items()]


def allocate_ranks(cfg: JobConfig, profile, matrices: list[Matrix]) -> dict[str, int]:
    """Every matrix's rank from `profile` (math/allocate.py) for the job `cfg` on the model of `matrices`
    (model_matrices): what `run` allocates, and `plan` plans, with a given --profile. A profile whose shapes are
    not the model's is refused first."""
    from .profile import check_profile_shapes

    check_profile_shapes(profile, matrices)
    if cfg.max_ppl_increase is not None:
        return max_ppl_increase(profile.matrices(), cfg.max_ppl_increase, cfg.seqlen, cfg.factors,
                                multiple=cfg.rank_multiple, max_relative_loss=cfg.max_loss)
    if cfg.max_loss is not None:
        return max_loss(profile.matrices(), cfg.max_loss, cfg.factors, multiple=cfg.rank_multiple)
    return allocate(cfg.alloc, profile.matrices(), cfg.ratio, cfg.factors,
                    multiple=cfg.rank_multiple, tokens=profile.tokens, floor=cfg.alloc_floor)


class CompressionJob:
    def __init__(self, cfg: JobConfig):
        cfg.validate()
        # run --device: refused here, before anything is read or written, where torch sees no such GPU (job/device.py)
        cfg.torch_device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
        self.cfg = cfg
        self.world = World.current()
        self.ckpt = Checkpoint(cfg.model_dir)
        self.config = load_config(self.ckpt)
        check_seqlen(self.config, cfg.seqlen)
        self.tokenizer = load_tokenizer(self.ckpt.dir)
        self.text, self.text_source = load_texts(cfg.calib)
        check_paths(cfg.model_dir, cfg.out_dir, cfg.work_dir, restart=cfg.restart)
        self.out = OutputWriter(cfg.out_dir, self.ckpt, self.config.num_hidden_layers)
        if not self.world.writes:
            self.out = ReadOnlyOutput(self.out)
        self.model = empty_model(self.config, COMPUTE_DTYPE)
        # Everything that can reject the input runs before anything is written to OUT_DIR.
        self.windows = sample_windows(self.tokenizer, self.text, cfg.calib_samples, cfg.seqlen, cfg.seed)
        self.profile, self.ranks = None, None
        if cfg.profile is not None:
            refuse_while_made(cfg.profile, "--profile")
            self.profile = read_profile(cfg.profile, self._profile_identity())
            JobIntegrity(self).check_given_profile()  # another model's profile: refused before anything is written
            if cfg.max_ppl_increase is not None:
                check_heldout(self.profile, cfg.heldout_rows)
            self.ranks = self._allocate()
        elif not cfg.targeted:  # the allocation's refusal that needs no profile, before profiling (or any write)
            check_smallest_ranks(cfg.alloc, model_matrices(self.model), cfg.ratio, cfg.factors, cfg.rank_multiple)
        self.identity = job_identity(cfg, self.ckpt, self.text, self.profile.digest if self.profile else None,
                                     self.windows)
        self.job_fp = fingerprint(self.identity)
        try:
            self.state = self._open_state()
        except JobMismatch:  # a job running there: its lock is the answer, not "add --restart" (a probe, 2026-12-07)
            holder = holder_of(cfg.out_dir)
            if holder is not None:
                raise JobLocked(f"OUT_DIR {cfg.out_dir} is in use by another streamsvd job: {holder}",
                                "wait for that job to finish (or stop it), or choose another OUT_DIR") from None
            raise
        # a state recorded before the identity had a key resumes under its own fingerprint (JobState.open)
        job_fp = self.job_fp = self.state.fingerprint
        # Under --work-dir, a folder of this job's own, so finishing never removes the user's files.
        self.work = Path(cfg.out_dir) / WORK_DIR_NAME if cfg.work_dir is None else Path(cfg.work_dir) / f"streamsvd-{job_fp[:12]}"
        self.work = self.world.work_folder(self.work)  # under torchrun, each rank's activation files are its own
        if cfg.restart:
            JobIntegrity(self).check_restart_target()
        # --max-ppl-increase: windows that share no token with the calibration windows and enter no statistic;
        # they ride in rows [streams x S, streams x S + H) of the activation files, through the compressed blocks.
        self.all_heldout = heldout_windows(self.tokenizer, self.text, cfg.calib_samples, cfg.seqlen, cfg.seed, cfg.heldout_rows)
        check_weights_match(self.model, self.ckpt)
        self.batch_size = self._batch_size()
        if cfg.torch_device.type == "cuda":
            hold_to_budget(cfg.torch_device, self.plan.gpu_budget_bytes)
        self.share  # refuses a world with more processes than batches
        if not self.state.complete:
            check_free_space(self._disk_needs())

    def _pictures(self, report: dict) -> dict[str, bytes]:
        """allocation.png and spectra.png (io/plots.py); a picture that fails to draw is a warning, never a lost job."""
        try:
            return plots(report, read_spectra(self.out.dir / SPECTRA_DIR))
        except Exception as exc:  # noqa: BLE001 - matplotlib's own failures (fonts, backends) vary by machine
            print(f"warning: the allocation and spectra plots were not drawn ({type(exc).__name__}: {exc})", file=sys.stderr)
            return {}

    # ---------------------------------------------------------------- allocation
    def _profile_identity(self) -> dict:
        return profile_identity(self.ckpt, self.text, self.cfg.calib_samples, self.cfg.seqlen, self.cfg.seed,
                                windows=self.windows)

    def _allocate(self) -> dict[str, int]:
        """Every matrix's rank from the profile (math/allocate.py), all meeting one --ratio budget."""
        return allocate_ranks(self.cfg, self.profile, model_matrices(self.model))

    def _own_profile(self) -> None:
        """No --profile: profile into OUT_DIR/profile first (reused if a killed run already finished it)."""
        cfg = self.cfg
        self._stage("profile")
        self.profile = make_profile(ProfileConfig.for_job(cfg, Path(cfg.out_dir) / OWN_PROFILE, work_dir=self.work),
                                    tokenizer=self.tokenizer)
        if cfg.max_ppl_increase is not None:
            check_heldout(self.profile, cfg.heldout_rows)
        digest = self.profile.digest
        if self.state.profile_digest is None:
            self.state.profile_digest = digest
            self.state.save(self.out.dir)
        elif self.state.profile_digest != digest:
            raise StreamSVDError(f"the profile in {Path(cfg.out_dir) / OWN_PROFILE} is not the one this job allocated its "
                                 f"finished blocks from (digest {self.state.profile_digest}, now {digest}): it was changed "
                                 "or replaced since", "start the job again with --restart (it profiles anew)")
        if not self.profile.reused:  # the cost goes to this run's figures, not the (deterministic) report
            self.profile_figures = {"profile_" + k: v for k, v in self.profile.timing.items()}
        self.ranks = self._allocate()
        profiled = self.plan  # its `profile` stage: the profile this run made (its peak belongs in this run's plan)
        # The plan again with the allocated ranks (a block may hold larger factors than uniform's); same batch,
        # unless it no longer fits and nothing was streamed with it yet: the batch came from the plan of uniform
        # ranks (the allocation was not known), so a fresh job takes the largest batch that fits these ranks.
        self.plan = build_plan(cfg, self.ckpt, fixed_batch=self.batch_size, ranks=self.ranks, processes=self.world.size)
        if not self.world.all_true(self.plan.fits()) and self.state.blocks_done == 0 and not cfg.batch_size:
            before, self.state.batch_size = self.batch_size, None
            self.batch_size = self._batch_size()  # refuses a budget that even batch 1 of these ranks exceeds
            self.state.batch_size = self.batch_size
            self.state.save(self.out.dir)
            if self.world.writes:
                tqdm.write(f"streamsvd: batch {before} -> {self.batch_size}: the allocated ranks need more memory than "
                           "uniform ones at this --max-mem", file=sys.stderr)
        if self.state.blocks_done == 0:  # a fresh job's --batch-size, not an interrupted job's kept batch
            self._refuse_batch_size(" with the ranks allocated from the profile")
        refuse_if_too_small(self.plan, resumed=True)
        if not self.profile.reused:
            keep_stage(self.plan, profiled, "profile")  # the run's planned peak against its measured one

    def _forget_unchecked(self) -> None:
        """A resume whose MODEL_DIR files changed (size, mtime or inode) before any block was finished: the finished
        blocks' digests are what tells a copy or a touch from other weights (integrity.check_model_unchanged), and
        there are none yet, so what a killed run made from the whole model may be another model's: the profile
        (every matrix's spectrum, which the ranks come from) and block 0's inputs (from the embeddings). Both are
        made again rather than trusted."""
        self.state.inputs_file = self.state.inputs_digest = None
        own = Path(self.cfg.out_dir) / OWN_PROFILE
        if self.cfg.needs_profile and self.profile is None and (own.exists() or self.state.profile_digest is not None):
            if self.world.writes:
                import shutil

                shutil.rmtree(own, ignore_errors=True)
                tqdm.write(f"streamsvd: the files of MODEL_DIR {self.ckpt.dir} changed since this job profiled them "
                           "(size, time or inode) and no finished block can tell whether the weights did: profiling "
                           "again", file=sys.stderr)
            self.state.profile_digest = None
            self.world.barrier()

    def _rank(self, full_name: str, m: int, n: int) -> int:
        return self.ranks[full_name] if self.ranks is not None else rank_for_ratio(m, n, self.cfg.ratio, self.cfg.factors)

    # ---------------------------------------------------------------- setup
    def _batch_size(self) -> int:
        """The plan's batch size (job/plan.py); a resumed job keeps its own. Refuses a budget that cannot hold.

        --batch-size fixes it. Under torchrun every rank takes the smallest of the ranks' plans, at most a
        rank's share of the windows (job/distributed.py), so that every rank has batches to stream."""
        cfg, world = self.cfg, self.world
        if self.state.batch_size and self.state.blocks_done == 0 and not cfg.batch_size and not world.all_true(
                build_plan(cfg, self.ckpt, fixed_batch=self.state.batch_size, ranks=self.ranks,
                           processes=world.size).fits()):
            # A resume at a lower --max-mem before any block was finished: no output was made with the killed run's
            # batch yet, so this budget's batch (and block 0's inputs again) rather than a refusal to keep it.
            if world.writes:
                tqdm.write(f"streamsvd: the interrupted job's batch of {self.state.batch_size} does not fit this --max-mem "
                           "and no block was finished with it: planning the batch again", file=sys.stderr)
            self.state.batch_size = None
            self.state.inputs_file = self.state.inputs_digest = None
        fixed = self.state.batch_size or cfg.batch_size or None
        if self.state.batch_size and cfg.batch_size and cfg.batch_size != self.state.batch_size:
            raise StreamSVDError(f"--batch-size {cfg.batch_size} differs from the interrupted job's {self.state.batch_size}",
                                 f"resume with --batch-size {self.state.batch_size} (or leave it out)")
        fixed = world.agreed_batch(fixed, lambda: build_plan(cfg, self.ckpt, ranks=self.ranks, processes=world.size).batch_size)
        self.plan = build_plan(cfg, self.ckpt, fixed_batch=fixed, ranks=self.ranks, processes=world.size)
        refuse_if_too_small(self.plan, resumed=bool(self.state.batch_size))
        if not self.state.batch_size:
            self._refuse_batch_size()
        return self.plan.batch_size

    def _refuse_batch_size(self, why: str = "") -> None:
        """A --batch-size whose plan exceeds --max-mem (a fresh job's own choice, not a resumed job's kept batch)."""
        if self.cfg.batch_size and self.plan.peak_bytes > self.plan.budget_bytes:
            raise StreamSVDError(f"--batch-size {self.cfg.batch_size} needs {format_size(self.plan.peak_bytes)}{why}, more "
                                 f"than --max-mem {format_size(self.plan.budget_bytes)}",
                                 "give a smaller --batch-size, or leave it out")

    @property
    def share(self) -> tuple[int, int]:
        """This process's windows [lo, hi) of the job's (all of them for one process; job/distributed.py)."""
        return self.world.share(self.cfg.calib_samples, self.batch_size)

    @property
    def samples(self) -> int:
        """Calibration windows this process streams (all of them for one process)."""
        return self.share[1] - self.share[0]

    @property
    def heldout(self) -> torch.Tensor:
        """The held-out windows this process streams: all of them, or under torchrun its run of their batches (maybe
        none), like its share of the calibration windows."""
        if not len(self.all_heldout):
            return self.all_heldout
        lo, hi = self.world.share(len(self.all_heldout), self.batch_size, allow_empty=True)
        return self.all_heldout[lo:hi]

    def _quant_while_factoring(self) -> QuantSpec | None:
        """Factors are quantised as each linear is factored (its Gram at hand for GPTQ, and the block's later
        groups calibrated on the quantised earlier ones); with refinement, after it (round-to-nearest: the
        Grams are gone by then), since refinement tunes full-precision factors."""
        return self.cfg.quant_spec if not self.cfg.refine_steps else None

    def _stage(self, name: str) -> None:
        """Charge the RSS samples from now on to stage `name` (the plan's stage names)."""
        self.world.stage = name
        if getattr(self, "sampler", None) is not None:
            self.sampler.stage(name)

    def _disk_needs(self) -> dict[Path, int]:
        """Bytes still to be written: the rest of the output, and the two activation files."""
        act = self._activation_nbytes()
        work = sum(act for name in ("acts-0.bin", "acts-1.bin") if not _has_size(self.work / name, act))
        work += self.plan.disk.get("original inputs", 0)  # one block's stash of the original inputs (compensation)
        work += self.plan.disk.get("replayed inputs", 0)  # one block's saved inputs of o_proj and down_proj (Replay)
        out = sum(p.stat().st_size for p in self.out.other_files()) + len(modeling_source())  # + the remote code
        if not self.state.extra_shard_done:
            out += sum(self.ckpt.nbytes(k) for k in self.out.extra_names())
        layers = decoder_layers(self.model)
        for index in range(self.state.blocks_done, len(layers)):
            prefix = layer_prefix(self.model, index)
            linears = linear_modules(layers[index])
            block = sum(self.ckpt.nbytes(k) for k in self.ckpt.keys() if k.startswith(prefix))
            for name, linear in linears.items():
                m, n = linear.out_features, linear.in_features
                rank = self._rank(prefix + name, m, n)
                itemsize = self.ckpt.nbytes(prefix + name + ".weight") // (m * n)
                factored = stored_linear_bytes(m, n, rank, self.cfg.factors, itemsize, self.cfg.quant_spec)  # pivots too
                block += factored - m * n * itemsize + min(m, n) * 4  # factors - weight + spectrum
            out += block
        if self.cfg.plots:  # written at the end, whatever is left to do
            out += plot_disk_bytes(sum(len(linear_modules(layer)) for layer in layers))
        return {Path(self.cfg.out_dir): out, self.work: work}

    def _activation_shape(self) -> tuple[int, int, int]:
        """The compressed model's stream in samples [0, S); when compensating, the original's in [S, 2S); then the
        held-out windows (--max-ppl-increase; this process's run of them under torchrun), through the compressed
        blocks."""
        return (self.samples * self.cfg.streams + len(self.heldout), self.cfg.seqlen, self.config.hidden_size)

    @property
    def _heldout_base(self) -> int:
        return self.samples * self.cfg.streams

    def _activation_file(self, name: str, create: bool) -> ActivationFile:
        return ActivationFile(self.work / name, self._activation_shape(), self.cfg.act_dtype, create=create)

    def _inner_bars(self) -> bool:
        """Per-batch bars only on a terminal: in a log file they would bury the per-block bar."""
        return self.cfg.progress and sys.stderr.isatty()

    def _batches(self, n: int):
        for start in range(0, n, self.batch_size):
            yield start, min(n, start + self.batch_size)

    # ---------------------------------------------------------------- run
    def run(self, on_block_done=None) -> dict:
        """Under the locks of OUT_DIR and the work directory (one job per folder), released however it ends."""
        self.locks = JobLocks()
        try:
            return self._run_locked(on_block_done)
        finally:
            self.locks.release()

    def settings(self) -> dict:
        """The job identity as the state file records it (JSON values, as `fingerprint` hashes them)."""
        return json.loads(json.dumps(self.identity, default=str))

    def _open_state(self) -> JobState:
        return JobState.open(self.cfg.out_dir, self.job_fp, n_layers=self.config.num_hidden_layers,
                             calib_samples=self.cfg.calib_samples, restart=self.cfg.restart,
                             settings=self.settings())

    def _run_locked(self, on_block_done=None) -> dict:
        started = time.time()
        self.cpu_started = _cpu_seconds()
        integrity = JobIntegrity(self)
        world = self.world
        world.agree(integrity.lock)
        if self.cfg.restart:
            world.on_rank0(integrity.remove_own_files)
            integrity.reset_state()
        elif world.on_rank0(integrity.reread_state):
            self.state = world.from_rank0(self.state)  # under torchrun, rank 0's state is every rank's
            self.batch_size = self._batch_size()
        self.state = world.from_rank0(self.state)
        self.out.written = self.state.files
        repaired = []
        if self.state.complete:
            repaired = world.on_rank0(integrity.reopen_if_damaged)
            self.state = world.from_rank0(self.state)
            if not repaired:
                integrity.remove_scratch()
                return {**self.out.read_report(), "this_run": self.out.last_run()}
        self.high_water = JobHighWater()
        self.sampler = PeakSampler().start()
        self.work_before = timing.snapshot()
        self.refinements: dict[str, dict] = {}  # block -> refine_block's figures, this run's blocks
        try:
            return self._run(started, integrity, repaired, on_block_done)
        finally:
            self.sampler.stop()

    def _run(self, started: float, integrity: JobIntegrity, repaired: list, on_block_done) -> dict:
        if self.world.writes:  # once the input is accepted (a refusal is its error and fix lines alone), before the work
            widest = max(model_matrices(self.model), key=lambda m: m.n)
            warn_thin_statistics(self.cfg.calib_samples, self.cfg.seqlen, (widest.name.rsplit(".", 1)[-1], widest.n))
        self._stage("embed")
        self.state.batch_size = self.batch_size
        self.world.agree(integrity.check_model_unchanged)
        if self.state.blocks_done == 0 and integrity.model_files_changed:
            self._forget_unchecked()
        self.state.save(self.out.dir)
        self.out.prepare()
        self.work.mkdir(parents=True, exist_ok=True)
        if self.cfg.needs_profile and self.profile is None:
            self._own_profile()
        elif self.profile is not None:
            tqdm.write(f"streamsvd: profile reused: {self.cfg.profile} (no profiling)", file=sys.stderr)
            if not self.profile.meta.get("meta_sha256") or not self.profile.meta.get("tensor_sha256"):
                # made before 2026-12-06, or its digests removed: a hand edit or another model's profile of the same
                # shapes cannot be told from it (a probe gave another model's profile so, and it was used)
                print(f"warning: the profile in {self.cfg.profile} records no checksums of its content or of the weights "
                      "it measured, so an edit or another model's profile cannot be told from it\n"
                      "  fix: make the profile again with `streamsvd profile` (and the run's calibration flags)",
                      file=sys.stderr)
            if self.profile.meta.get("sensitivity") and self.profile.weighted is None:
                print(f"warning: the profile in {self.cfg.profile} predates token-weighted sensitivity, so the ranks come "
                      "from one weight per matrix (on Gemma 3 that was worse than uniform at ratio 0.6, docs/RESULTS.md)\n"
                      "  fix: make the profile again with `streamsvd profile` for the better allocation", file=sys.stderr)
        materialize_base_mapped(self.model, self.ckpt, COMPUTE_DTYPE)
        self.layer_args = capture_layer_kwargs(self.model, self.windows[:1])
        self._restore_inputs()
        if not self.state.extra_shard_done:
            self._stage("extra shard")
            self.ckpt.read_digests = {}
            self.out.write_extra_shard()
            integrity.check_profile_matches(None)
            self.state.weights["extra"] = integrity.digest_of_reads()
            self.state.extra_shard_done = True
            self.state.save(self.out.dir)
            faults.point("state-saved")
        n_layers = len(decoder_layers(self.model))
        bar = tqdm(total=n_layers, initial=self.state.blocks_done, desc="blocks", unit="block", disable=not self.cfg.progress)
        for index in range(self.state.blocks_done, n_layers):
            self._compress_block(index)
            bar.update(1)
            if on_block_done is not None:
                on_block_done(index)
        bar.close()
        self.heldout_figures = self._measure_heldout() if self.cfg.heldout_rows else None  # every process takes part
        self._stage("write")
        report = self._report()
        pictures = {}
        if self.cfg.plots and self.world.writes:
            self._stage("plots")
            pictures = self._pictures(report)
            self._stage("write")
        if pictures:
            report["plots"] = sorted(pictures)
        figures = {}
        # under torchrun, every process's peak and time split, and what its collectives moved (absent for one process)
        per_process = self.world.gather(self._process_figures(), "figures") if self.world.active else None

        def complete():  # the state says complete before the index exists: an unfinished job never has one
            figures.update(self.out.log_run({
                "seconds": round(time.time() - started, 2),
                # this process's CPU time over the same span, every thread's: beside `threads`, how busy they were
                # (well under threads x seconds on a machine shared with other work: README)
                "cpu_seconds": round(_cpu_seconds() - self.cpu_started, 1),
                "batch_size": self.batch_size,
                # under torchrun: how many processes, and each one's windows [lo, hi) (absent for one process)
                **({"processes": self.world.size, "windows_per_process": self.world.shares(self.cfg.calib_samples, self.batch_size)}
                   if self.world.active else {}),
                **getattr(self, "profile_figures", {}),
                **self._memory_figures(),
                **({"per_process": per_process} if per_process else {}),
                **({"refinement": self.refinements} if self.refinements else {}),
            }))
            self.state.complete = True
            self.state.inputs_file = self.state.inputs_digest = None
            self.state.save(self.out.dir)
            faults.point("state-saved")

        self.out.finish(self._config_section(), report, before_index=complete, pictures=pictures)
        integrity.remove_scratch()
        result = {**report, "this_run": figures}
        if repaired:
            result["repaired"] = repaired
        return result

    # ---------------------------------------------------------------- resume
    def _restore_inputs(self) -> None:
        """Make sure the inputs of the first unfinished block are on disk, whatever was lost since.

        A finished block whose files are gone or damaged is done again (with every block after it);
        lost activation files are rebuilt by running the finished blocks again, exactly as they ran
        (same layers, same batches), so the output stays byte-identical to an uninterrupted run.
        """
        state = self.state
        integrity = JobIntegrity(self)
        if state.extra_shard_done and not self.world.from_rank0(self.out.extra_intact()):
            integrity.forget_extra()
        # under torchrun rank 0's look at OUT_DIR decides for every rank (the others adopt its state)
        intact = self.world.from_rank0(next((i for i in range(state.blocks_done) if not self.out.block_intact(i)),
                                            state.blocks_done))
        if intact < state.blocks_done:
            tqdm.write(f"streamsvd: the files of finished block {intact} are missing or damaged; redoing from block {intact}",
                       file=sys.stderr)
            integrity.rewind(intact)
        elif state.blocks_done == len(decoder_layers(self.model)) and not self.cfg.heldout_rows:
            return  # every block is done: finishing needs no activations (the held-out windows' final states aside)
        elif state.inputs_file is not None and integrity.inputs_trusted():
            return
        elif state.blocks_done and self.world.writes:  # said once: under torchrun every process rebuilds its own
            where = f"the processes' folders in {self.work.parent}" if self.world.active else str(self.work)
            tqdm.write(f"streamsvd: the activation files in {where} are gone or cannot be trusted; rebuilding them "
                       f"from the {state.blocks_done} finished block(s)", file=sys.stderr)
        # The record goes before any activation file is overwritten: a kill during the rebuild then
        # leaves no file that the next resume trusts.
        state.inputs_file = state.inputs_digest = None
        state.save(self.out.dir)
        name = self._embed(self.windows[self.share[0]:self.share[1]])
        for index in tqdm(range(state.blocks_done), desc="rebuild", unit="block", leave=False, disable=not self.cfg.progress or not state.blocks_done):
            layer = self._finished_layer(index)
            src = self._activation_file(name, create=False)
            name = _other(name)
            dst = self._activation_file(name, create=True)
            self._stage("propagate")
            self._propagate(layer, index, src, dst, desc=f"block {index} rebuild")
            if self.heldout.shape[0]:
                self._propagate_heldout(layer if self.cfg.propagate == "compressed" else self._finished_layer(index, compressed=True),
                                        index, src, dst)
            del layer  # before the original loads: one block at a time, as when it was made
            if self.cfg.streams == 2:
                original = self._load_layer(index)
                self._propagate(original, index, src, dst, desc=f"block {index} rebuild (original)", stream=1)
                del original  # before the next block loads
            dst.sync()
            faults.point("rebuild-block")
        state.inputs_file, state.inputs_digest = name, integrity.activation_digest(name)
        state.save(self.out.dir)
        faults.point("state-saved")

    def _finished_layer(self, index: int, compressed: bool = False) -> nn.Module:
        """Block `index` as it was when its outputs were propagated: compressed from OUT_DIR, or original
        (`compressed`: the compressed one whatever --propagate says, for the held-out windows)."""
        layer = self._load_layer(index)
        if self.cfg.propagate == "original" and not compressed:
            return layer
        prefix = layer_prefix(self.model, index)
        with safe_open(str(self.out.block_path(index)), framework="pt", device="cpu") as f:
            stored, get = set(f.keys()), f.get_tensor
            spec = self.cfg.quant_spec
            if spec is not None:
                get, stored = dequantizing_getter(get, stored, spec.bits, spec.group_size), logical_keys(stored)
            for name in linear_modules(layer):
                replace_module(layer, name, module_from_tensors(get, stored, prefix + name, COMPUTE_DTYPE).to(self.cfg.torch_device))
        return layer

    def _activation_nbytes(self) -> int:
        return activation_bytes(self._activation_shape(), self.cfg.act_dtype)

    def _embed(self, windows: torch.Tensor) -> str:
        acts = self._activation_file("acts-0.bin", create=True)
        for start, stop in tqdm(list(self._batches(len(windows))), desc="embed", leave=False, disable=not self._inner_bars()):
            hidden = first_layer_inputs(self.model, windows[start:stop])
            for stream in range(self.cfg.streams):  # both streams start from the same embeddings
                acts.write(stream * len(windows) + start, hidden)
            faults.point("activation-batch")
        for start, stop in self._batches(len(self.heldout)):
            acts.write(self._heldout_base + start, first_layer_inputs(self.model, self.heldout[start:stop]))
        acts.sync()
        return acts.path.name

    def _bar(self, desc: str):
        return tqdm(list(self._batches(self.samples)), desc=desc, leave=False, disable=not self._inner_bars())

    def _load_layer(self, index: int) -> nn.Module:
        """Block `index` as stored, on the job's device (run --device: the block forwards run there too)."""
        return load_layer(self.model, index, self.ckpt, COMPUTE_DTYPE).to(self.cfg.torch_device)

    def _forward(self, index: int):
        """forward(layer, hidden): the block on a batch read from disk, on the job's device (the batch moved there;
        what it gives back stays there until the activation file, a statistic or the next forward takes it)."""
        device = self.cfg.torch_device
        args, kwargs = layer_args_on(self.layer_args[index], device)
        return lambda layer, hidden: run_layer(layer, hidden.to(device), args, kwargs)

    @torch.no_grad()
    def _propagate(self, layer: nn.Module, index: int, src: ActivationFile, dst: ActivationFile, desc: str,
                   stream: int = 0, replay: Replay | None = None) -> None:
        """The calibration windows of `stream` through `layer`; `replay`: its finished parts from their saved inputs."""
        forward = self._forward(index)
        base = stream * self.samples
        with replay.replaying() if replay is not None else contextlib.nullcontext():
            for start, stop in self._bar(desc):
                if replay is not None:
                    replay.batch = (start, stop)
                dst.write(base + start, forward(layer, src.read(base + start, base + stop)))
                faults.point("activation-batch")

    @torch.no_grad()
    def _propagate_heldout(self, layer: nn.Module, index: int, src: ActivationFile, dst: ActivationFile) -> None:
        """The held-out windows through the compressed block (whatever --propagate says for the calibration rows)."""
        forward, base = self._forward(index), self._heldout_base
        for start, stop in self._batches(len(self.heldout)):
            dst.write(base + start, forward(layer, src.read(base + start, base + stop)))

    def _measure_heldout(self) -> dict:
        """After the last block: the compressed model's perplexity on the held-out windows (final norm and head)."""
        self._stage("heldout")
        final = self._activation_file(self.state.inputs_file, create=False)
        base = self._heldout_base
        total, count = final_states_nll(self.model, self.ckpt, lambda a, b: final.read(base + a, base + b), self.heldout,
                                        COMPUTE_DTYPE, world=self.world)
        return {"tokens": count, "nll_per_token": total / count, "perplexity": math.exp(total / count)}

    # ---------------------------------------------------------------- one block
    @torch.no_grad()
    def _compress_block(self, index: int) -> None:
        """Statistics, factors, propagation, commit: the stages in job/stages.py, in order."""
        cfg = self.cfg
        prefix = layer_prefix(self.model, index)
        self.world.block = index
        self.ckpt.read_digests = {}
        self._stage("statistics")
        layer = self._load_layer(index)
        src = self._activation_file(self.state.inputs_file, create=False)
        dst_name = _other(self.state.inputs_file)
        dst = self._activation_file(dst_name, create=True)
        replay = None
        if cfg.grouped:
            block, replay = self._calibrate_groups(layer, index, prefix, src, dst)
        else:
            stats = collect_statistics(
                layer, self._bar(f"block {index} stats"), src.read, self._forward(index),
                on_output=dst.write if cfg.propagate == "original" else None,
                output_side=self._output_side(layer),
            )
            self.world.reduce_statistics(stats)
            self._stage("factorize")
            block = factor_block(layer, prefix, self.ckpt, stats, cfg.ratio, cfg.method, COMPUTE_DTYPE, factors=cfg.factors,
                                 svd=cfg.svd, ranks=self.ranks, quant=self._quant_while_factoring(), shrink=cfg.shrink,
                                 spread=self.world.spread, precision=PRECISIONS[cfg.precision],
                                 device=cfg.torch_device)
            del stats  # the Grams are not needed past here
        if cfg.refine_steps:
            self._refine(layer, index, prefix, block, src, dst)
        if cfg.quant_spec is not None and self._quant_while_factoring() is None:
            self._stage("quantize")
            quantize_block(layer, prefix, block, cfg.quant_spec, COMPUTE_DTYPE)
        self._stage("propagate")
        if cfg.propagate == "compressed":
            # refinement (and the quantize stage, which runs only after it) changed factors after their inputs were saved
            self._propagate(layer, index, src, dst, desc=f"block {index} propagate",
                            replay=None if cfg.refine_steps else replay)
        if replay is not None:
            replay.remove()
        if self.heldout.shape[0]:
            self._propagate_heldout(layer, index, src, dst)
        dst.sync()
        self._stage("write")
        digest = JobIntegrity(self).activation_digest(dst_name)
        JobIntegrity(self).check_profile_matches(index)
        self.state.weights[str(index)] = JobIntegrity(self).digest_of_reads()
        self.out.write_block(index, block.tensors, block.spectra)
        self.state.modules.update(block.records)
        self.state.blocks_done = index + 1
        self.state.inputs_file, self.state.inputs_digest = dst_name, digest
        self.state.save(self.out.dir)
        faults.point("state-saved")

    def _calibrate_groups(self, layer: nn.Module, index: int, prefix: str, src: ActivationFile,
                          dst: ActivationFile) -> tuple[FactoredBlock, Replay | None]:
        """Statistics and factors group by group (sequential), or all groups in one pass, with compensation.

        When compensating, the untouched block runs on the original model's stream (samples [S, 2S)
        of the activation files) beside the compressed one, whole and once per block: the first pass
        writes its outputs (the next block's original inputs) and its inputs to the later groups.
        """
        cfg, samples = self.cfg, self.samples
        forward = self._forward(index)
        original = self._load_layer(index) if cfg.compensate else None
        groups = forward_groups(layer, src.read(0, 1), forward)
        passes = [[g] for g in groups] if cfg.calibrate == "sequential" else [groups]
        # Compensation and the anchor need a linear's in x in statistics, so a linear the plain job factors
        # on its output side (down_proj) moves to the input side, unless its input is wider than
        # COMPENSATE_MAX_IN (job/plan.py: a 70B down_proj), where it keeps the output side uncompensated.
        # Measured on SmolLM2: leaving down_proj uncompensated loses the whole gain (docs/RESULTS.md).
        output_side = self._output_side(layer)
        block = FactoredBlock()
        # With compensation over several passes the original block runs once, in the first, and leaves its
        # inputs to the later groups' leaders on disk (stages.OriginalInputs) for the later passes to pair with.
        stash = self._original_inputs(layer, passes, output_side) if cfg.compensate and len(passes) > 1 else None
        # Group by group, the later passes and the propagate stage replay the finished attention and MLP from their
        # last linear's saved inputs instead of running them again (stages.Replay): the same bits, less work.
        replay = None
        if len(passes) > 1:
            parts = replayable_parts(layer, src.read(0, 1), forward)
            replay = Replay(self.work, self.samples, cfg.seqlen, layer, parts) if parts else None
        energies: dict[str, list[float]] = {}
        try:
            for i, target in enumerate(passes):
                last = i == len(passes) - 1
                self._stage("statistics")
                stats = collect_group_statistics(
                    layer, target, self._bar(f"block {index} stats {i + 1}/{len(passes)}"), src.read, forward,
                    stop_before=None if last else passes[i + 1][0][0], original=original,
                    read_original=lambda a, b: src.read(samples + a, samples + b),
                    on_original_output=lambda start, out: dst.write(samples + start, out), output_side=output_side,
                    stash=stash, energies=energies, replay=replay,
                )
                # The first pass ran the untouched block (whole when stashing; the only pass otherwise): it goes
                # before any factorisation, so the factorize stage holds one copy of the block's weights (job/plan.py)
                original = None
                self.world.reduce_statistics(stats)
                self._stage("factorize")
                factor_block(layer, prefix, self.ckpt, stats, cfg.ratio, cfg.method, COMPUTE_DTYPE, factors=cfg.factors,
                             svd=cfg.svd, names=[n for g in target for n in g], anchor=cfg.anchor, block=block,
                             finish=last, ranks=self.ranks, quant=self._quant_while_factoring(), shrink=cfg.shrink,
                             spread=self.world.spread, precision=PRECISIONS[cfg.precision], device=cfg.torch_device)
                del stats
                if replay is not None:
                    replay.done_factoring(n for g in target for n in g)
        finally:
            if stash is not None:
                stash.remove()
        return block, replay

    def _original_inputs(self, layer: nn.Module, passes: list[list[list[str]]], output_side: set[str]) -> OriginalInputs:
        """The stash of the original block's inputs to the later passes' input-side leaders (stages.OriginalInputs)."""
        linears = linear_modules(layer)
        later = [g for target in passes[1:] for g in target]
        stashed = [g for g in later if any(n not in output_side for n in g)]
        outputs = {g[0] for g in stashed if projects_cross(linears[g[0]].out_features, linears[g[0]].in_features, len(g) == 1)}
        leaders = {g[0]: linears[g[0]].out_features if g[0] in outputs else linears[g[0]].in_features for g in stashed}
        return OriginalInputs(self.work, self.samples, self.cfg.seqlen, leaders, outputs)

    def _output_side(self, layer: nn.Module) -> set[str]:
        """The linears factored from their output Gram (job/plan.py factor_route). Compensation, the anchor and
        GPTQ rounding need a linear's input Gram, so with any of them a linear moves to the input side unless its
        input is wider than COMPENSATE_MAX_IN (measured: an output-side down_proj rounded to nearest at int4
        took SmolLM2's perplexity to thousands; docs/RESULTS.md)."""
        cfg = self.cfg
        output_side = output_side_linears(layer, cfg.method)
        spec = cfg.quant_spec
        if cfg.compensate or cfg.anchor > 0 or (spec is not None and spec.rounding == "gptq"):
            linears = linear_modules(layer)
            output_side = {n for n in output_side if linears[n].in_features > COMPENSATE_MAX_IN}
        return output_side

    def _refine(self, layer: nn.Module, index: int, prefix: str, block: FactoredBlock, src: ActivationFile,
                dst: ActivationFile) -> None:
        """Tune the block's factors toward the original block's outputs (job/stages.py refine_block).

        The target is what the original model gives at this boundary: with compensation, the original
        stream's outputs the last pass wrote; otherwise the original block run on the compressed inputs.
        """
        cfg, samples = self.cfg, self.samples
        self._stage("refine")
        forward = self._forward(index)
        if cfg.compensate:
            target = lambda a, b: dst.read(samples + a, samples + b).to(cfg.torch_device)  # noqa: E731  (run --device)
        else:
            original = self._load_layer(index)
            target = lambda a, b: forward(original, src.read(a, b))  # noqa: E731
        r = refine_block(layer, prefix, block, src.read, target, forward, cfg.calib_samples, self.batch_size,
                         cfg.refine_steps, cfg.refine_lr, COMPUTE_DTYPE, seed=cfg.seed + index, world=self.world,
                         share=self.share)
        self.refinements[str(index)] = asdict(r)
        if cfg.progress:
            tqdm.write(f"block {index}: refined {r.steps} steps (kept step {r.best_step}), held-out relative error "
                       f"{r.heldout_before:.4g} -> {r.heldout_after:.4g}, {r.seconds:.1f} s", file=sys.stderr)

    # ---------------------------------------------------------------- summary
    def _config_section(self) -> dict:
        return {
            "version": __version__,
            "method": self.cfg.method,
            "ratio": None if self.cfg.targeted else self.cfg.ratio,  # a quality target: no ratio was asked for
            "ranks": {name: m["rank"] for name, m in self.state.modules.items()},
            "calibration": {
                "source": self.text_source,
                "samples": self.cfg.calib_samples,
                "seqlen": self.cfg.seqlen,
                "seed": self.cfg.seed,
            },
            "propagate": self.cfg.propagate,
            **self._factors_section(),
            **self._allocation_section(),
            **({"quantization": self.cfg.quant_spec.section()} if self.cfg.quant_spec is not None else {}),
        }

    def _allocation_section(self) -> dict:
        """How the ranks were chosen; absent for today's uniform ranks, so older outputs keep their bytes."""
        if not self.cfg.needs_profile:
            return {}
        meta = self.profile.meta
        given = self.cfg.profile is not None
        targeted = self.cfg.targeted
        return {"allocation": {
            "alloc": "global" if targeted else self.cfg.alloc,
            "rank_multiple": self.cfg.rank_multiple,
            "alloc_floor": self.cfg.alloc_floor if self.cfg.alloc == "global" and not targeted else None,
            "max_loss": self.cfg.max_loss,
            # predicted: the weighted truncation loss the profile's spectra give for these ranks (0 = none dropped)
            "relative_loss": relative_loss(self.profile.matrices(), self.ranks),
            "profile": {
                "dir": str(self.cfg.profile) if given else f"OUT_DIR/{OWN_PROFILE}",  # the same bytes whatever OUT_DIR is
                "digest": self.profile.digest,
                # "profile reused": a given profile, no profiling in this job; else the cost of making it
                "profiling": "profile reused" if given else "profiled by this job",
                "sensitivity_samples": meta.get("sensitivity_samples", 0),
                # windows of its statistics pass (the spectra): the first ones of the calibration
                "profile_samples": self.profile.statistics_samples,
            },
            **self._perplexity_target(),
        }}

    def _perplexity_target(self) -> dict:
        """--max-ppl-increase: the original's held-out perplexity (the profile's), the target, the prediction the
        ranks were chosen by, and what the compressed model measured on the same windows."""
        if self.cfg.max_ppl_increase is None:
            return {}
        original = self.profile.meta["heldout"]["perplexity"]
        delta = predicted_nll_increase(self.profile.matrices(), self.ranks, self.cfg.seqlen)
        target = original * (1 + self.cfg.max_ppl_increase)
        measured = self.heldout_figures["perplexity"]
        return {
            "max_ppl_increase": self.cfg.max_ppl_increase,
            "heldout_samples": self.cfg.heldout_rows,
            "heldout_tokens": self.heldout_figures["tokens"],
            "original_ppl": original,
            "target_ppl": target,
            "predicted_ppl": original * math.exp(delta),
            "measured_ppl": measured,
            "target_met": measured <= target,
        }

    def _factors_section(self) -> dict:
        """The stored form: `factors` as requested, `forms` per module (pivoted, plain or dense) for load."""
        return {"factors": self.cfg.factors, "forms": {name: m.get("form", "plain") for name, m in self.state.modules.items()}}

    def _stored_numel(self, record: dict) -> int:
        if "stored_numel" in record:
            return record["stored_numel"]
        return record["rank"] * (record["in_features"] + record["out_features"])

    def _bytes_section(self) -> dict:
        """Bytes of the decoder linears on disk: the checkpoint's weights, and the stored factors (pivots and
        quantisation scales included, biases in neither). Outputs of jobs that did not record them have none."""
        records = self.state.modules.values()
        if not records or any("stored_bytes" not in m for m in records):
            return {}
        before = sum(self.ckpt.nbytes(n + ".weight") for n in self.state.modules)
        after = sum(m["stored_bytes"] for m in records)
        return {"linear_bytes_before": before, "linear_bytes_after": after, "bytes_ratio_linear": 1 - after / before,
                **({"quantization": self.cfg.quant_spec.section()} if self.cfg.quant_spec is not None else {})}

    def _process_figures(self) -> dict:
        """This process's share of a distributed run: its peak RSS, time split and collective traffic."""
        mem = self._memory_figures()
        return {"rank": self.world.rank, "windows": list(self.share), **self.world.traffic,
                **{k: mem[k] for k in ("peak_rss_bytes", "peak_over_budget", "seconds_by_stage", "seconds_in")}}

    def _memory_figures(self) -> dict:
        """Measured peak RSS (the kernel's high-water mark, and the sampler's peak per stage) against the budget."""
        self.sampler.stage("write")
        peak = self.high_water.peak(self.sampler.peak)
        return {
            "peak_rss_bytes": peak,
            "peak_rss_by_stage": dict(sorted(self.sampler.peaks.items())),
            # wall time per stage up to here (the final write is not in it), and within them the statistics'
            # arithmetic and the activation files (streamsvd/timing.py; tools/bench_speed.py reads both)
            "seconds_by_stage": {k: round(v, 3) for k, v in sorted(self.sampler.seconds.items())},
            "seconds_in": timing.since(self.work_before),
            "max_mem_bytes": self.plan.budget_bytes,
            "planned_peak_bytes": self.plan.peak_bytes,
            "min_max_mem_bytes": self.plan.min_max_mem_bytes,
            "peak_over_budget": round(peak / self.plan.budget_bytes, 4),
            "device": str(self.cfg.torch_device),
            # torch's CPU threads (OMP_NUM_THREADS; torchrun gives each process 1): speed, and float sums at round-off
            "threads": torch.get_num_threads(),
            # run --device cuda: torch's count of the most the factorisations held on the GPU, against its budget
            **({"gpu_peak_bytes": peak_bytes(self.cfg.torch_device), "max_gpu_mem_bytes": self.plan.gpu_budget_bytes,
                "planned_gpu_peak_bytes": self.plan.gpu_peak_bytes} if self.cfg.torch_device.type == "cuda" else {}),
        }

    def _report(self) -> dict:
        """What the output is (deterministic: the same bytes however often the job was interrupted)."""
        before = sum(m["in_features"] * m["out_features"] for m in self.state.modules.values())
        after = sum(self._stored_numel(m) for m in self.state.modules.values())
        total = sum(self.ckpt.numel(k) for k in self.ckpt.keys())
        return {
            "model_dir": str(self.cfg.model_dir),
            "method": self.cfg.method,
            "factors": self.cfg.factors,
            "ratio_requested": None if self.cfg.targeted else self.cfg.ratio,
            "linear_params_before": before,
            "linear_params_after": after,
            "ratio_linear": 1 - after / before,
            "model_params_before": total,
            "model_params_after": total - before + after,
            "ratio_model": (before - after) / total,
            **self._bytes_section(),
            **self._allocation_section(),
            "calibration": self._config_section()["calibration"],
            "batch_size": self.batch_size,
            # In the model's own order, whichever run factored which block.
            "modules": {n: self.state.modules[n] for n, _ in self.model.named_modules() if n in self.state.modules},
        }


def _cpu_seconds() -> float:
    """User and system CPU seconds of this process so far (all its threads, not its children)."""
    t = os.times()
    return t.user + t.system


def _other(activation_file: str) -> str:
    """The two activation files alternate, so a block's inputs are never overwritten while it runs."""
    return "acts-1.bin" if activation_file == "acts-0.bin" else "acts-0.bin"


def _has_size(path: Path, nbytes: int) -> bool:
    return path.is_file() and path.stat().st_size == nbytes


def run_job(cfg: JobConfig, on_block_done=None) -> dict:
    # Under torchrun a refused input is refused by every rank together, and said once (job/distributed.py).
    job = World.current().agree(lambda: CompressionJob(cfg))
    return job.run(on_block_done=on_block_done)

