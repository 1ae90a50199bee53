"""run --device: where a job's blocks run and its linears are factored (the CPU, or one CUDA GPU within --max-gpu-mem).

With a GPU, each block is loaded to it (job/pipeline._load_layer) and every batch read from the activation files
goes there for the block forwards (`_forward`); the statistics are accumulated there (their float64 sums live with the
block; math/gram.py); each linear's factorisation runs there, and its factors come back (job/stages.factor_block);
outputs go back to the activation files on the host. Under torchrun the sums are added up over gloo on the host,
once per block. `profile` (and a job's own profile) runs its passes there too (the statistics pass, the
sensitivity forward and backward through the blocks) and its spectra (job/profile.block_spectra); the output head's
gradient and the held-out NLL, the shards and the state stay on the CPU. `eval --device cuda` runs its blocks there,
and its head where it fits (job/stream_eval.py).

The GPU's memory is a budget like --max-mem: the plan counts what each stage holds on the device (job/plan.py,
`gpu_stage_bytes`; the block, its statistics, a batch, the largest factorisation), `run` refuses a --max-gpu-mem below its
smallest before any work, and the
budget is handed to torch's allocator (`torch.cuda.set_per_process_memory_fraction`), so a step that would
exceed it fails there instead of growing past it. The CUDA runtime's host memory is in the plan's measured
baseline: the plan times the device (plan.machine_speed), which loads it, before it measures the process.

Matrix products run in full float32 / float64 on the device (TF32 is turned off for the job): the loss
identities the factors are chosen by hold to the same round-off as on the CPU. The factors differ from the
CPU's at round-off (different BLAS and LAPACK), so --device is not part of the job's identity, like the
number of BLAS threads: a job may resume on another device, and each block is then valid but not
byte-identical to an uninterrupted run on one device.
"""

from __future__ import annotations

import re

from ..errors import StreamSVDError
from .memory import format_size

DEVICE_HELP = (
    "where the job computes: cpu (default) or cuda / cuda:N (an NVIDIA GPU; under torchrun, cuda is each process's own "
    "GPU, cuda:LOCAL_RANK). On a GPU: the block forwards (and backward, the profile's), the statistics and every "
    "factorisation; the output head, the activation files and the output stay on the host. "
    "Needs a CUDA build of torch. Costs GPU memory for a block, a batch and the largest factorisation (`streamsvd plan "
    "--device cuda` says how much; the host needs no more than on the CPU). GPU timings and its agreement with the CPU "
    "are not measured yet (docs/RESULTS.md)"
)
MAX_GPU_MEM_HELP = (
    "GPU memory budget with --device cuda, e.g. 20G (default: 90%% of the GPU's free memory when the job starts). "
    "The plan refuses a budget below the largest factorisation's need, and torch's allocator is held to it. Under "
    "torchrun, per process: processes sharing one GPU (--device cuda:0) each need theirs given"
)
# With --max-gpu-mem left out: this share of the device's free memory when the job starts.
DEFAULT_GPU_SHARE = 0.9
# What the device holds beyond the plan's tensors: cuSOLVER's and cuBLAS's workspaces (LAPACK's syevd work is in
# the plan's counts on both devices) and the caching allocator's rounding to 2 MiB blocks. An allowance, not a
# measurement: no GPU was lent to this task (docs/RESULTS.md marks the GPU rows unmeasured).
GPU_SLACK_BYTES = 256 << 20
GPU_SLACK_FRACTION = 0.10


def check_device_name(name: str) -> str:
    """`name` if it is cpu, cuda or cuda:N; else one error and its fix (no torch needed)."""
    if name == "cpu" or name == "cuda" or re.fullmatch(r"cuda:\d+", name or ""):
        return name
    raise StreamSVDError(f"unknown --device {name!r}", "choose cpu, cuda or cuda:N (N: the GPU's index, from 0)")


def check_device_flags(name: str, max_gpu_mem: int | None) -> None:
    """--device and --max-gpu-mem together (run's, profile's and eval's): one error and its fix (no torch needed)."""
    check_device_name(name)
    if max_gpu_mem is not None and max_gpu_mem <= 0:
        raise StreamSVDError(f"--max-gpu-mem {max_gpu_mem} is not a positive size", "give a GPU budget such as 20G")
    if max_gpu_mem is not None and name == "cpu":
        raise StreamSVDError("--max-gpu-mem without --device cuda does nothing", "add --device cuda, or drop --max-gpu-mem")


def resolve_device(name: str, local_rank: int = 0):
    """The torch.device of --device `name` in a process of local rank `local_rank` (0 without torchrun).

    Refused, with its fix, where torch sees no such GPU. On a GPU, TF32 products are turned off for the process."""
    import torch

    check_device_name(name)
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        built = ("this torch has no CUDA support" if torch.version.cuda is None
                 else f"this torch (CUDA {torch.version.cuda}) finds no GPU or driver")
        raise StreamSVDError(f"--device {name}: {built} (torch {torch.__version__})",
                             "install a CUDA build of torch on a machine with an NVIDIA GPU and its driver "
                             "(pytorch.org lists the commands), or leave --device out to run on the CPU")
    index = int(name.split(":", 1)[1]) if ":" in name else local_rank
    count = torch.cuda.device_count()
    if index >= count:
        raise StreamSVDError(f"--device {name}: torch sees {count} GPU{'s' if count != 1 else ''}"
                             + (f" (cuda means cuda:{index} in the process of local rank {index})" if ":" not in name else ""),
                             f"give cuda:0 to cuda:{count - 1}, or start at most {count} processes per machine")
    torch.backends.cuda.matmul.allow_tf32 = False  # full float32 products: the loss identities' round-off
    return torch.device("cuda", index)


def free_and_total(device) -> tuple[int, int]:
    """(free, total) bytes of a CUDA device."""
    import torch

    return tuple(int(v) for v in torch.cuda.mem_get_info(device))


def gpu_budget(device, max_gpu_mem: int | None) -> int:
    """The GPU budget: --max-gpu-mem, or DEFAULT_GPU_SHARE of the device's free memory; refused above its total."""
    free, total = free_and_total(device)
    if max_gpu_mem is None:
        return int(free * DEFAULT_GPU_SHARE)
    if max_gpu_mem > total:
        raise StreamSVDError(f"--max-gpu-mem {format_size(max_gpu_mem)} is more than {device} has "
                             f"({format_size(total)})", f"give at most {total >> 20}M, or leave it out")
    return max_gpu_mem


def hold_to_budget(device, budget: int) -> None:
    """torch's caching allocator on `device` refuses to grow past `budget` bytes (an out-of-memory error there)."""
    import torch

    _, total = free_and_total(device)
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)
    torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device) -> int | None:
    """The most the job's tensors held on `device` at once (torch's count), None on the CPU."""
    import torch

    if device is None or device.type != "cuda":
        return None
    return int(torch.cuda.max_memory_allocated(device))
