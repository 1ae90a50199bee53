"""streamsvd: streaming truncated-SVD compression of decoder LLMs under a memory budget."""

__version__ = "0.1.0"


def load(out_dir, dtype=None, device="cpu"):
    """Load a streamsvd output (or a plain checkpoint) as a transformers model."""
    from .model.loading import load as _load

    return _load(out_dir, dtype=dtype, device=device)
