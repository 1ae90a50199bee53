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

With `--device cuda` each block is moved to the GPU and every batch of hidden states goes there for the block's
forward and back to the host store; the final norm and the head run there too where the head's float32 weight and a
chunk of logits fit --max-gpu-mem (else on the host). The GPU's batch is the most windows that fit --max-gpu-mem
beside the block (with job/device.py's allowance for workspaces), and torch's allocator is held to that budget.
"""

from __future__ import annotations

import math

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
from ..io.fsutil import new_held_folder, remove_abandoned_folders
from ..model.architecture import (check_seqlen, check_weights_match, decoder_layers, empty_model, load_config,
                                  materialize_base)
from ..model.capture import capture_layer_kwargs, first_layer_inputs, layer_args_on, run_layer
from ..model.loading import materialize_head, stored_layer
from .evaluate import LOGIT_CHUNK, add_in_order, eval_windows, result, states_nll
from .memory import default_budget, format_size
from .peak import fix_heap_thresholds, rss_bytes, trim_heap

COMPUTE_DTYPE = torch.float32


def hidden_on_disk(states_bytes: int, budget: int) -> bool:
    """Two copies of every window's hidden states (a block's inputs and outputs) stay in RAM only if
    they take at most a quarter of the budget."""
    return 2 * states_bytes > budget // 4


def eval_sizes(config, ckpt: Checkpoint, seqlen: int) -> tuple[int, int, int]:
    """(the largest block's weights in float32, one window's working set inside a block forward, one chunk of
    logits and its log-softmax), in bytes."""
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
    logits = 4 * 2 * LOGIT_CHUNK * config.vocab_size  # one chunk of logits and its log-softmax
    return 4 * block, per_window, logits


def eval_batch_size(config, ckpt: Checkpoint, model, seqlen: int, windows: int, budget: int, held: int) -> int:
    """The most windows per block forward that fit `budget`, counting what is already resident
    (measured), the largest block's weights in float32, one chunk of logits and `held` bytes of
    hidden states; refuses a budget too small for one window."""
    block, per_window, logits = eval_sizes(config, ckpt, seqlen)
    fixed = rss_bytes() + 2 * block + logits + held  # the block, and its copy while it is built
    if budget - fixed < per_window:
        from .plan import BASELINE_MARGIN_BYTES

        # the figure to give: rounded up, with the plan's margin for the baseline, which another process measures anew
        # (the bare need, printed in GiB, was refused when given: 682.4 MiB said, 682.6 MiB needed the next time)
        give = math.ceil((fixed + per_window + BASELINE_MARGIN_BYTES) / (1 << 20))
        raise StreamSVDError(f"--max-mem {format_size(budget)} is too small to evaluate: one window needs about "
                             f"{format_size(fixed + per_window)}", f"give --max-mem {give}M or more, or lower --seqlen")
    return max(1, min(windows, (budget - fixed) // per_window))


def gpu_room(budget: int) -> int:
    """What the tensors may take of a GPU budget, after job/device.py's allowance for cuBLAS's workspace and the
    caching allocator's rounding (the same allowance the job's plan makes)."""
    from .device import GPU_SLACK_BYTES, GPU_SLACK_FRACTION

    return int((budget - GPU_SLACK_BYTES) / (1 + GPU_SLACK_FRACTION))


def gpu_eval_batch_size(config, ckpt: Checkpoint, seqlen: int, windows: int, budget: int) -> int:
    """With --device cuda: the most windows per block forward that fit the GPU budget beside one block's float32
    weights (moved to the GPU whole); refuses a budget too small for one window."""
    block, per_window, _ = eval_sizes(config, ckpt, seqlen)
    room = gpu_room(budget) - block
    if room < per_window:
        from .device import GPU_SLACK_BYTES, GPU_SLACK_FRACTION

        need = int((block + per_window) * (1 + GPU_SLACK_FRACTION)) + GPU_SLACK_BYTES + 1
        raise StreamSVDError(f"--max-gpu-mem {format_size(budget)} is too small to evaluate on the GPU: a block and one "
                             f"window need about {format_size(need)}",
                             f"give --max-gpu-mem at least {format_size(need)}, or lower --seqlen")
    return max(1, min(windows, room // per_window))


def head_fits_gpu(config, seqlen: int, budget: int | None) -> bool:
    """Whether the final norm and the head run on the GPU: the head's float32 weight, one chunk of logits and one
    window's final states fit the GPU budget (after the blocks, which are gone by then); no budget: yes."""
    if budget is None:
        return True
    head = 4 * config.vocab_size * config.hidden_size
    return head + 4 * 2 * LOGIT_CHUNK * config.vocab_size + 2 * 4 * seqlen * config.hidden_size <= gpu_room(budget)


