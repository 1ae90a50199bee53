"""streamsvd: streaming truncated-SVD compression of decoder LLMs under a memory budget."""

import os

__version__ = "0.1.0"

# Transparent huge pages for torch's large CPU tensors (read once, at torch's first allocation): a job
# allocates and frees batch-sized tensors all the time, and with 4 KiB pages the kernel's page
# faults were a third of a SmolLM2 job's CPU time; with 2 MiB pages the job took 22% less wall time
# at the same peak RSS (docs/RESULTS.md). THP_MEM_ALLOC_ENABLE=0 in the environment turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def load(out_dir, dtype=None, device="cpu", verify=True):
    """Load a streamsvd output (or a plain checkpoint) as a transformers model.

    `dtype`: a floating-point torch dtype or its name ("bfloat16"); default the stored one. `device`: cpu, cuda or
    cuda:N. Arguments of the wrong kind are a StreamSVDError with its `problem` and `fix`.

    `verify`: first check a streamsvd OUT_DIR's files against the sha256 its job recorded (`streamsvd verify`'s
    check, one read of the output at about 1 GB/s per core); False checks their sizes and headers only."""
    from .model.loading import load as _load

    return _load(out_dir, dtype=dtype, device=device, verify=verify)
