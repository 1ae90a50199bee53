"""`streamsvd export onnx OUT_DIR DIR`: a decoder with its KV cache as an ONNX model, checked in onnxruntime.

The graph comes from torch's own exporter (`torch.onnx.export(..., dynamo=True)`: torch.export, then
onnxscript's translation and optimiser); nothing is written by hand. Before exporting, each compressed
linear is swapped for a module that computes the same product on the unflattened activations with its
factors stored transposed (K x N), so each becomes plain ONNX ops on named initializers:

    pivoted: X = x^T; Gather(X, p) + MatMul(in_rest, Gather(X, q)), then MatMul(.^T, out_factor_t) [+ bias]
    plain:   MatMul(MatMul(x, in_factor_t), out_factor_t) [+ bias]
    dense:   MatMul(x, weight_t) [+ bias]   (a matrix streamsvd kept whole)

That is the form onnxruntime's MatMulNBits quantiser takes (it quantises MatMul nodes with a constant
K x N weight; a Gemm it skips), so `--onnx-int4` turns exactly those MatMuls, the decoder blocks'
linears, into 4-bit `MatMulNBits`, and leaves the embeddings and the output head in float32. With
`--onnx-int4` a pivoted linear is first re-factored as balanced plain factors U sqrt(S), sqrt(S) V^T
of the same product and rank: rounding A' and B' themselves wrecks the model (SmolLM2 at ratio 0.4:
perplexity 678 -> ~50000; balanced factors: -> 1540; docs/RESULTS.md, "ONNX check").

Inputs: input_ids, attention_mask (batch x past+seq), position_ids, past_key_values.{i}.key/value
(batch x kv_heads x past x head_dim; zero-length for the first call). Outputs: logits and
present.{i}.key/value: the names optimum and onnxruntime-genai use. The cache is transformers' own
DynamicCache, built from the inputs inside the traced forward, so attention and masks are
transformers' code, exported as traced.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import StreamSVDError
from ..io.fsutil import atomic_write_bytes, file_in_the_way, fsync_dir, fsync_file, remove_temporaries, within

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
RECORD = "streamsvd_onnx.json"
# An export under way (made before an earlier export's files are removed, removed after RECORD is written): a killed
# export leaves it, so the same command takes the DIR again (it was refused: not empty, no earlier export).
PARTIAL = ".streamsvd_onnx_partial"
# The graph is saved under this name, checked there, and renamed to MODEL_FILE last: a kill before the check ended left
# a model.onnx onnxruntime opens beside config.json and the tokenizer, never checked (onnx.save_model is not atomic,
# so a larger one could be cut short), marked unfinished only by hidden PARTIAL. The external data keeps its name.
STAGED_FILE = f".{MODEL_FILE}.partial"
ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")
INSTALL_FIX = "pip install 'streamsvd[onnx]' (onnx, onnxruntime and onnxscript, about 37 MB of wheels)"
# Initializers above this many bytes go to model.onnx.data (protobuf caps one file at 2 GiB).
EXTERNAL_DATA_BYTES = 1 << 30
# The export is refused when onnxruntime's logits differ from PyTorch's by more than this, relative to
# the largest logit. Measured: ~1e-6 on tiny models, 2.8e-5 on SmolLM2-135M (30 layers; the decode step
# on a random cache); a graph that computes something else is off by O(1) (docs/RESULTS.md, "ONNX check").
FLOAT_TOLERANCE = 1e-3
# Copied beside model.onnx where OUT_DIR has them (with the base family's config.json).
SIDE_FILES = {"generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
              "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja"}
# Weight names the int4 quantiser takes: the transposed factors of the decoder blocks' linears.
QUANT_SUFFIXES = (".in_factor_t", ".out_factor_t", ".weight_t")


def require_onnx() -> None:
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise StreamSVDError(f"the ONNX export needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                             "not installed", INSTALL_FIX)


class _PivotedMatMul(nn.Module):
    """PivotedLinear's product with the tokens as columns: X = x^T (in x T); Z = X[p] + B' X[q] (r x T);
    y = Z^T A'^T (+ bias). Transpose, two Gathers on axis 0, MatMul, Add, MatMul.

    Gathering rows of x^T copies whole rows; gathering x's last axis, as PyTorch's module does, copies
    one float at a time in onnxruntime and was a third of a SmolLM2 prefill there (135 of 393 ms for
    128 tokens). This form: prefill 19-29% faster, batch-1 decode 6-13% slower (two more nodes per
    linear), no more bytes (docs/RESULTS.md, "Inference speed").
    """

    def __init__(self, m):
        super().__init__()
        r = m.rank
        self.in_features = m.in_features
        self.register_buffer("head", m.pivots[:r].detach().clone())
        self.register_buffer("rest", m.pivots[r:].detach().clone())
        self.in_rest = nn.Parameter(m.in_rest.detach().contiguous(), requires_grad=False)  # r x (in - r)
        self.out_factor_t = nn.Parameter(m.out_factor.detach().t().contiguous(), requires_grad=False)
        self.bias = None if m.bias is None else nn.Parameter(m.bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        cols = x.reshape(-1, self.in_features).t()
        z = cols.index_select(0, self.head) + torch.matmul(self.in_rest, cols.index_select(0, self.rest))
        y = torch.matmul(z.t(), self.out_factor_t)
        y = y if self.bias is None else y + self.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])


class _PivotedColumns(nn.Module):
    """PivotedLinear's product as PyTorch's module computes it: x[..., p] + x[..., q] B'^T, then A'^T (+ bias).

    Gathers on the last axis (`--onnx-pivoted columns`): two nodes fewer per linear than the default
    rows form, so a little faster for batch-1 decoding, and much slower for prompts (docs/RESULTS.md).
    """

    def __init__(self, m):
        super().__init__()
        r = m.rank
        self.register_buffer("head", m.pivots[:r].detach().clone())
        self.register_buffer("rest", m.pivots[r:].detach().clone())
        self.in_rest_t = nn.Parameter(m.in_rest.detach().t().contiguous(), requires_grad=False)
        self.out_factor_t = nn.Parameter(m.out_factor.detach().t().contiguous(), requires_grad=False)
        self.bias = None if m.bias is None else nn.Parameter(m.bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        z = x.index_select(-1, self.head) + torch.matmul(x.index_select(-1, self.rest), self.in_rest_t)
        y = torch.matmul(z, self.out_factor_t)
        return y if self.bias is None else y + self.bias


def _pivot_basis(m, dtype: torch.dtype) -> torch.Tensor:
    """([I | B'] P^T)^T of a pivoted module (in x r): row p_i is e_i, the rows q are B'^T."""
    r = m.rank
    basis = torch.zeros(m.in_features, r, dtype=dtype)
    basis[m.pivots[:r]] = torch.eye(r, dtype=dtype)
    basis[m.pivots[r:]] = m.in_rest.detach().to(dtype).t()
    return basis


class _PlainMatMul(nn.Module):
    """LowRankLinear's product: (x @ in_factor^T) @ out_factor^T (+ bias); two MatMuls."""

    def __init__(self, in_factor_t, out_factor_t, bias):
        super().__init__()
        self.in_factor_t = nn.Parameter(in_factor_t.detach().contiguous(), requires_grad=False)
        self.out_factor_t = nn.Parameter(out_factor_t.detach().contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def of(cls, m) -> "_PlainMatMul":
        return cls(m.in_factor.t(), m.out_factor.t(), m.bias)

    @classmethod
    def balanced(cls, m) -> "_PlainMatMul":
        """A pivoted module's product W' = A' [I | B'] P as U sqrt(S), sqrt(S) V^T at the same rank (float64 SVD).

        For 4-bit rounding: B' holds small corrections that cancel in B' A' (the pivoted form is
        ill-conditioned for rounding), so rounding A' and B' moves W' by ~33% of its norm on SmolLM2, the
        balanced factors by ~12% (rounding W' itself: ~8%). Costs r^2 more numbers per linear.
        """
        r = m.rank
        basis = _pivot_basis(m, torch.float64)
        u, s, vh = torch.linalg.svd(basis @ m.out_factor.detach().double().t(), full_matrices=False)  # in x out
        root = s[:r].sqrt()
        dtype = m.out_factor.dtype
        return cls((u[:, :r] * root).to(dtype), (root[:, None] * vh[:r]).to(dtype), m.bias)

    @classmethod
    def folded(cls, m) -> "_PlainMatMul":
        """A pivoted module as plain factors [I | B'] P^T and A' (`--onnx-pivoted folded`): no Gather, r^2 more numbers."""
        return cls(_pivot_basis(m, m.out_factor.dtype), m.out_factor.t(), m.bias)

    def forward(self, x):
        y = torch.matmul(torch.matmul(x, self.in_factor_t), self.out_factor_t)
        return y if self.bias is None else y + self.bias


class _DenseMatMul(nn.Module):
    """nn.Linear as one MatMul on a named K x N weight (so the int4 quantiser can find it)."""

    def __init__(self, m):
        super().__init__()
        self.weight_t = nn.Parameter(m.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = None if m.bias is None else nn.Parameter(m.bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        y = torch.matmul(x, self.weight_t)
        return y if self.bias is None else y + self.bias


# How a pivoted module goes into the graph (`--onnx-pivoted`); "balanced" is what --onnx-int4 uses.
PIVOTED_FORMS = {
    "rows": _PivotedMatMul,
    "columns": _PivotedColumns,
    "folded": _PlainMatMul.folded,
    "balanced": _PlainMatMul.balanced,
}


def _takes_pivoted_form(module: nn.Module) -> bool:
    """Whether export_form puts `module` into the graph in a PIVOTED_FORMS form (`--onnx-pivoted`): a pivoted module
    below full rank (one at full rank is the dense matrix it is; plain factors and dense linears have one form)."""
    from ..model.lowrank import PivotedLinear

    return isinstance(module, PivotedLinear) and module.rank < module.in_features


def export_form(model: nn.Module, pivoted: str = "rows") -> int:
    """Swap every linear of the decoder blocks for its MatMul form, in place; how many were swapped.

    `pivoted`: the form of pivoted modules, a key of PIVOTED_FORMS ("balanced": balanced plain factors,
    `_PlainMatMul.balanced`, the form that survives 4-bit rounding).
    """
    from ..model.architecture import decoder_layers
    from ..model.lowrank import LowRankLinear, PivotedLinear, replace_module

    swapped = 0
    for layer in decoder_layers(model):
        for name, module in list(layer.named_modules()):
            if _takes_pivoted_form(module):
                new = PIVOTED_FORMS[pivoted](module)
            elif isinstance(module, PivotedLinear):  # full rank: no in_rest columns
                new = _DenseMatMul(_as_linear(module))
            elif isinstance(module, LowRankLinear):
                new = _PlainMatMul.of(module)
            elif isinstance(module, nn.Linear):
                new = _DenseMatMul(module)
            else:
                continue
            replace_module(layer, name, new)
            swapped += 1
    return swapped


def _as_linear(m) -> nn.Linear:
    """A pivoted module of full rank (no in_rest columns) as the dense matrix it is."""
    eye = torch.eye(m.in_features, dtype=m.out_factor.dtype)
    linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=m.out_factor.dtype)
    with torch.no_grad():
        linear.weight.copy_(m(eye).t() if m.bias is None else (m(eye) - m.bias).t())
        if m.bias is not None:
            linear.bias.copy_(m.bias)
    return linear


def cache_shape(config) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of the model's KV cache."""
    text = config.get_text_config()
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return text.num_hidden_layers, kv, head_dim


def io_names(layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    present = [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


class _Decoder(nn.Module):
    """model(input_ids, attention_mask, position_ids, *past) -> (logits, *present), through a DynamicCache."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.layers = cache_shape(model.config)[0]
        # transformers 5.x renames past_key_values to cache (the old name warns until 5.40).
        self.cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        # No config: every layer a full one. With it, a sliding-window layer's cache is built from the past it is fed
        # (window - 1 tokens) and counts only those as seen, so once the window had filled its mask took the first
        # columns of attention_mask instead of the last: a left-padded row's decode steps were wrong (Gemma 2/3). The
        # sliding window is then applied by the mask alone, and such a layer's present keeps every token.
        cache = DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2])))
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **{self.cache_kw: cache})
        present = []
        for layer in cache.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def _step_inputs(batch: int, seq: int, past: int, config, vocab: int, seed: int):
    layers, kv, head_dim = cache_shape(config)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    pos = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    cache = [torch.randn(batch, kv, past, head_dim, generator=g) for _ in range(2 * layers)]
    return ids, mask, pos, cache


def _padded_inputs(config, vocab: int, seed: int) -> dict:
    """A left-padded batch of 2 as generate() feeds it: a prefill past the sliding window (where the model has
    sliding layers; their cache was once wrong only there, for a padded row), then one decode step on its cache;
    "whole": the same tokens in one pass without a cache, the reference."""
    text = config.get_text_config()
    sliding = "sliding_attention" in (getattr(text, "layer_types", None) or [])
    length = (text.sliding_window if sliding and getattr(text, "sliding_window", None) else 8) + 4
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, length + 1), generator=g)
    mask = torch.ones(2, length + 1, dtype=torch.long)
    mask[0, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"prefill": (ids[:, :-1], mask[:, :-1], pos[:, :-1]), "step": (ids[:, -1:], mask, pos[:, -1:]),
            "whole": (ids, mask, pos)}


def export_onnx(out_dir, dest, int4: bool = False, block_size: int = 32, check: bool = True,
                pivoted: str | None = None, verify: bool = True) -> dict:
    """Export OUT_DIR (a streamsvd output, or any checkpoint streamsvd.load reads) to DEST; the record written.

    DEST receives model.onnx (+ model.onnx.data above 1 GiB of weights), config.json, the generation
    config and tokenizer files, and streamsvd_onnx.json (inputs, outputs, options, the check's figures).
    With `check`, onnxruntime runs a prefill, one cached decode step and a left-padded batch's decode step on
    random tokens (`_check`), and the export is refused if a float32 graph's logits differ from PyTorch's beyond FLOAT_TOLERANCE.
    `pivoted`: "rows" (None: the default), "columns" or "folded" (PIVOTED_FORMS); with `int4`, pivoted modules
    are always balanced plain factors. Given (--onnx-pivoted) for `int4` or for a model with no pivoted module below
    full rank (`run --factors plain`, a plain checkpoint), where it would change nothing, it is refused.
    DEST is locked from its check to the record (job/lock.destination_lock).
    """
    from ..job.lock import destination_lock, reading_output

    require_onnx()
    with destination_lock(Path(dest), "DIR"), reading_output(Path(out_dir)):
        return _export_onnx(out_dir, dest, int4, block_size, check, pivoted, verify)


def _export_onnx(out_dir, dest, int4: bool, block_size: int, check: bool, pivoted: str | None, verify: bool) -> dict:
    import onnx
    import onnxruntime
    import transformers

    from ..model.loading import load

    out_dir, dest = Path(out_dir), Path(dest)
    if block_size < 16 or block_size & (block_size - 1):
        raise StreamSVDError(f"--onnx-block-size {block_size} is not a power of two >= 16",
                             "use 16, 32, 64 or 128 (what MatMulNBits takes)")
    if pivoted is not None and pivoted not in PIVOTED_FORMS.keys() - {"balanced"}:
        raise StreamSVDError(f"--onnx-pivoted {pivoted!r} is not a form", "use rows (default), columns or folded")
    if int4 and pivoted is not None:
        raise StreamSVDError("--onnx-pivoted applies to float32 exports; with --onnx-int4 pivoted factors are always "
                             "exported as balanced plain factors", "drop --onnx-pivoted, or --onnx-int4")
    _check_dest(dest, out_dir)
    start = time.perf_counter()
    model = load(out_dir, dtype=torch.float32, verify=verify)
    if pivoted is not None and not any(_takes_pivoted_form(m) for m in model.modules()):
        raise StreamSVDError(f"--onnx-pivoted {pivoted} sets the form of pivoted factors, and {out_dir} has none below "
                             "full rank (made with `run --factors plain`, or not compressed)",
                             "drop --onnx-pivoted: plain factors go into the graph as two MatMuls")
    pivoted = pivoted or "rows"
    config = model.config
    layers, kv, head_dim = cache_shape(config)
    vocab = config.get_text_config().vocab_size
    # Reference logits from the model as streamsvd loads it, before the MatMul forms are swapped in.
    checks = [_step_inputs(1, 7, 0, config, vocab, seed=1), _step_inputs(2, 1, 6, config, vocab, seed=2)]
    decoder = _Decoder(model).eval()
    padded = _padded_inputs(config, vocab, seed=3)
    with torch.no_grad():
        expected = [decoder(ids, mask, pos, *cache)[0].numpy() for ids, mask, pos, cache in checks]
        ids, mask, pos = padded["whole"]
        expected.append(model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1:].numpy())
    swapped = export_form(model, "balanced" if int4 else pivoted)
    names_in, names_out = io_names(layers)
    dyn = torch.export.Dim.DYNAMIC
    tokens = {0: dyn, 1: dyn}
    shapes = (tokens, tokens, tokens, tuple({0: dyn, 2: dyn} for _ in range(2 * layers)))
    ids, mask, pos, cache = _step_inputs(2, 5, 3, config, vocab, seed=0)
    try:
        with torch.no_grad(), _quiet():
            program = torch.onnx.export(decoder, (ids, mask, pos, *cache), None, input_names=names_in,
                                        output_names=names_out, dynamic_shapes=shapes, dynamo=True, optimize=True,
                                        verbose=False)
    except Exception as e:  # the exporter's own failure, on a model family it cannot trace yet
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise StreamSVDError(
            f"torch's ONNX exporter failed on this {config.model_type} model ({type(e).__name__}: {first})",
            f"tested with torch 2.13 and transformers 5.24 (here: torch {torch.__version__}, transformers "
            f"{transformers.__version__}); try those versions, or report it with the model's config.json") from e
    proto = program.model_proto
    del program, decoder, model
    quantised = 0
    if int4:
        with _quiet():
            proto, quantised = quantize_int4(proto, block_size)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / PARTIAL).touch()
    # what a killed export was writing and never renamed into place (`.NAME.tmp-PID`): not left beside this one
    remove_temporaries(dest, [MODEL_FILE, DATA_FILE, RECORD, "config.json", *sorted(SIDE_FILES)])
    for stale in (dest / MODEL_FILE, dest / DATA_FILE, dest / RECORD, dest / STAGED_FILE):
        stale.unlink(missing_ok=True)
    for node in proto.graph.node:  # the exporter's per-node stack traces and class paths: ~8 MB on SmolLM2
        del node.metadata_props[:]
    weight_bytes = sum(len(t.raw_data) for t in proto.graph.initializer)
    external = weight_bytes > EXTERNAL_DATA_BYTES
    staged = dest / STAGED_FILE
    onnx.save_model(proto, str(staged), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)
    del proto
    if external:  # onnx writes the data file owner-only; give it the mode model.onnx has
        umask = os.umask(0)
        os.umask(umask)
        (dest / DATA_FILE).chmod(0o666 & ~umask)
    _copy_side_files(out_dir, dest)
    record = {
        "source": str(out_dir), "format": "onnx", "file": MODEL_FILE, "external_data": DATA_FILE if external else None,
        "inputs": names_in, "outputs": names_out, "cache": {"layers": layers, "kv_heads": kv, "head_dim": head_dim},
        "dtype": "float32", "int4": int4, "block_size": block_size if int4 else None,
        "linears_as_matmul": swapped, "matmul_nbits": quantised,
        "pivoted_as": "balanced" if int4 else pivoted,
        "bytes": sum(p.stat().st_size for p in (staged, dest / DATA_FILE) if p.exists()),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__},
        "export_seconds": round(time.perf_counter() - start, 2),
    }
    if check:
        record["check"] = _check(staged, checks, expected, padded)
        refuse_if_off(dest, record)
    fsync_file(staged)
    if external:
        fsync_file(dest / DATA_FILE)
    os.replace(staged, dest / MODEL_FILE)  # checked (or --no-check given): only now under the name users open
    fsync_dir(dest)
    atomic_write_bytes(dest / RECORD, (json.dumps(record, indent=1) + "\n").encode())
    (dest / PARTIAL).unlink(missing_ok=True)
    return record


def refuse_if_off(dest: Path, record: dict) -> None:
    """Remove a float32 export whose check exceeds FLOAT_TOLERANCE and say so (int4 is only reported)."""
    diff = record["check"]["max_rel_diff"]
    if record["int4"] or diff <= FLOAT_TOLERANCE:
        return
    # Every file the export wrote: the side files left alone made DIR "not empty and holds no earlier ONNX export",
    # so the same command was refused after the fix it names.
    for name in (STAGED_FILE, MODEL_FILE, DATA_FILE, "config.json", *sorted(SIDE_FILES), PARTIAL):
        (dest / name).unlink(missing_ok=True)
    raise StreamSVDError(
        f"onnxruntime's logits differ from PyTorch's by {diff:.2e} of the largest logit (more than "
        f"{FLOAT_TOLERANCE:g}); the export was removed",
        "report this with the model's config.json: the graph does not compute the model")


@contextlib.contextmanager
def _quiet():
    """The exporter's and the quantiser's progress logs and deprecation warnings, kept off the terminal."""
    names = ("torch.onnx", "torch.export", "onnxscript", "onnx_ir", "onnxruntime.quantization.matmul_nbits_quantizer")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _check_dest(dest: Path, out_dir: Path) -> None:
    from ..job.lock import entries_besides_lock

    if dest.resolve() == out_dir.resolve():
        raise StreamSVDError(f"DIR {dest} is OUT_DIR itself", "give a new directory for the export")
    if within(dest, out_dir):
        raise StreamSVDError(f"DIR {dest} is inside OUT_DIR {out_dir}", "give a directory outside it")
    if dest.exists() and not dest.is_dir():
        raise StreamSVDError(f"{dest} is a file", "give a new directory for the export")
    blocker = file_in_the_way(dest)
    if blocker is not None:
        raise StreamSVDError(f"{dest} cannot be made: {blocker} is not a directory", "give a new directory for the export")
    if dest.is_dir() and entries_besides_lock(dest) and not (dest / RECORD).exists() and not (dest / PARTIAL).exists():
        raise StreamSVDError(f"{dest} is not empty and holds no earlier ONNX export",
                             "give a new or empty directory (an earlier `export onnx` directory is overwritten)")


def _copy_side_files(out_dir: Path, dest: Path) -> None:
    """config.json, generation config and tokenizer files: what transformers and onnxruntime-genai read beside it."""
    from ..io.checkpoint import Checkpoint
    from ..io.fsutil import atomic_write_json

    for name in sorted(SIDE_FILES):
        if (out_dir / name).is_file():
            shutil.copyfile(out_dir / name, dest / name)
        else:  # an earlier export's, of another model: its chat template or tokenizer would be read with this model
            (dest / name).unlink(missing_ok=True)
    # The base family's config (an OUT_DIR's says model_type "streamsvd" and points at remote code the
    # export does not carry; the graph itself holds the factors).
    config = dict(Checkpoint(out_dir).config_dict)
    config.pop("streamsvd", None)
    for key in ("dtype", "torch_dtype"):  # the graph computes in float32 whatever the source's weights were stored in
        if key in config:
            config[key] = "float32"
    atomic_write_json(dest / "config.json", config)


def quantize_int4(proto, block_size: int = 32):
    """(quantised ModelProto, number of MatMulNBits): onnxruntime's MatMulNBitsQuantizer on the decoder
    blocks' MatMuls of an exported graph (round-to-nearest, asymmetric, one scale and zero point per
    `block_size` inputs); the embeddings, the head and the attention's own MatMuls are left as they are."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    initializers = {t.name for t in proto.graph.initializer}
    matmuls = [n for n in proto.graph.node if n.op_type == "MatMul"]
    # The quantiser takes every MatMul with a constant weight unless told to exclude it (nodes_to_include
    # only adds to that): exclude all but the blocks' linears, so the head stays float32.
    exclude = [n.name for n in matmuls if not (len(n.input) > 1 and n.input[1] in initializers
                                               and n.input[1].endswith(QUANT_SUFFIXES))]
    if len(exclude) == len(matmuls):
        return proto, 0
    quantizer = MatMulNBitsQuantizer(proto, bits=4, block_size=block_size, is_symmetric=False,
                                     nodes_to_exclude=exclude)
    quantizer.process()
    out = quantizer.model.model
    return out, sum(1 for n in out.graph.node if n.op_type == "MatMulNBits")


def _check(path: Path, checks, expected, padded: dict) -> dict:
    """onnxruntime against PyTorch: a 7-token prefill (empty cache), a batch-2 decode step on a 6-token cache, and a
    left-padded batch's decode step on the cache its own prefill made (`_padded_inputs`) against one uncached pass."""
    import numpy as np

    session = OnnxDecoder(path)
    got = [session.step(ids.numpy(), mask.numpy(), pos.numpy(), [c.numpy() for c in cache])[0]
           for ids, mask, pos, cache in checks]
    _, present = session.step(*(t.numpy() for t in padded["prefill"]), session.empty_cache(2))
    got.append(session.step(*(t.numpy() for t in padded["step"]), present)[0])
    diffs, agree, scale = [], [], 0.0
    for have, want in zip(got, expected):
        diffs.append(float(np.abs(have - want).max()))  # NaN where either is: refused below as off
        agree.append(float((have.argmax(-1) == want.argmax(-1)).mean()))
        scale = max(scale, float(np.abs(want).max()))
    off = max(diffs) if all(np.isfinite(diffs)) else float("inf")
    return {"prefill_max_abs_diff": diffs[0], "decode_max_abs_diff": diffs[1], "padded_decode_max_abs_diff": diffs[2],
            "max_abs_logit": scale, "max_rel_diff": off / max(scale, 1e-12), "argmax_agreement": min(agree)}


class OnnxDecoder:
    """An exported model in onnxruntime: one step at a time, or greedy generation feeding the cache back."""

    def __init__(self, path, threads: int | None = None):
        require_onnx()
        import onnxruntime as ort

        path = Path(path)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path / MODEL_FILE if path.is_dir() else path), options,
                                            providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.past_names = [i.name for i in past]
        self.past_dims = [(i.shape[1], i.shape[3]) for i in past]

    def empty_cache(self, batch: int):
        import numpy as np

        return [np.zeros((batch, kv, 0, hd), dtype=np.float32) for kv, hd in self.past_dims]

    def step(self, input_ids, attention_mask, position_ids, cache):
        """(logits, present) for one call; `cache` is the list of past key/value arrays, layer by layer."""
        import numpy as np

        feeds = {"input_ids": np.asarray(input_ids, dtype=np.int64), "attention_mask": np.asarray(attention_mask, dtype=np.int64),
                 "position_ids": np.asarray(position_ids, dtype=np.int64), **dict(zip(self.past_names, cache))}
        out = self.session.run(None, feeds)
        return out[0], out[1:]

    def generate(self, input_ids, max_new_tokens: int, eos_token_id=None):
        """Greedy decoding (the prompt once, then one token a step through the cache); prompt + new tokens.

        Stops early only when every sequence has produced `eos_token_id` (int or list), as generate() does.
        """
        import numpy as np

        ids = np.asarray(input_ids, dtype=np.int64)
        batch, length = ids.shape
        eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        cache = self.empty_cache(batch)
        step_ids, pos = ids, np.broadcast_to(np.arange(length), (batch, length))
        done = np.zeros(batch, dtype=bool)
        for _ in range(max_new_tokens):
            total = ids.shape[1]
            logits, cache = self.step(step_ids, np.ones((batch, total), dtype=np.int64), pos, cache)
            nxt = logits[:, -1].argmax(-1)
            if eos:
                pad = next(iter(eos))
                nxt = np.where(done, pad, nxt)
                done |= np.isin(nxt, list(eos))
            ids = np.concatenate([ids, nxt[:, None]], axis=1)
            if eos and done.all():
                break
            step_ids, pos = nxt[:, None], np.full((batch, 1), total)
        return ids