class _InMemory:
    """The ActivationFile interface over one tensor."""

    def __init__(self, shape: tuple[int, int, int]):
        self.data = torch.empty(shape, dtype=COMPUTE_DTYPE)

    def write(self, start: int, hidden: torch.Tensor) -> None:
        self.data[start : start + hidden.shape[0]] = hidden

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self.data[start:stop]


def streaming_perplexity(path, *args, **kwargs) -> dict:
    """_streaming_perplexity, with no `run` rewriting `path` meanwhile (job/lock.reading_output): a restart under an
    eval gave a mixed model's figure."""
    from .lock import reading_output

    with reading_output(Path(path)):
        return _streaming_perplexity(path, *args, **kwargs)


@torch.no_grad()
def _streaming_perplexity(path, text: str, seqlen: int, max_windows: int | None = None, max_mem: int | None = None,
                          work_dir: Path | None = None, progress: bool = True,
                          on_disk: bool | None = None, windows: torch.Tensor | None = None,
                          batch_size: int | None = None, device: str = "cpu", max_gpu_mem: int | None = None,
                          verify: bool = True) -> dict:
    """`on_disk`: None decides by the budget (`hidden_on_disk`); True or False forces it. `windows`: score these
    token windows instead of `text`'s (e.g. a job's held-out windows, io/calibration.heldout_windows).
    `batch_size`: windows per block forward (default: on the CPU about 2,048 tokens' worth within the budget, on a
    GPU the most that fit it and --max-gpu-mem).
    `device`: cpu, cuda or cuda:N (the blocks' forwards, and the head where it fits); `max_gpu_mem`: its budget."""
    import os

    from ..model.loading import check_finished
    from .device import check_device_flags, gpu_budget, hold_to_budget, peak_bytes, resolve_device
    from .distributed import World

    check_device_flags(device, max_gpu_mem)
    fix_heap_thresholds()  # as in a job (job/peak.py): a batch's intermediates reused from the heap
    gpu = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))  # refused here where torch sees no such GPU
    on_gpu = gpu.type != "cpu"
    gpu_bytes = gpu_budget(gpu, max_gpu_mem) if gpu.type == "cuda" else None
    world = World.current()

    path = Path(path)
    check_finished(path, verify)  # a streamsvd OUT_DIR's files against the sha256 its job recorded
    ckpt = Checkpoint(path)
    config = load_config(ckpt)
    check_seqlen(config, seqlen)
    if windows is None:
        windows = eval_windows(load_tokenizer(path), text, seqlen, max_windows)
    started = time.time()
    model = empty_model(config, COMPUTE_DTYPE)
    if "streamsvd" not in ckpt.raw_config_dict:  # an original checkpoint: its weights against its config, as `run`
        # checks them (a config with fewer layers, or without the biases the shards hold, scored another model)
        check_weights_match(model, ckpt)
    materialize_base(model, ckpt, COMPUTE_DTYPE)
    materialize_head(model, ckpt, COMPUTE_DTYPE)
    layer_args = capture_layer_kwargs(model, windows[:1])

    budget = max_mem if max_mem is not None else default_budget()
    n_all, hidden = len(windows), config.hidden_size
    if batch_size is not None and batch_size < 1:
        raise StreamSVDError(f"--batch-size {batch_size} is out of range", "give 1 or more windows, or leave it out")
    # this process's windows: all of them, or under torchrun its share of whole batches (the batch the ranks agree on)
    def fitting(count: int, held: int) -> int:
        """The most windows per forward that fit the host's and the GPU's budgets; on the CPU at most about 2,048
        tokens' worth (plan.cpu_batch: SmolLM2, 40 x 512 windows, 49.0 s at batch 4 against 65.4 s at 40, the same
        perplexity to the last bit; docs/RESULTS.md)."""
        from .plan import cpu_batch

        trim_heap()  # the baseline eval_batch_size measures is what is live
        host = eval_batch_size(config, ckpt, model, seqlen, count, budget, held)
        if not on_gpu:
            return min(host, cpu_batch(seqlen))
        return host if gpu_bytes is None else min(host, gpu_eval_batch_size(config, ckpt, seqlen, count, gpu_bytes))

    lo, hi = 0, n_all
    if world.active:
        guess = world.agreed_batch(batch_size, lambda: fitting(-(-n_all // world.size), 0))
        if -(-n_all // guess) < world.size:  # World.share's refusal names the calibration's flags, not eval's
            raise StreamSVDError(
                f"{n_all} evaluation window(s) of --seqlen {seqlen} in batches of {guess} make {-(-n_all // guess)} "
                f"batch(es), fewer than the {world.size} processes",
                f"give at least {world.size * guess} windows (a longer --text, a larger --max-windows or a smaller "
                "--batch-size), or start fewer processes")
        lo, hi = world.share(n_all, guess)
        batch_size = guess
    windows = windows[lo:hi]
    n = hi - lo
    shape = (n, windows.shape[1], hidden)
    states = activation_bytes(shape, "float32")
    if on_disk is None:
        on_disk = hidden_on_disk(states, budget)
    batch = min(batch_size or fitting(n, 0 if on_disk else 2 * states), max(n, 1))  # reported as used: not 100000 for 8
    if gpu_bytes is not None:
        hold_to_budget(gpu, gpu_bytes)
    head_here = on_gpu and head_fits_gpu(config, seqlen, gpu_bytes)

    scratch, held = _scratch(work_dir) if on_disk else (None, None)
    try:
        def store(i):
            return ActivationFile(scratch / f"hidden-{i}.bin", shape, "float32", create=True) if on_disk else _InMemory(shape)

        src = store(0)
        for start in range(0, n, batch):
            src.write(start, first_layer_inputs(model, windows[start : start + batch]))
        layers = decoder_layers(model)
        world.stage = "evaluation"  # for a lost rank's message
        for index in tqdm(range(len(layers)), desc="eval blocks", unit="block", disable=not progress):
            world.block = index
            layer = stored_layer(model, index, ckpt, COMPUTE_DTYPE).to(gpu)
            args, kwargs = layer_args_on(layer_args[index], gpu)
            dst = store((index + 1) % 2)
            for start in range(0, n, batch):
                dst.write(start, run_layer(layer, src.read(start, min(n, start + batch)).to(gpu), args, kwargs))
            del layer
            src = dst
        scored = _scores(model, src, windows, gpu if head_here else None)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        if held is not None:
            os.close(held)
    world.block = None
    total, count = add_in_order(world.gather(scored, "eval"))  # rank order is window order: one process's sum
    out = result(total, count, n_all, seqlen, time.time() - started)
    out.update(batch_size=batch, hidden_on_disk=on_disk, device=str(gpu))
    if on_gpu:
        out.update(head_on_device=head_here, gpu_peak_bytes=peak_bytes(gpu), max_gpu_mem_bytes=gpu_bytes)
    return out


def _scratch(work_dir: Path | None) -> tuple[Path, int | None]:
    """A new folder for the hidden states, `streamsvd-eval-XXXX` in `work_dir` (default: the system's temporary
    folder), held by its flock while this eval runs (io/fsutil.new_held_folder). A killed eval left its folder, two
    files of windows x seqlen x hidden float32 (GBs at 7B), for good: those no live eval holds are removed first."""
    parent = Path(work_dir) if work_dir is not None else Path(tempfile.gettempdir())
    remove_abandoned_folders(parent, "streamsvd-eval-")
    return new_held_folder(parent, "streamsvd-eval-")


def _scores(model, src, windows: torch.Tensor, device) -> list[tuple[float, int]]:
    """Each window's (NLL, tokens) from its last block's outputs: the final norm and the head on the host, or moved
    once to `device` (the windows' states go there one at a time)."""
    head, norm = model.get_output_embeddings(), model.model.norm
    weight, bias = head.weight, getattr(head, "bias", None)
    if device is not None:
        import copy

        weight, norm = weight.to(device), copy.deepcopy(norm).to(device)
        bias = bias.to(device) if bias is not None else None
    return states_nll(norm, weight, bias, getattr(model.config, "final_logit_softcapping", None), src.read, windows)
