"""The memory, disk and time plan of a job, computed before any work from the checkpoint's headers.

No weight is read: shapes and dtypes come from the safetensors headers, sizes of the model from
config.json, and the rest from the job's settings. Per stage of the job the plan adds up what is
resident at that stage's peak:

- held for the whole job: the process baseline (measured: the RSS of this process, with torch,
  transformers, the tokenizer and the calibration windows loaded and the BLAS/LAPACK code warmed
  up by the speed measurement), the layer arguments (masks, rotary tables), the calibration
  windows, and the embeddings (0: they are read row by row from the checkpoint, `model/embedding.py`);
- `embed`: one batch of embedded windows on its way to the first activation file;
- `extra shard`: the tensors outside the decoder blocks (embeddings, head, final norm), copied
  from the checkpoint to the output by a streaming copy (one buffer, `io/output.py`);
- `statistics` (pass 1): one block's weights in the compute dtype, the block's statistics (float64:
  one input Gram per distinct input, q/k/v share one and gate/up share one; an output Gram for a
  linear factored on its output side), one activation batch and the layer forward's working set,
  and the float64 chunk the Gram update converts;
- `factorize`: the weights, the statistics still to be used, and the largest single
  factorisation's workspace (eigh and SVD copies and LAPACK work arrays), plus the finished
  factors of the block;
- `propagate` (pass 2): the compressed block, the block's tensors for the shard, one batch;
- `write`: the block's tensors and the serialiser's copy of them (safetensors' `save_file`
  turns each tensor into bytes before writing);
- `plots`: at the end, the allocation and spectra pictures (matplotlib, every block's spectra).

The batch size is the largest that keeps every stage within the budget, on the CPU at most about
2,048 tokens (`cpu_batch`: larger batches only make the kernel zero more fresh pages); the smallest workable
budget (`min_max_mem_bytes`) is the planned peak at batch 1, or at a fixed batch (plus a margin for the baseline's
variation between processes), and the stage that sets it is named
when a budget below it is refused. Factor sizes are counted through `stored_numel`, so another
stored form (pivoted factors) changes one function.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import StreamSVDError
from ..io.checkpoint import Checkpoint
from ..math.compensate import projects_cross
from ..math.factorize import LINE_CHUNK, rank_for_ratio
from ..math.gram import _ROW_CHUNK, _TILE_BYTES, product_fraction
from ..math.quantize import stored_linear_bytes
from .evaluate import LOGIT_CHUNK, head_key
from .device import GPU_SLACK_BYTES, GPU_SLACK_FRACTION, gpu_budget
from .memory import format_size

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
ACT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
COMPUTE_BYTES = 4  # float32 blocks and activations in the forward
GRAM_ROW_CHUNK = _ROW_CHUNK  # rows of a batch multiplied at a time by the Gram update
PRODUCT_TILE_BYTES = _TILE_BYTES  # the float32 product of one column tile of a Gram
# On the CPU a batch of about this many tokens, not the largest that fits: its intermediates (4-12 MB on
# SmolLM2) come back from the heap (job/peak.py fix_heap_thresholds) instead of as fresh pages the kernel zeroes,
# and with a seqlen that divides it every Gram's sum keeps the order of its 2,048-row chunks. Measured on the
# default SmolLM2 job: 22% faster than batch 64, byte-identical output (docs/RESULTS.md, "Smaller batches with
# the heap reused"). A GPU takes the largest batch that fits.
CPU_BATCH_TOKENS = GRAM_ROW_CHUNK


def cpu_batch(seqlen: int) -> int:
    """The CPU's preferred windows per batch: ceil(CPU_BATCH_TOKENS / seqlen) (4 at 512 tokens, 1 from 2,048)."""
    return max(1, -(-CPU_BATCH_TOKENS // seqlen))


# Sequential calibration's partial passes over the block as compressed so far, in compressed-block forwards:
# q/k/v's ends at its input, o's after attention, gate/up's replays the attention (o_proj on its saved input,
# job/stages.py Replay), down's replays it and runs gate/up (about 0.05 + 0.25 + 0.05 + 0.5 of a block on
# SmolLM2's shapes; 1.35 before the replay), and the propagate stage replays both parts (o_proj and down_proj:
# about 0.3). Together 1.15 against 2.35 before, as tools/bench_speed.py measured (docs/RESULTS.md: block
# forwards less the original block's, 18.3 -> 8.8 s on SmolLM2's first 4 blocks).
SEQUENTIAL_PASSES = 0.85
REPLAYED_PROPAGATE = 0.3
# What a job allocates beyond the live tensors counted below: Python objects, torch's per-op
# scratch, the allocator's rounding. Measured on SmolLM2 and the tiny models (tools/bench_memory.py).
SLACK_BYTES = 64 << 20
SLACK_FRACTION = 0.05
# The baseline is measured in each process and differs by a few tens of MiB between two processes
# doing the same thing (measured up to 42 MiB between `plan` and `run`); the minimum that `plan`
# reports carries this margin so that `run` in another process accepts it.
BASELINE_MARGIN_BYTES = 64 << 20
# The job's stages a `streamsvd profile` never enters (job/profile.py's sampler): its plan leaves them out, so its
# smallest budget is not set by a shard copy buffer it has none of (a probe, 2026-12-07)
PROFILE_SKIPS = frozenset({"extra shard", "write", "propagate", "plots", "refine", "quantize"})
STAGES = ("profile", "sensitivity (head)", "sensitivity (blocks)", "embed", "extra shard", "statistics", "factorize",
          "refine", "quantize", "propagate", "heldout", "write", "plots")
# stages a plan has only when its settings need them: a profile's backward pass, the held-out windows' NLL
OPTIONAL_STAGES = ("sensitivity (head)", "sensitivity (blocks)", "heldout")
# The end's pictures (io/plots.py): matplotlib's modules, two figures and their PNG buffers. Measured +64 MiB
# for SmolLM2's 210 matrices (30 layers); counted with headroom, plus every spectrum read back.
PLOT_BYTES = 96 << 20
# Their files (fixed layout): measured 180 KB for a tiny model's 28 matrices, 410 KB for 210 SmolLM2-shaped
# matrices with noisy random spectra (real ones are smoother and compress better); counted per matrix too.
PLOT_DISK_FIXED, PLOT_DISK_PER_MATRIX = 150 << 10, 1280
SVD_MODES = ("exact", "randomized", "auto")
# run --device cuda: a stage's parts (job/plan.py stage_parts) that live on the GPU (the forward stages' block, batch,
# outputs and statistics; refinement's optimiser and target), as opposed to the host's (shards, files, the head)
GPU_RESIDENT = frozenset({"block weights", "statistics", "original block", "batch", "outputs", "paired inputs", "output energy",
                          "optimiser", "target", "gradient broadcast", "one window's forward and backward"})
# The widest input a compensated linear may have: its statistics are two in x in float64 matrices and an
# eigendecomposition, about 64 in^2 bytes (16 GiB at 16384, the MLP width of 7B-8B models). A wider linear
# on the output side (a 70B model's down_proj, 28672) keeps that route and is neither compensated nor anchored.
COMPENSATE_MAX_IN = 16384


def plot_disk_bytes(matrices: int) -> int:
    """The two PNGs' bytes, an upper estimate (io/plots.py)."""
    return PLOT_DISK_FIXED + PLOT_DISK_PER_MATRIX * matrices


def stored_numel(m: int, n: int, rank: int, factors: str = "pivoted") -> int:
    """Numbers stored for a rank-`rank` m x n linear in form `factors` (plain: r (m + n); pivoted:
    r (m + n - r); dense once that reaches m n): math/pivot.py's count, so plan and job agree."""
    from ..math.factorize import stored_numel as numel

    return numel(m, n, rank, factors)


@dataclass
class LinearShape:
    name: str  # module name inside the block, e.g. mlp.down_proj
    out_features: int
    in_features: int
    itemsize: int  # stored bytes per weight number
    group: str  # modules sharing a group read the same input (one Gram)
    rank: int = 0
    route: str = "input"  # input: eigh of the in x in Gram; output: eigh of the out x out output Gram; plain: SVD of W
    svd: str = "exact"  # exact or randomized, for the input route's SVD of W S
    factors: str = "pivoted"  # stored form: pivoted or plain


# The linears whose output is their part's output as it is (attention: o_proj, MLP: down_proj): group by group,
# their inputs are saved to replay the part (job/stages.py Replay; the job checks each part by a probe).
REPLAYED_LEAVES = ("o_proj", "down_proj")


def input_group(name: str, in_features: int) -> str:
    """Which linears share an input, by name (q/k/v read one normed hidden state, gate/up another).

    The job finds the groups by tensor identity at run time; this is the same answer from the
    names the supported families use, which the plan needs before any forward.
    """
    parent, _, leaf = name.rpartition(".")
    if leaf in ("q_proj", "k_proj", "v_proj"):
        return f"{parent}.qkv:{in_features}"
    if leaf in ("gate_proj", "up_proj"):
        return f"{parent}.gate_up:{in_features}"
    return name


def factor_route(method: str, out_features: int, in_features: int, shared: bool) -> str:
    """The side a weight is factored on (see docs/DESIGN.md, "The smaller side").

    eig needs only U_k, the top eigenvectors of W G W^T (out x out), so a weight with out < in
    whose input no other linear reads is factored from its output Gram and the in x in Gram is
    never formed. Cholesky needs the in x in factor S itself, and a shared input needs its Gram
    for the other readers anyway.
    """
    if method == "svd":
        return "plain"
    if method == "eig" and out_features < in_features and not shared:
        return "output"
    return "input"


def choose_svd(mode: str, m: int, n: int, rank: int) -> str:
    """exact or randomized for the SVD of the whitened m x n weight (`--svd auto`: docs/RESULTS.md)."""
    if mode in ("exact", "randomized"):
        return mode
    from ..math.randomized import auto_prefers_randomized

    return "randomized" if auto_prefers_randomized(m, n, rank) else "exact"


def block_linears(ckpt: Checkpoint, prefix: str, ratio: float, method: str, svd: str = "exact",
                  factors: str = "pivoted", ranks: dict[str, int] | None = None,
                  compensated: bool = False) -> list[LinearShape]:
    """The linears of the block under `prefix`, from the headers: 2-D `.weight` tensors.

    `ranks` (full module name -> rank, an allocation) replaces the ratio's rank where it names the module.
    """
    shapes = []
    for key in ckpt.keys():
        if key.startswith(prefix) and key.endswith(".weight") and len(ckpt.shape(key)) == 2:
            m, n = ckpt.shape(key)
            name = key[len(prefix) : -len(".weight")]
            shapes.append(LinearShape(name, m, n, DTYPE_BYTES.get(ckpt.dtype_name(key), 4), input_group(name, n)))
    members: dict[str, int] = {}
    for s in shapes:
        members[s.group] = members.get(s.group, 0) + 1
    for s in shapes:
        s.factors = factors
        s.rank = rank_for_ratio(s.out_features, s.in_features, ratio, factors)
        if ranks is not None and prefix + s.name in ranks:
            s.rank = ranks[prefix + s.name]
        # Compensation needs a linear's in x in statistics: the output side only where they would be too large.
        keep_input = compensated and s.in_features <= COMPENSATE_MAX_IN
        s.route = factor_route(method, s.out_features, s.in_features, members[s.group] > 1 or keep_input)
        if s.route == "input":
            s.svd = choose_svd(svd, s.out_features, s.in_features, s.rank)
    return shapes


# ------------------------------------------------------------------------------- machine speed
_SPEED: dict[str, dict] = {}


def machine_speed(device=None) -> dict:
    """A one-second measurement of this machine (or of `device`, run --device): matmul GFLOP/s (float32, float64),
    eigh and SVD constants.

    eigh and SVD are timed at one size and scaled by n^3; the time estimate built from them is an
    estimate, not a measurement of the job. Measured once per process and device.
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    if str(device) in _SPEED:
        return _SPEED[str(device)]
    g = torch.Generator().manual_seed(0)

    def best(fn, repeat=3):
        def timed():
            t = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - t

        timed()
        return max(min(timed() for _ in range(repeat)), 1e-6)

    a32 = torch.randn(1024, 1024, generator=g).to(device)
    a64 = a32[:768, :768].double()
    sym = a64 @ a64.T
    n = 384
    small = sym[:n, :n].contiguous()
    small32 = small.float()
    _SPEED[str(device)] = {
        "matmul_f32_gflops": 2 * 1024**3 / best(lambda: a32 @ a32) / 1e9,
        "matmul_f64_gflops": 2 * 768**3 / best(lambda: a64 @ a64) / 1e9,
        "eigh_s_per_n3": best(lambda: torch.linalg.eigh(small)) / n**3,
        "eigh_f32_s_per_n3": best(lambda: torch.linalg.eigh(small32)) / n**3,
        "svd_s_per_n3": best(lambda: torch.linalg.svd(small, full_matrices=False)) / n**3,
    }
    return _SPEED[str(device)]


# ------------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    budget_bytes: int
    batch_size: int
    peak_bytes: int  # planned peak at this batch size
    min_max_mem_bytes: int  # the smallest budget to give: strict_min_bytes + BASELINE_MARGIN_BYTES
    strict_min_bytes: int  # the planned peak at batch 1 with this process's baseline: below it, run refuses
    min_stage: str  # the stage whose peak sets min_max_mem_bytes
    min_component: str  # that stage's largest part
    stage_bytes: dict[str, int]  # planned peak per stage at batch_size
    components: dict[str, dict[str, int]]  # stage -> part -> bytes (at batch_size)
    routes: dict[str, str]  # matrix type -> route, e.g. "mlp.down_proj (576 x 1536)": "output side, eigh 576 x 576"
    tiles: dict[str, int]
    disk_bytes: int
    disk: dict[str, int]
    seconds_estimate: float
    seconds_per_block: float
    seconds_split: dict[str, float]
    speed: dict[str, float]
    layers: int
    baseline_bytes: int
    notes: list[str] = field(default_factory=list)
    # run --device cuda: what each stage holds on the GPU (job/device.py); None / empty on the CPU
    device: str = "cpu"
    gpu_budget_bytes: int | None = None  # --max-gpu-mem (or the default share of the GPU); None: no GPU visible here
    gpu_peak_bytes: int | None = None  # the planned peak on the GPU at the plan's batch
    gpu_min_bytes: int | None = None  # the smallest --max-gpu-mem that works (the GPU's peak at batch 1)
    gpu_stage: str | None = None  # the stage that sets gpu_peak_bytes
    gpu_components: dict[str, dict[str, int]] = field(default_factory=dict)  # stage -> part -> bytes on the GPU
    gpu_stage_bytes: dict[str, int] = field(default_factory=dict)  # every stage's planned peak on the GPU
    # torch's threads in this process (OMP_NUM_THREADS; torchrun sets 1): the speed above was measured with them
    cpu_threads: int | None = None

    def fits(self) -> bool:
        """Whether the planned peaks (at the plan's batch) are within the budgets."""
        return self.peak_bytes <= self.budget_bytes and (self.gpu_budget_bytes is None or self.gpu_peak_bytes is None
                                                         or self.gpu_peak_bytes <= self.gpu_budget_bytes)

    def gpu_fits(self) -> bool:
        """Whether --max-gpu-mem is at least the smallest that works (the GPU's peak at batch 1)."""
        return self.gpu_min_bytes is None or self.gpu_budget_bytes is None or self.gpu_min_bytes <= self.gpu_budget_bytes

    def to_json(self) -> dict:
        return asdict(self)

    def deterministic(self) -> dict:
        """The parts that depend only on the checkpoint and the settings (for the report)."""
        return {"routes": self.routes, "tiles": self.tiles, "disk_bytes": self.disk_bytes, "layers": self.layers}

    def describe(self) -> str:
        lines = [
            f"memory plan for --max-mem {format_size(self.budget_bytes)}: batch {self.batch_size}, "
            f"planned peak {format_size(self.peak_bytes)} "
            f"(smallest workable --max-mem {format_size(self.min_max_mem_bytes)}, set by {self.min_stage}: {self.min_component})",
        ]
        for stage in (s for s in STAGES if s in self.stage_bytes):
            parts = ", ".join(f"{k} {format_size(v)}" for k, v in self.components[stage].items() if v)
            lines.append(f"  {stage:<12} {format_size(self.stage_bytes[stage]):>11}  {parts}")
        if self.gpu_peak_bytes is not None:
            parts = ", ".join(f"{k} {format_size(v)}" for k, v in self.gpu_components[self.gpu_stage].items() if v)
            budget = (f"--max-gpu-mem {format_size(self.gpu_budget_bytes)}" if self.gpu_budget_bytes is not None
                      else "no GPU budget (no GPU visible here: give --max-gpu-mem to check one)")
            lines.append(f"gpu ({self.device}, {budget}): planned peak {format_size(self.gpu_peak_bytes)} in the "
                         f"{self.gpu_stage} stage ({parts}); smallest workable --max-gpu-mem "
                         f"{format_size(self.gpu_min_bytes)}")
        lines.append("factorisation routes (per matrix type):")
        lines += [f"  {k}: {v}" for k, v in self.routes.items()]
        lines.append("tiles: " + ", ".join(f"{k} {v}" for k, v in self.tiles.items()))
        lines.append(f"disk: {format_size(self.disk_bytes)} (" + ", ".join(f"{k} {format_size(v)}" for k, v in self.disk.items()) + ")")
        split = ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds_split.items())
        lines.append(f"time (ESTIMATE from a measurement of this machine: {self._speed_text()}): "
                     f"{self.seconds_per_block:.1f} s per block ({split}), {self.seconds_estimate:.0f} s in total")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def _speed_text(self) -> str:
        threads = "" if self.cpu_threads is None else f", {self.cpu_threads} CPU thread{'s' if self.cpu_threads != 1 else ''}"
        return (f"{self.speed['matmul_f32_gflops']:.0f} GFLOP/s float32 matmul, {self.speed['matmul_f64_gflops']:.0f} "
                f"float64{threads}")


@dataclass
class PlanInputs:
    """What the plan depends on besides the checkpoint (the job's settings)."""

    calib_samples: int = 64
    seqlen: int = 512
    ratio: float = 0.4
    method: str = "eig"
    propagate: str = "compressed"
    act_dtype: str = "float32"
    svd: str = "auto"
    precision: str = "float64"  # eig's exact routes (math/factorize.py); the memory is counted in float64 either way
    factors: str = "pivoted"
    calibrate: str = "block"  # sequential: one input group's statistics at a time
    compensate: bool = False  # a second activation stream and the original block beside the compressed one
    anchor: float = 0.0  # > 0 (or compensate): the input-side linears are factored by math/compensate.py
    refine_steps: int = 0  # > 0: the refine stage (optimiser state, a backward through the block)
    ranks: dict[str, int] | None = None  # an allocation (math/allocate.py); None: every rank from `ratio`
    quant: object = None  # a math.quantize.QuantSpec: factors written quantised (smaller shards, a quantize stage)
    heldout_samples: int = 0  # --max-ppl-increase's held-out windows: that many more rows in each activation file
    plots: bool = True  # the end's pictures (a `plots` stage; off with run --no-plots, and for a profile)
    # processes of one job under torchrun (job/distributed.py): the plan is one process's, for its share of the windows
    processes: int = 1
    # run --device (job/device.py): "cpu", or a GPU on which the factorisations run (their workspace leaves the host)
    device: str = "cpu"
    # `streamsvd profile` with sensitivity: a token-weighted Gram per linear on its smaller side, held through the
    # statistics and the spectra (job/profile.WeightedEnergies)
    weighted_energies: bool = False
    # the plan of `streamsvd profile` (job/profile.block_spectra, whose spectra hold W S whole in float64)
    profile: bool = False
    # `streamsvd profile`'s backward pass over that many windows (a `sensitivity` stage: the head's gradient
    # and the blocks walked backwards, job/profile.Profiler._sensitivity)
    sensitivity_samples: int = 0

    @property
    def compensated(self) -> bool:
        return self.compensate or self.anchor > 0

    @property
    def keeps_input(self) -> bool:
        """Linears up to COMPENSATE_MAX_IN inputs are factored on their input side (their in x in Gram held):
        compensation needs it, and so does GPTQ rounding of their factors."""
        return self.compensated or (self.quant is not None and self.quant.rounding == "gptq")


def _config_int(cfg: dict, key: str, default: int) -> int:
    v = cfg.get(key)
    return int(v) if isinstance(v, (int, float)) else default


def input_route_workspace(s: LinearShape, method: str, profiling: bool = False, weighted: bool = False,
                          compensated: bool = False, float32: bool = False) -> tuple[str, int]:
    """(what, bytes) of the float64 workspace that factoring input-side linear `s` holds at its largest step.

    `profiling`: the profile's own routes (job/profile.block_spectra, every direction's spectrum); `weighted`: with its
    weighted energies; `compensated`: math/compensate.py's W C and W* beside the route (tools/bench_compensate_memory.py
    measures this against the peak at 7B and 70B shapes, docs/RESULTS.md). `float32` (run --precision float32): eig's
    exact route also holds a float32 copy of the whitening S; the rest is counted in float64 as before (float32's
    half-size route, or the float64 rerun after it, fits in that count).
    """
    m, n, k = s.out_features, s.in_features, s.rank
    # W float64, W S, SVD: copy, U, Vh, gesdd work; factors
    mn = min(m, n)
    what = f"SVD of the whitened {m} x {n} {s.name}"
    part = None
    if s.svd == "randomized":
        p = k + 10
        svd_ws = 8 * (3 * max(m, n) * p + 3 * p * p + m * n)
    elif method == "eig" and m > n and s.svd == "exact" and not profiling:
        # tall (math/factorize._tall_eig), W never whole in float64: A^T A = S^T (W^T W) S, eigh's
        # vectors and syevd's 2 n^2 work; S V_k; U_k = W S V_k and U_k^T W over float64 row chunks
        part = (f"eigh of A^T A for the whitened {m} x {n} {s.name}",
                8 * (4 * n * n + n * k + k * (m + n) + LINE_CHUNK * n))
    elif method == "eig" and m <= n and s.svd == "exact" and not profiling:
        # square or wide (math/factorize._wide_eig): A = W S by float64 row chunks, A A^T, eigh's
        # vectors and syevd's 2 m^2 work; U_k and U_k^T W
        part = (f"eigh of A A^T for the whitened {m} x {n} {s.name}",
                8 * (m * n + 4 * m * m + k * (m + n) + LINE_CHUNK * n))
    elif method == "eig" and weighted and m > n:
        # the profile's tall route (job/profile.block_spectra): W^T W over float64 row chunks, S^T (W^T W) S
        # and its temporary, eigh's vectors and syevd's 2 n^2 work; then its weighted energies: S^T W^T W,
        # V^T of it and that times the weighted Gram, each in x in
        part = (f"eigh of A^T A for the whitened {m} x {n} {s.name}", 8 * (8 * n * n + LINE_CHUNK * n))
    elif method == "eig" and weighted:
        # the profile's square / wide route: A = W S by row chunks, A A^T, eigh's vectors and 2 m^2 work;
        # U^T W and that times the weighted Gram (U: all min(m, n) directions)
        part = (f"eigh of A A^T for the whitened {m} x {n} {s.name}",
                8 * (m * n + 4 * m * m + 2 * mn * n + LINE_CHUNK * n))
    else:
        svd_ws = 8 * (m * n + m * mn + mn * n + 4 * mn * mn + 4 * max(m, n) * mn)
    if part is None:
        part = (what, 8 * (2 * m * n + k * (m + n)) + svd_ws)
    if float32 and method == "eig" and s.svd == "exact" and not profiling:
        part = (f"{part[0]} (and S in float32)", part[1] + 4 * n * n)
    if compensated:
        # math/compensate.py: W C (m x n float64) is held from before W* is made until the output error is taken,
        # W* through the factorisation above. W* is made a row chunk at a time into its own m x n (W C and W* plus
        # three LINE_CHUNK x n products); the output error is taken from the factors (k x n and k x k). So W C and
        # W* beside the route's workspace; making W C (W's float64 copy and the product) fits in the same two.
        part = (f"{part[0]}, compensated (W C and W* held)", 8 * 2 * m * n + max(part[1], 8 * 3 * LINE_CHUNK * n))
    return part


def make_plan(ckpt: Checkpoint, layers_path: str, settings: PlanInputs, budget: int, baseline: int,
              fixed_batch: int | None = None, other_file_bytes: int = 0, gpu_budget: int | None = None,
              device_speed: dict | None = None) -> Plan:
    """The plan for `settings` under `budget`; `fixed_batch` is a resumed job's batch size (kept). With a GPU
    (`settings.device`): `gpu_budget` its --max-gpu-mem (None: not known here), `device_speed` its machine_speed
    (None: the factorisations' time is estimated at this CPU's speed)."""
    cfg = ckpt.config_dict
    hidden = _config_int(cfg, "hidden_size", 0)
    inter = _config_int(cfg, "intermediate_size", 4 * hidden)
    heads = _config_int(cfg, "num_attention_heads", 1)
    kv_heads = _config_int(cfg, "num_key_value_heads", heads)
    head_dim = _config_int(cfg, "head_dim", hidden // max(heads, 1))
    n_layers = _config_int(cfg, "num_hidden_layers", 0)
    L, S = settings.seqlen, settings.calib_samples
    P, S_total = max(1, settings.processes), settings.calib_samples
    act = ACT_BYTES[settings.act_dtype]
    c = COMPUTE_BYTES

    # ---- per-block figures, from the largest block (all blocks of the supported families match)
    block_prefixes = [f"{layers_path}.{i}." for i in range(n_layers)]
    block_numel = {p: 0 for p in block_prefixes}
    block_stored = {p: 0 for p in block_prefixes}
    other_numel = 0
    extra_bytes = 0
    for key in ckpt.keys():
        prefix = _block_of(key, layers_path)
        if prefix in block_numel:
            block_numel[prefix] += ckpt.numel(key)
            block_stored[prefix] += ckpt.nbytes(key)
        else:
            extra_bytes += ckpt.nbytes(key)
            if not key.endswith("embed_tokens.weight") and not key.startswith("lm_head"):
                other_numel += ckpt.numel(key)
    def factor_numel(prefix: str) -> int:  # with an allocation, blocks of the same size hold factors of other sizes
        if settings.ranks is None:
            return 0
        return sum(stored_numel(s.out_features, s.in_features, s.rank, s.factors)
                   for s in block_linears(ckpt, prefix, settings.ratio, "eig", "exact", settings.factors, settings.ranks))

    big = max(block_prefixes, key=lambda p: (block_numel[p], factor_numel(p))) if block_prefixes else f"{layers_path}.0."
    linears = block_linears(ckpt, big, settings.ratio, settings.method, settings.svd, settings.factors, settings.ranks,
                            settings.keeps_input)
    weights = block_numel.get(big, 0) * c
    groups: dict[str, list[LinearShape]] = {}
    for s in linears:
        groups.setdefault(s.group, []).append(s)

    # Statistics held through pass 1 and factorisation (float64): every group's at once, or with
    # sequential calibration one group's at a time; compensation adds the cross statistics X^T X'.
    per_group = []
    for members in groups.values():
        # output side: the out x out Gram and the input's diagonal (run --shrink reads it)
        group_bytes = sum(8 * (s.out_features**2 + s.in_features) for s in members if s.route == "output")
        if any(s.route == "input" for s in members):
            group_bytes += 8 * members[0].in_features**2
            if settings.compensate:  # the cross statistic: W C (out x in) for a lone out < in linear, else C (in x in)
                lone = members[0] if len(members) == 1 and members[0].out_features < members[0].in_features else None
                group_bytes += 8 * (lone.out_features if lone else members[0].in_features) * members[0].in_features
        per_group.append(group_bytes)
    stats_bytes = max(per_group, default=0) if settings.calibrate == "sequential" else sum(per_group)
    if settings.weighted_energies:
        stats_bytes += sum(8 * min(s.out_features, s.in_features) ** 2 for s in linears)
    widest_in = max((s.in_features for s in linears), default=hidden)
    widest_out = max((s.out_features for s in linears if s.route == "output"), default=0)
    # math/gram.py: a chunk's float32 copy (16-bit inputs; an output Gram's squared inputs otherwise), an output
    # Gram's chunk of outputs, and add_products' scratch: one column tile's float32 product and its float64 copy
    tile = min(PRODUCT_TILE_BYTES, 4 * widest_in * max(widest_in, widest_out))
    gram_chunk = 4 * GRAM_ROW_CHUNK * widest_in + 4 * GRAM_ROW_CHUNK * widest_out + 3 * tile
    if settings.compensate:
        # the paired chunk of the original model's inputs, and a lone out < in linear's W x of it (math/compensate.py)
        gram_chunk += 4 * GRAM_ROW_CHUNK * widest_in + 4 * GRAM_ROW_CHUNK * max(
            (s.out_features for s in linears if s.route == "input" and s.out_features < s.in_features), default=0)

    # ---- held for the whole job
    layer_args = 2 * (L * L * 4) + 2 * 2 * L * head_dim * 4 + 2 * L * 8  # masks, rotary cos/sin, positions
    windows = S * L * 8
    held = {"baseline": baseline, "layer arguments": layer_args, "windows": windows, "norms": other_numel * c,
            "embeddings": 0}
    # the output head, read only to score windows (the held-out NLL) and for the profile's head gradient: its
    # stored tensor's pages (memory-mapped, resident once read) and its float32 copy (none when stored in float32)
    head_name = head_key(ckpt)
    vocab = ckpt.shape(head_name)[0] if head_name else 0
    head_stored = ckpt.nbytes(head_name) if head_name else 0
    head = {} if not head_name else {"head (stored pages)": head_stored,
                                     **({"head (float32)": 4 * vocab * hidden} if head_stored != 4 * vocab * hidden else {})}

    # ---- one sample's working set inside the block forward (compute dtype)
    q_width, kv_width = heads * head_dim, kv_heads * head_dim
    per_token = c * (8 * hidden + 4 * q_width + 4 * kv_width + 4 * inter)
    per_sample = L * per_token + c * 2 * heads * L * L + L * hidden * (act + c)  # + scores, + the batch read and converted
    # A replayed part (job/stages.py Replay) holds its last linear's saved input and output instead of the part's own
    # intermediates (the attention's q/k/v and scores, the MLP's three inter-wide tensors): within per_sample.

    # ---- factorisation workspace: the largest single step (float64)
    fact_parts = [("none", 0)]
    group_steps = []  # per group: (label, bytes, whether the group's whitening is held beside it)
    for members in groups.values():
        first = len(fact_parts)
        for s in members:
            m, n, k = s.out_features, s.in_features, s.rank
            if s.route == "output":
                # mean output Gram, eigh (vectors + 2 m^2 work), U_k, U_k^T W summed over W's float64 row chunks
                fact_parts.append((f"eigh of the {m} x {m} output Gram of {s.name}",
                                   8 * (4 * m * m + m * k + k * n + LINE_CHUNK * n)))
            elif s.route == "input":
                fact_parts.append(input_route_workspace(s, settings.method, settings.profile or settings.weighted_energies,
                                                        settings.weighted_energies, settings.compensated,
                                                        float32=settings.precision == "float32"))
            else:
                mn = min(m, n)
                fact_parts.append((f"SVD of {s.name}", 8 * (2 * m * n + m * mn + mn * n + 4 * mn * mn + 4 * max(m, n) * mn)))
        if any(s.route == "input" for s in members):
            n = members[0].in_features
            # mean Gram, eigenvectors, LAPACK syevd work (2 n^2), S; the whitening S stays until the group is done
            fact_parts.append((f"eigh of the {n} x {n} input Gram of {'/'.join(s.name for s in members)}", 8 * 5 * n * n))
            group_steps.append([(lab, b, True) for lab, b in fact_parts[first:-1]] + [fact_parts[-1] + (False,)])
        else:
            group_steps.append([(lab, b, False) for lab, b in fact_parts[first:]])
    whitening_held = 8 * max((members[0].in_features**2 for members in groups.values() if any(s.route == "input" for s in members)), default=0)
    if settings.compensated:
        # compensated whitening: S and H's eigenvectors are both held (and H + lam I while eigh runs)
        whitening_held *= 2
        widest_group = max((m[0].in_features for m in groups.values() if any(s.route == "input" for s in m)), default=0)
        fact_parts.append((f"eigh of the {widest_group} x {widest_group} shrunk Gram", 8 * 6 * widest_group**2))
    label, workspace = max(fact_parts, key=lambda t: t[1])
    # run --device cuda: the GPU holds no statistics, so its largest step is the largest whitening-and-workspace pair
    # of any step (below, the host's is the step that also holds the most statistics); compensating, both maxima
    gpu_white, gpu_work = whitening_held, workspace
    if not settings.compensated:
        gpu_white, gpu_work = max(((8 * members[0].in_features**2 if with_white else 0, b)
                                   for steps, members in zip(group_steps, groups.values()) for _, b, with_white in steps),
                                  key=sum, default=(0, 0))
    factor_stats = stats_bytes
    if not (settings.compensate or settings.calibrate == "sequential" or settings.profile or settings.weighted_energies
            or settings.quant is not None or P > 1):
        # One process, one pass's statistics: the linears are factored in order, and each group's statistics go
        # as its factoring starts (the Gram into its whitening, job/stages.factor_block), so a step holds the later
        # groups' statistics, its own group's whitening, and its own workspace; the largest step sets the stage.
        left, worst = sum(per_group), None
        for group_bytes, steps, members in zip(per_group, group_steps, groups.values()):
            left -= group_bytes
            white = 8 * members[0].in_features ** 2
            for lab, b, with_white in steps:
                step = (left + (white if with_white else 0) + b, left, white if with_white else 0, lab, b)
                worst = step if worst is None or step[0] > worst[0] else worst
        if worst is not None:
            _, factor_stats, whitening_held, label, workspace = worst
    # run --device cuda (job/stages.factor_block): beside the block and its statistics (both on the GPU), a group's
    # whitening (and, compensating, its mean Gram for the output error and C's float64 mean while W C is made), the
    # route's workspace and its float64 factors (which then go to the host). The forward stages: gpu_stage_parts below
    gpu_parts: dict[str, int] = {}
    if settings.device != "cpu":
        widest = max((m[0].in_features for m in groups.values() if any(s.route == "input" for s in m)), default=0)
        gpu_parts = {"whitening": gpu_white, "workspace": gpu_work,
                     "factors": max((8 * s.rank * (s.out_features + s.in_features) for s in linears), default=0)}
        if settings.compensated:
            gpu_parts["input Gram"] = 8 * widest**2
        if settings.compensate:
            gpu_parts["cross statistic"] = 8 * widest**2
        factor_stats = stats_bytes
    factors_stored = sum(stored_numel(s.out_features, s.in_features, s.rank, s.factors) * s.itemsize for s in linears)
    packed_stored = sum(stored_linear_bytes(s.out_features, s.in_features, s.rank, s.factors, s.itemsize, settings.quant)
                        for s in linears)
    # Quantising one linear at a time: its factors in float32 (rounding and the dequantised copy), twice.
    quant_work = max((2 * 4 * stored_numel(s.out_features, s.in_features, s.rank, s.factors) for s in linears), default=0)
    if settings.quant is not None and settings.quant.rounding == "gptq":
        # GPTQ: the damped Gram, its Cholesky factor, the inverse and its upper factor (float64, in x in), and
        # the out-factor's r x r Gram; the input Grams are held until their linears are quantised (in "statistics")
        quant_work += max((8 * (4 * s.in_features**2 + s.rank**2) for s in linears), default=0)
    # Quantised as each linear is factored, unless refinement comes between (then a stage of its own).
    quant_stage = settings.quant is not None and settings.refine_steps > 0
    def compute_bytes(s: LinearShape) -> int:  # a factored linear in the compute dtype, with its int64 pivots
        return stored_numel(s.out_features, s.in_features, s.rank, s.factors) * c + (8 * s.in_features if s.factors == "pivoted" else 0)

    factors_compute = sum(compute_bytes(s) for s in linears)
    largest_compute = max((compute_bytes(s) for s in linears), default=0)
    block_other_stored = block_stored.get(big, 0) - sum(s.out_features * s.in_features * s.itemsize for s in linears)
    shard = (packed_stored if settings.quant is not None else factors_stored) + block_other_stored
    spectra = sum(4 * min(s.out_features, s.in_features) for s in linears)

    # `streamsvd profile`'s backward pass (job/profile.Profiler._sensitivity), a window at a time: first the
    # head's gradient at the final states of this process's share of the windows, a chunk of tokens at a time;
    # then the blocks walked backwards, every linear's per-token squared gradients (float64, all the windows)
    # held to the end, and under torchrun summed over the processes (stacked, a running total, a partial)
    sensitivity = {}
    if settings.sensitivity_samples:
        keep, mine = settings.sensitivity_samples, -(-settings.sensitivity_samples // P)
        gradients = mine * L * hidden * c
        per_token = n_layers * len(linears) * keep * L * 8
        sensitivity = {
            "sensitivity (head)": {**head, "gradients": gradients, "final states": L * hidden * c,
                                   "logits and their gradients": 4 * LOGIT_CHUNK * vocab * 4},
            "sensitivity (blocks)": {"block weights": weights, "gradients": gradients,
                                     "one window's forward and backward": 3 * per_sample, "per-token weights": per_token,
                                     **({"their sum over the processes": 3 * per_token} if P > 1 else {})},
        }

    def stage_parts(b: int) -> dict[str, dict[str, int]]:
        batch = b * per_sample
        io_batch = b * L * hidden * act
        statistics = {"block weights": weights, "statistics": stats_bytes, "batch": batch,
                      "gram chunk": gram_chunk, "outputs": b * L * hidden * (c + act)}
        if P > 1:  # adding up the ranks' sums: the running total and one rank's partial beside this rank's own
            statistics["reduction buffers"] = 2 * 8 * max(widest_in, widest_out) ** 2
            # an output Gram's input diagonal kept per chunk of at most 2,048 tokens of a batch (math/gram.py,
            # keep_diag_terms), every rank's gathered for the sum in the one-process order: in_features float64 each
            chunks = -(-S_total // b) * -(-b * L // GRAM_ROW_CHUNK)
            diag = sum(8 * s.in_features * chunks for s in linears if s.route == "output")
            if diag:
                statistics["diagonal terms (gathered)"] = diag
        if settings.compensate:
            # the untouched block beside the compressed one, the original inputs of the group held while
            # the compressed forward runs, and its outputs' energy in float64
            widest_out_all = max((s.out_features for s in linears), default=hidden)
            statistics.update({"original block": weights, "paired inputs": b * L * widest_in * c,
                               "output energy": b * L * widest_out_all * 8})
        parts = {
            "embed": {"batch": 2 * b * L * hidden * c + io_batch},
            "extra shard": {"copy buffer": 16 << 20},
            "statistics": statistics,
            # compensating, the untouched block is gone once its pass's statistics are in (job/pipeline.py)
            "factorize": {"block weights": weights, "statistics": factor_stats,
                          "whitening": 0 if gpu_parts else whitening_held,
                          # each linear's compute-dtype factors replace its weight as it is factored (job/stages.py
                          # factor_block), so beside the stored factors only one linear's are extra, as they are made
                          "workspace": 0 if gpu_parts else workspace, "factors": factors_stored + largest_compute + spectra,
                          **({"factors from the GPU": gpu_parts["factors"]} if gpu_parts else {}),
                          # under torchrun: the pickled factors sent or received and their unpickled copy, and with
                          # --quant the rounded tensors that travel with them (job/stages.factor_block, World.spread)
                          **({"broadcast factors": 2 * (factors_compute + (packed_stored if settings.quant is not None
                                                                         and not quant_stage else 0))} if P > 1 else {}),
                          **({"rounding": quant_work} if settings.quant is not None and not quant_stage else {})},
            "refine": {} if not settings.refine_steps else {
                # the block with its factors; Adam's two moments, the gradients and the best factors so far;
                # the forward's saved activations for the backward (about twice the forward's working set),
                # and the target batch (plus the original block when it computes the target)
                "block weights": factors_compute + (weights - sum(s.out_features * s.in_features for s in linears) * c),
                "optimiser": 4 * factors_compute, "batch": 3 * batch, "target": b * L * hidden * (c + act),
                # under torchrun: each step's gradients as one flat tensor, sent or received (World.from_rank)
                **({"gradient broadcast": factors_compute} if P > 1 else {}),
                **({} if settings.compensate else {"original block": weights}),
            },
            "quantize": {} if not quant_stage else {
                # the block with its full-precision factors, the shard's full-precision and packed tensors,
                # and one linear's rounding work
                "block weights": factors_compute + (weights - sum(s.out_features * s.in_features for s in linears) * c),
                "shard tensors": factors_stored + block_other_stored + packed_stored, "rounding": quant_work,
            },
            "propagate": {"block weights": factors_compute + (weights - sum(s.out_features * s.in_features for s in linears) * c),
                          "shard tensors": shard, "batch": batch, "outputs": b * L * hidden * (c + act)},
            "write": {"block weights": factors_compute + weights, "shard tensors": shard, "serialiser copy": shard + spectra},
            "plots": {} if not settings.plots else {"matplotlib and figures": PLOT_BYTES, "spectra": n_layers * spectra},
            # the held-out windows' NLL (run --max-ppl-increase, profile --heldout-samples): one window's final
            # states and a chunk of its logits (with their log-softmax and the softcap's copy)
            **({"heldout": {**head, "final states": L * hidden * c, "logits": 3 * LOGIT_CHUNK * vocab * 4}}
               if settings.heldout_samples else {}),
            **sensitivity,
        }
        if settings.profile:  # `streamsvd profile` writes no shards, propagates inside its statistics pass, draws nothing
            parts = {stage: v for stage, v in parts.items() if stage not in PROFILE_SKIPS}
        for stage in parts:
            parts[stage] = {**held, **parts[stage]}
        return parts

    def totals(b: int) -> dict[str, int]:
        out = {}
        for stage, parts in stage_parts(b).items():
            live = sum(parts.values())
            out[stage] = int(live + SLACK_BYTES + SLACK_FRACTION * (live - baseline))
        return out

    def gpu_stage_parts(b: int) -> dict[str, dict[str, int]]:
        """run --device cuda: what each stage holds on the GPU. The block (and the original beside it), the batch's
        working set, its outputs and the statistics' products (their sums stay on the host) in the forward stages;
        the block and one factorisation (gpu_parts) in the factorize stage; the host's count of each stays as it
        was (every tensor passes through the host on its way, and the host's plan counts it there too)."""
        if not gpu_parts:
            return {}
        host = stage_parts(b)
        on_gpu = {stage: {k: v for k, v in host[stage].items() if k in GPU_RESIDENT}
                  for stage in ("statistics", "refine", "quantize", "propagate", "write", "sensitivity (blocks)")
                  if stage in host}
        on_gpu = {stage: parts for stage, parts in on_gpu.items() if any(parts.values())}  # the stages this job has
        on_gpu["statistics"]["statistics' products"] = gram_chunk
        if "quantize" in on_gpu:  # a linear's dequantised module moves to the GPU while the one it replaces is there
            on_gpu["quantize"]["swapped linear"] = largest_compute
        on_gpu["factorize"] = {"block weights": weights, "statistics": factor_stats, **gpu_parts}
        return on_gpu

    def gpu_totals(b: int) -> dict[str, int]:
        return {stage: int(sum(parts.values()) * (1 + GPU_SLACK_FRACTION) + GPU_SLACK_BYTES)
                for stage, parts in gpu_stage_parts(b).items()}

    at_one = totals(1)
    min_stage = max(at_one, key=at_one.get)
    strict_min = at_one[min_stage]
    one_parts = stage_parts(1)[min_stage]
    biggest = max((k for k in one_parts if k != "baseline"), key=one_parts.get)
    min_component = f"{biggest} {format_size(one_parts[biggest])}" + (f" ({label})" if biggest == "workspace" else "")

    if fixed_batch is not None:
        batch = fixed_batch
    else:
        batch = 1
        if budget >= strict_min:
            lo, hi = 1, max(1, S // P)  # under torchrun every process needs a batch: at most S // P windows
            while lo < hi:  # the largest batch whose every stage fits (and on a GPU, whose every stage fits there)
                mid = (lo + hi + 1) // 2
                if max(totals(mid).values()) <= budget and (gpu_budget is None or max(gpu_totals(mid).values(), default=0)
                                                            <= gpu_budget):
                    lo = mid
                else:
                    hi = mid - 1
            batch = lo if settings.device != "cpu" else min(lo, cpu_batch(L))
    stage_totals = totals(batch)
    gpu_stages = gpu_totals(batch)
    gpu_stage = max(gpu_stages, key=gpu_stages.get) if gpu_stages else None
    # the GPU's peak at the plan's batch, and its smallest budget: the peak at batch 1 (refuse_if_too_small)
    gpu_peak = gpu_stages[gpu_stage] if gpu_stage else None
    gpu_min = max(gpu_totals(1).values()) if gpu_stage else None
    if P > 1:  # from here on, one process's share of the windows: the most any rank streams (job/distributed.py)
        S = min(S_total, -(-(-(-S_total // batch)) // P) * batch)

    # ---- disk: the output (from the headers and the ranks) and the two activation files
    # two files; each holds both streams when compensating, and the held-out windows
    work = 2 * (S * (2 if settings.compensate else 1) + settings.heldout_samples) * L * hidden * act
    # compensating group by group: the original block's inputs to the later groups' leaders, for one block
    # (job/stages.py OriginalInputs); the first group's leader is not stashed, every other input-side one is
    stashed = 0
    if settings.compensate and settings.calibrate == "sequential":
        stashed_groups = [m for m in groups.values() if any(s.route == "input" for s in m)]
        first = next((m for m in stashed_groups if any(s.name.rsplit(".", 1)[-1] in ("q_proj", "qkv_proj") for s in m)), None)
        # float32; a leader alone in its group with out < in keeps its outputs, out wide (math/compensate.projects_cross)
        stashed = 4 * S * L * sum(m[0].out_features if projects_cross(m[0].out_features, m[0].in_features, len(m) == 1)
                                  else m[0].in_features for m in stashed_groups if m is not first)
    # group by group: the inputs of the attention's and the MLP's last linears, saved in their own pass for the
    # later passes and the propagate stage to replay those parts from, for one block (job/stages.py Replay)
    replayed = 0
    if settings.calibrate == "sequential":
        replayed = 4 * S * L * sum(s.in_features for s in linears if s.name.rsplit(".", 1)[-1] in REPLAYED_LEAVES)
    out_bytes = extra_bytes + other_file_bytes
    for prefix in block_prefixes:
        ls = (block_linears(ckpt, prefix, settings.ratio, settings.method, "exact", settings.factors, settings.ranks,
                            settings.keeps_input) if prefix != big else linears)
        lin_bytes = sum(s.out_features * s.in_features * s.itemsize for s in ls)
        out_bytes += block_stored[prefix] - lin_bytes + sum(
            stored_linear_bytes(s.out_features, s.in_features, s.rank, s.factors, s.itemsize, settings.quant)
            + 4 * min(s.out_features, s.in_features) for s in ls)

    if settings.plots:
        out_bytes += plot_disk_bytes(n_layers * len(linears))

    # ---- time (an estimate)
    speed = machine_speed()
    f32, f64 = speed["matmul_f32_gflops"] * 1e9, speed["matmul_f64_gflops"] * 1e9
    # the factorisations at the GPU's speed where it was measured (run --device cuda), else at this CPU's
    fspeed = device_speed if device_speed is not None else speed
    d32, d64 = fspeed["matmul_f32_gflops"] * 1e9, fspeed["matmul_f64_gflops"] * 1e9
    tokens = S * L
    lin_params = sum(s.out_features * s.in_features for s in linears)
    low_params = sum(stored_numel(s.out_features, s.in_features, s.rank, s.factors) for s in linears)
    attn = 4 * tokens * L * q_width / 2
    original_pass = (2 * tokens * lin_params + attn) / f32
    compressed_pass = (2 * tokens * low_params + attn) / f32
    if settings.calibrate == "sequential":
        # the partial passes of the block as compressed so far, each ending at its group's input
        # (job/stages.py collect_group_statistics); the original block once when compensating
        forward = SEQUENTIAL_PASSES * compressed_pass + (original_pass if settings.compensate else 0.0)
    else:
        forward = original_pass * (2 if settings.compensate else 1)
    if settings.propagate == "compressed":
        replays = settings.calibrate == "sequential" and not settings.refine_steps  # refinement: the block runs whole
        forward += (REPLAYED_PROPAGATE if replays else 1.0) * compressed_pass
    stats_t, fact_t = 0.0, 0.0
    # --precision float32: eig's exact routes in float32 (the whitening stays float64; math/factorize.py); a route that
    # float32_trusted sends back to float64 costs both, which the estimate does not know in advance
    low = settings.precision == "float32" and settings.method == "eig"
    eig_flops, eig_eigh = (d32, fspeed["eigh_f32_s_per_n3"]) if low else (d64, fspeed["eigh_s_per_n3"])
    for members in groups.values():
        if any(s.route == "input" for s in members):
            n = members[0].in_features
            stats_t += 2 * tokens * n * n * product_fraction(n) / f32  # float32 products, upper triangle (math/gram.py)
            if settings.compensate:
                stats_t += 2 * tokens * n * n / f32  # the cross statistics
            if settings.anchor > 0 and settings.method == "eig":  # H = G' + lam I by Cholesky (math/compensate.py)
                fact_t += n**3 / 3 / d64 + sum(2 * s.out_features * n * n for s in members if s.route == "input") / d64
            else:
                fact_t += fspeed["eigh_s_per_n3"] * n**3
        for s in members:
            m, n, k = s.out_features, s.in_features, s.rank
            if s.route == "output":
                stats_t += (2 * tokens * m * n + tokens * m * m) / f32
                fact_t += eig_eigh * m**3 + 2 * k * m * n / eig_flops
            elif s.route == "input":
                fact_t += 2 * m * n * n / d64
                if s.svd == "randomized":
                    fact_t += 2 * 5 * m * n * (k + 10) / d64
                elif settings.method == "eig":  # the smaller side's product, its eigh, and U_k or A V_k, U_k^T W
                    small = min(m, n)
                    fact_t += (2 * small * small * max(m, n) + 4 * k * m * n) / eig_flops + eig_eigh * small**3
                else:
                    fact_t += fspeed["svd_s_per_n3"] * min(m, n) ** 2 * max(m, n)
            else:
                fact_t += fspeed["svd_s_per_n3"] * min(m, n) ** 2 * max(m, n)
    io_t = (block_stored.get(big, 0) + shard + 3 * S * L * hidden * act) / 1e9  # about 1 GB/s of reads and writes
    split = {"forward": forward, "statistics": stats_t, "factorisation": fact_t, "I/O": io_t}
    if settings.refine_steps:
        # a forward and a backward (about twice a forward) of one batch per step, plus the held-out checks
        step_tokens = batch * L
        split["refinement"] = settings.refine_steps * 3 * (2 * step_tokens * low_params + 4 * step_tokens * L * q_width / 2) / f32
    per_block = sum(split.values())

    routes = {}
    for s in linears:
        key = f"{s.name} ({s.out_features} x {s.in_features}, rank {s.rank})"
        if s.route == "output":
            routes[key] = f"output side: eigh of the {s.out_features} x {s.out_features} output Gram (the {s.in_features} x {s.in_features} input Gram is never formed)"
        elif s.route == "input":
            m, n = s.out_features, s.in_features
            how = ("randomized SVD of the whitened weight" if s.svd == "randomized"
                   else f"eigh of the whitened weight's {min(m, n)} x {min(m, n)} product A^T A" if settings.method == "eig" and m > n
                   else f"eigh of the whitened weight's {m} x {m} product A A^T" if settings.method == "eig"
                   else "exact SVD of the whitened weight")
            routes[key] = f"input side: eigh of the {n} x {n} input Gram, {how}"
        else:
            routes[key] = "plain SVD of the weight"
    notes = []
    if P > 1:
        notes.append(f"one process of {P} (torchrun): it streams at most {S} of the {S_total} windows (whole batches of "
                     f"{batch}); memory and the work files are per process, the output is written once (rank 0); "
                     "every process holds the block, and while the ranks add up their statistics two more copies of "
                     "the largest one")
    if fixed_batch is not None:
        notes.append(f"batch {fixed_batch} is fixed (--batch-size, or an interrupted job's, kept on resume so the output "
                     "does not change), not chosen for --max-mem")
    if gpu_parts and device_speed is None:
        notes.append("no GPU visible here: the factorisations' time is estimated at this CPU's speed")
    # A fixed batch (--batch-size, an interrupted job's) is refused where its peak exceeds the budget (job/pipeline.py
    # _refuse_batch_size), so the smallest budget that works is that batch's peak, not batch 1's
    smallest = max(stage_totals.values()) if fixed_batch is not None else strict_min
    return Plan(
        budget_bytes=budget, batch_size=batch, peak_bytes=max(stage_totals.values()),
        min_max_mem_bytes=smallest + BASELINE_MARGIN_BYTES, strict_min_bytes=strict_min,
        min_stage=min_stage, min_component=min_component, stage_bytes=stage_totals,
        components=stage_parts(batch), routes=routes,
        tiles={"batch_size": batch, "gram_row_chunk": GRAM_ROW_CHUNK, "gram_product_tile_bytes": PRODUCT_TILE_BYTES},
        disk_bytes=out_bytes + work + stashed + replayed,
        disk={"output": out_bytes, "work files": work, **({"original inputs": stashed} if stashed else {}),
              **({"replayed inputs": replayed} if replayed else {})},
        seconds_estimate=float(f"{per_block * n_layers:.4g}"), seconds_per_block=float(f"{per_block:.4g}"),
        seconds_split={k: round(v, 2) for k, v in split.items()}, speed={k: float(v) for k, v in speed.items()},
        layers=n_layers, baseline_bytes=baseline, notes=notes, device=settings.device,
        gpu_budget_bytes=gpu_budget if gpu_parts else None, gpu_peak_bytes=gpu_peak, gpu_min_bytes=gpu_min,
        gpu_components=gpu_stage_parts(batch), gpu_stage=gpu_stage,
        gpu_stage_bytes=gpu_stages, cpu_threads=torch.get_num_threads(),
    )


def _block_of(key: str, layers_path: str) -> str | None:
    head = layers_path + "."
    if not key.startswith(head):
        return None
    index, _, _ = key[len(head) :].partition(".")
    return f"{head}{index}." if index.isdigit() else None


def _smaller_job_hint(plan: Plan) -> str:
    """What else lowers the minimum: --seqlen where activations set it; where a factorisation (or the profile's)
    does, the batch is not the cause, and a lighter job is (compensation's statistics and targets, the profile)."""
    if plan.min_stage in ("factorize", "profile"):
        return ("compress with --no-compensate and --alloc uniform, whose factorisations need less "
                "(`streamsvd plan --no-compensate --alloc uniform` says how much)")
    return "lower --seqlen"


def refuse_if_too_small(plan: Plan, resumed: bool = False) -> None:
    """One `error:` line naming the smallest workable budget and the stage that sets it (or the GPU's)."""
    if not plan.gpu_fits():
        peak_parts = plan.gpu_components[plan.gpu_stage]
        largest = max(peak_parts, key=peak_parts.get)
        raise StreamSVDError(
            f"--max-gpu-mem {format_size(plan.gpu_budget_bytes)} is too small: this job needs at least "
            f"{format_size(plan.gpu_min_bytes)} ({plan.gpu_min_bytes} bytes) on {plan.device}, set by its "
            f"{plan.gpu_stage} stage (the largest part: {largest} {format_size(peak_parts[largest])})",
            f"give --max-gpu-mem {math.ceil(plan.gpu_min_bytes / (1 << 20))}M or more, or leave --device out to run on "
            "the CPU (`streamsvd plan --device cuda` shows the parts)",
        )
    if resumed and plan.gpu_budget_bytes is not None and plan.gpu_peak_bytes is not None \
            and plan.gpu_peak_bytes > plan.gpu_budget_bytes:
        raise StreamSVDError(
            f"--max-gpu-mem {format_size(plan.gpu_budget_bytes)} is too small for this interrupted job: it runs batches "
            f"of {plan.batch_size} (kept so the output does not change), which need {format_size(plan.gpu_peak_bytes)} "
            "on the GPU", f"resume with --max-gpu-mem {math.ceil(plan.gpu_peak_bytes / (1 << 20))}M or more")
    if plan.budget_bytes < plan.strict_min_bytes:
        raise StreamSVDError(
            f"--max-mem {format_size(plan.budget_bytes)} is too small: this job needs at least "
            f"{format_size(plan.min_max_mem_bytes)} ({plan.min_max_mem_bytes} bytes, with a "
            f"{BASELINE_MARGIN_BYTES >> 20} MiB margin for the process baseline), set by the {plan.min_stage} stage "
            f"({plan.min_component})",
            f"give --max-mem {math.ceil(plan.min_max_mem_bytes / (1 << 20))}M or more, or {_smaller_job_hint(plan)} "
            "(`streamsvd plan` shows the stages)",
        )
    if resumed and plan.peak_bytes > plan.budget_bytes:
        raise StreamSVDError(
            f"--max-mem {format_size(plan.budget_bytes)} is too small for this interrupted job: it runs batches of "
            f"{plan.batch_size} (kept so the output does not change), which need {format_size(plan.peak_bytes)}",
            f"resume with --max-mem {math.ceil(plan.peak_bytes / (1 << 20))}M or more",
        )


def build_plan(cfg, ckpt: Checkpoint, fixed_batch: int | None = None, ranks: dict[str, int] | None = None,
               processes: int = 1, weighted_energies: bool = False, sensitivity_samples: int = 0,
               heldout_samples: int | None = None, profile: bool = False) -> Plan:
    """The plan of the job `cfg` (a JobConfig) under its --max-mem (default: 75% of available RAM).

    The baseline is this process's RSS now, after the speed measurement has loaded and warmed up
    the BLAS and LAPACK code the job will run.
    """
    from ..model.architecture import SUPPORTED
    from .memory import default_budget
    from .peak import fix_heap_thresholds, rss_bytes, trim_heap

    fix_heap_thresholds()
    machine_speed()
    device_name = getattr(cfg, "device", "cpu")
    gpu, device_speed, gpu_budget_bytes = plan_device(cfg), None, None
    if gpu is not None:  # the CUDA runtime and its BLAS / LAPACK code are loaded before the baseline is measured
        device_speed = machine_speed(gpu)
        gpu_budget_bytes = gpu_budget(gpu, getattr(cfg, "max_gpu_mem", None))
    elif device_name != "cpu":
        gpu_budget_bytes = getattr(cfg, "max_gpu_mem", None)  # planning for another machine's GPU
    if hasattr(cfg, "resolve_defaults"):
        cfg.resolve_defaults()  # a JobConfig not validated yet (the profile's) has its measured defaults unset
    settings = PlanInputs(calib_samples=cfg.calib_samples, seqlen=cfg.seqlen, ratio=cfg.ratio, method=cfg.method,
                          propagate=cfg.propagate, act_dtype=cfg.act_dtype, svd=getattr(cfg, "svd", "auto"),
                          precision=getattr(cfg, "precision", "float64"),
                          factors=getattr(cfg, "factors", "pivoted"), calibrate=getattr(cfg, "calibrate", "block"),
                          compensate=getattr(cfg, "compensate", False), anchor=getattr(cfg, "anchor", 0.0),
                          refine_steps=getattr(cfg, "refine_steps", 0), ranks=ranks, quant=getattr(cfg, "quant_spec", None),
                          heldout_samples=getattr(cfg, "heldout_rows", 0) if heldout_samples is None else heldout_samples,
                          plots=getattr(cfg, "plots", False), processes=processes, weighted_energies=weighted_energies, profile=profile,
                          sensitivity_samples=sensitivity_samples, device=device_name)
    budget = cfg.max_mem if cfg.max_mem is not None else default_budget()
    other = sum(p.stat().st_size for p in sorted(ckpt.dir.iterdir()) if p.is_file() and not p.name.endswith(".safetensors")
                and p.name not in ("model.safetensors.index.json",))
    layers_path = SUPPORTED[ckpt.config_dict.get("model_type")]
    trim_heap()  # the baseline is what is live: the speed measurement's freed matrices stay in the heap otherwise
    plan = make_plan(ckpt, layers_path, settings, budget, rss_bytes(), fixed_batch=fixed_batch, other_file_bytes=other,
                     gpu_budget=gpu_budget_bytes, device_speed=device_speed)
    if ranks is None and getattr(cfg, "needs_profile", False) and getattr(cfg, "profile", None) is None:
        _add_own_profile(plan, cfg, ckpt, processes)
    return plan


def keep_stage(plan: Plan, earlier: Plan, stage: str) -> None:
    """Carry `earlier`'s `stage` (host memory) into `plan`: a job's replan after its own profile keeps the profile's
    planned peak, so the run's figures set the planned peak beside the measured one of the same stages."""
    if stage not in earlier.stage_bytes:
        return
    plan.stage_bytes = {stage: earlier.stage_bytes[stage], **plan.stage_bytes}
    plan.components = {stage: earlier.components.get(stage, {}), **plan.components}
    plan.peak_bytes = max(plan.peak_bytes, earlier.stage_bytes[stage])


def plan_device(cfg):
    """The torch.device a plan of `cfg` measures: the job's own (`cfg.torch_device`, set by the job once it resolved
    --device), else --device's GPU where torch sees one; None for the CPU, or for a GPU not visible here (`streamsvd
    plan --device cuda` on a machine without one plans for --max-gpu-mem, and `run` refuses there)."""
    import os

    device_name = getattr(cfg, "device", "cpu")
    if device_name == "cpu":
        return None
    if getattr(cfg, "torch_device", None) is not None:
        return cfg.torch_device
    if not torch.cuda.is_available():
        return None
    from .device import resolve_device

    return resolve_device(device_name, int(os.environ.get("LOCAL_RANK", "0")))


def _add_own_profile(plan: Plan, cfg, ckpt: Checkpoint, processes: int = 1) -> None:
    """A job that profiles for itself (`--alloc global`, the default, without --profile) first runs `streamsvd profile`
    under the same budget: its plan's peak is this plan's `profile` stage, and its minimum counts toward the job's."""
    from .profile import ProfileConfig, saved_bytes

    pcfg = ProfileConfig.for_job(cfg, Path(cfg.out_dir))
    prof = pcfg.plan(ckpt, processes=processes)
    plan.disk["profile"] = saved_bytes(ckpt, min(pcfg.sensitivity_samples, pcfg.calib_samples) > 0)  # kept in OUT_DIR
    plan.disk_bytes += plan.disk["profile"]
    plan.stage_bytes = {"profile": prof.peak_bytes, **plan.stage_bytes}
    plan.components = {"profile": {f"the profile's own plan (batch {prof.batch_size}, set by its {prof.min_stage} stage)":
                                   prof.peak_bytes}, **plan.components}
    plan.peak_bytes = max(plan.peak_bytes, prof.peak_bytes)
    if prof.gpu_peak_bytes is not None:
        # the profile's spectra (every direction's, W S whole for the unweighted SVD) can need more of the GPU
        plan.gpu_stage_bytes = {"profile": prof.gpu_peak_bytes, **plan.gpu_stage_bytes}
        if prof.gpu_peak_bytes > (plan.gpu_peak_bytes or 0):
            plan.gpu_peak_bytes, plan.gpu_stage = prof.gpu_peak_bytes, "profile"
        plan.gpu_components = {"profile": {f"the profile's {prof.gpu_stage} stage": prof.gpu_peak_bytes},
                               **plan.gpu_components}
        if prof.gpu_min_bytes > (plan.gpu_min_bytes or 0):
            plan.gpu_min_bytes = prof.gpu_min_bytes
    if prof.strict_min_bytes > plan.strict_min_bytes:
        plan.strict_min_bytes = prof.strict_min_bytes
        plan.min_stage, plan.min_component = "profile", f"its {prof.min_stage} stage: {prof.min_component}"
    plan.min_max_mem_bytes = max(plan.min_max_mem_bytes, prof.min_max_mem_bytes)  # a fixed batch's may be the larger


def plan_job(cfg, processes: int = 1) -> Plan:
    """`streamsvd plan`: everything `run` checks and loads before its plan, then the plan (no OUT_DIR)."""
    from ..io.calibration import load_texts, load_tokenizer, sample_windows
    from ..model.architecture import check_seqlen, check_weights_match, empty_model, load_config

    from .preflight import check_original

    cfg.validate()
    check_original(cfg.model_dir, "plan the original checkpoint's job")
    ckpt = Checkpoint(cfg.model_dir)
    config = load_config(ckpt)
    check_seqlen(config, cfg.seqlen)
    tokenizer = load_tokenizer(ckpt.dir)
    text, _ = load_texts(cfg.calib)
    windows = sample_windows(tokenizer, text, cfg.calib_samples, cfg.seqlen, cfg.seed)
    model = empty_model(config, torch.float32)
    check_weights_match(model, ckpt)
    ranks = None
    if getattr(cfg, "profile", None) is not None:  # refused as `run` refuses it: missing, damaged, other settings
        from .pipeline import allocate_ranks, model_matrices
        from .lock import refuse_while_made
        from .profile import check_heldout, profile_identity, read_profile

        refuse_while_made(cfg.profile, "--profile")
        profile = read_profile(cfg.profile, profile_identity(ckpt, text, cfg.calib_samples, cfg.seqlen, cfg.seed,
                                                             windows=windows))
        if cfg.max_ppl_increase is not None:
            check_heldout(profile, cfg.heldout_rows)
        ranks = allocate_ranks(cfg, profile, model_matrices(model))  # run's ranks (and its refusals of a budget they cannot meet)
    elif not cfg.targeted:  # run's refusal before it profiles or writes (job/pipeline.CompressionJob)
        from ..math.allocate import check_smallest_ranks
        from .pipeline import model_matrices

        check_smallest_ranks(cfg.alloc, model_matrices(model), cfg.ratio, cfg.factors, cfg.rank_multiple)
    plan = build_plan(cfg, ckpt, fixed_batch=getattr(cfg, "batch_size", None), ranks=ranks, processes=processes)
    if processes > 1:  # refuses, as `run` under torchrun would, a job with fewer batches than processes
        from .distributed import World

        World(0, processes).share(cfg.calib_samples, plan.batch_size)
    del windows, model
    return plan
