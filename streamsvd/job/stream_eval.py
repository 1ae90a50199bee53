"""`streamsvd eval`, streamed: perplexity one decoder block at a time, like `run` reads a model.

The windows' hidden states go through block 0, then block 1, ... with one block in memory at a
time (read from the checkpoint or OUT_DIR by the same lazy reader `run` uses); the final norm and
the head are applied at the end, a window and a chunk of positions at a time. So a model larger
than RAM can be evaluated, and the figure equals the in-memory path's (tested to 1e-4 relative).
The hidden states of all windows stay in memory when they take at most a quarter of the budget,
else they go to two on-disk files that alternate, as in `run`.

Under torchrun (`torchrun --nproc-per-node N -m streamsvd eval ...`) each process streams its share of
the windows (whole batches, job/distributed.World.share) and the per-window figures are gathered and
added in window order on every process: the one-process perplexity with the same batch size, exactly.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import StreamSVDError
from ..io.activations import ActivationFile, activation_bytes
from ..io.calibration import load_tokenizer
from ..io.checkpoint import Checkpoint
from ..model.architecture import decoder_layers, empty_model, load_config, check_seqlen, materialize_base
from ..model.capture import capture_layer_kwargs, first_layer_inputs, run_layer
from ..model.loading import materialize_head, stored_layer
from .evaluate import add_in_order, eval_windows, head_nll, result
from .memory import default_budget, format_size
from .peak import rss_bytes

COMPUTE_DTYPE = torch.float32


def hidden_on_disk(states_bytes: int, budget: int) -> bool:
    """Two copies of every window's hidden states (a block's inputs and outputs) stay in RAM only if
    they take at most a quarter of the budget."""
    return 2 * states_bytes > budget // 4


def eval_batch_size(config, ckpt: Checkpoint, model, seqlen: int, windows: int, budget: int, held: int) -> int:
    """The most windows per block forward that fit `budget`, counting what is already resident
    (measured), the largest block's weights in float32, one chunk of logits and `held` bytes of
    hidden states; refuses a budget too small for one window."""
    from ..model.architecture import SUPPORTED

    layers = SUPPORTED[config.model_type]
    block = max((sum(ckpt.numel(k) for k in ckpt.keys() if k.startswith(f"{layers}.{i}."))
                 for i in range(config.num_hidden_layers)), default=0)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = getattr(config, "num_key_value_heads", heads) * head_dim
    inter = getattr(config, "intermediate_size", 4 * config.hidden_size)
    # one window's working set inside a block forward (float32): activations, q/k/v, MLP, scores
    per_token = 4 * (8 * config.hidden_size + 4 * heads * head_dim + 4 * kv + 4 * inter)
    per_window = seqlen * per_token + 4 * 2 * heads * seqlen * seqlen
    logits = 4 * 2 * 256 * config.vocab_size  # one chunk of logits and its log-softmax
    fixed = rss_bytes() + 2 * 4 * block + logits + held  # the block, and its copy while it is built
    if budget - fixed < per_window:
        need = fixed + per_window
        raise StreamSVDError(f"--max-mem {format_size(budget)} is too small to evaluate: one window needs about "
                             f"{format_size(need)}", f"give --max-mem at least {format_size(need)}, or lower --seqlen")
    return max(1, min(windows, (budget - fixed) // per_window))


class _InMemory:
    """The ActivationFile interface over one tensor."""

    def __init__(self, shape: tuple[int, int, int]):
        self.data = torch.empty(shape, dtype=COMPUTE_DTYPE)

    def write(self, start: int, hidden: torch.Tensor) -> None:
        self.data[start : start + hidden.shape[0]] = hidden

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self.data[start:stop]


@torch.no_grad()
def streaming_perplexity(path, text: str, seqlen: int, max_windows: int | None = None, max_mem: int | None = None,
                         work_dir: Path | None = None, progress: bool = True,
                         on_disk: bool | None = None, windows: torch.Tensor | None = None,
                         batch_size: int | None = None) -> dict:
    """`on_disk`: None decides by the budget (`hidden_on_disk`); True or False forces it. `windows`: score these
    token windows instead of `text`'s (e.g. a job's held-out windows, io/calibration.heldout_windows).
    `batch_size`: windows per block forward (default: the most that fit the budget)."""
    from ..model.loading import check_finished
    from .distributed import World

    world = World.current()

    path = Path(path)
    check_finished(path)
    ckpt = Checkpoint(path)
    config = load_config(ckpt)
    check_seqlen(config, seqlen)
    if windows is None:
        windows = eval_windows(load_tokenizer(path), text, seqlen, max_windows)
    started = time.time()
    model = empty_model(config, COMPUTE_DTYPE)
    materialize_base(model, ckpt, COMPUTE_DTYPE)
    materialize_head(model, ckpt, COMPUTE_DTYPE)
    layer_args = capture_layer_kwargs(model, windows[:1])

    budget = max_mem if max_mem is not None else default_budget()
    n_all, hidden = len(windows), config.hidden_size
    if batch_size is not None and batch_size < 1:
        raise StreamSVDError(f"--batch-size {batch_size} is out of range", "give 1 or more windows, or leave it out")
    # this process's windows: all of them, or under torchrun its share of whole batches (the batch the ranks agree on)
    lo, hi = 0, n_all
    if world.active:
        guess = world.agreed_batch(batch_size, lambda: eval_batch_size(config, ckpt, model, seqlen, -(-n_all // world.size),
                                                                         budget, 0))
        lo, hi = world.share(n_all, guess)
        batch_size = guess
    windows = windows[lo:hi]
    n = hi - lo
    shape = (n, windows.shape[1], hidden)
    states = activation_bytes(shape, "float32")
    if on_disk is None:
        on_disk = hidden_on_disk(states, budget)
    batch = batch_size or eval_batch_size(config, ckpt, model, seqlen, n, budget, 0 if on_disk else 2 * states)

    scratch = Path(tempfile.mkdtemp(prefix="streamsvd-eval-", dir=work_dir)) if on_disk else None
    try:
        def store(i):
            return ActivationFile(scratch / f"hidden-{i}.bin", shape, "float32", create=True) if on_disk else _InMemory(shape)

        src = store(0)
        for start in range(0, n, batch):
            src.write(start, first_layer_inputs(model, windows[start : start + batch]))
        layers = decoder_layers(model)
        for index in tqdm(range(len(layers)), desc="eval blocks", unit="block", disable=not progress):
            layer = stored_layer(model, index, ckpt, COMPUTE_DTYPE)
            args, kwargs = layer_args[index]
            dst = store((index + 1) % 2)
            for start in range(0, n, batch):
                dst.write(start, run_layer(layer, src.read(start, min(n, start + batch)), args, kwargs))
            del layer
            src = dst
        norm = model.model.norm
        scored = [head_nll(model, norm(src.read(w, w + 1)), windows[w : w + 1]) for w in range(n)]
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    total, count = add_in_order(world.gather(scored, "eval"))  # rank order is window order: one process's sum
    out = result(total, count, n_all, seqlen, time.time() - started)
    out.update(batch_size=batch, hidden_on_disk=on_disk)
    return out
