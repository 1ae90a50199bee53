#!/usr/bin/env python
"""Equal-bytes comparison (issue 9 item 2): held-out perplexity against the bytes of the decoder linears,
for SVD alone, SVD + int8, SVD + int4, and quantisation alone, on SmolLM2-135M and Gemma 3 270M.

    python tools/bench_deploy.py --models smollm2 gemma3 --ratios 0.2 0.4 --plot docs/img/bench_deploy.png

Rows (one JSON line each):
- `original`: the dense model;
- `rtn`: the dense decoder linears rounded to nearest, asymmetric per group (streamsvd.math.quantize.rtn,
  the rounding `streamsvd quantize` uses), at each of --bits and --groups;
- `gptq`: the same bits with GPTQ's error feedback (streamsvd.math.quantize.gptq, the reference algorithm),
  block by block, each block's Grams taken on the outputs of the blocks already quantised, from the same
  calibration windows as the SVD jobs. (No GPTQ library was used: see docs/RESULTS.md for why.)
- `svd`: `streamsvd run` with default settings at each of --ratios;
- `svd+int8`: that output through `streamsvd quantize --quant int8` (round-to-nearest; --svd-int8 run uses
  `run --quant int8`, GPTQ in the stream, for one more job per ratio);
- `svd+int4`: `streamsvd run --quant int4` (GPTQ in the stream: `streamsvd quantize` int4 ruins pivoted factors).

Bytes: every number at the width it is stored at, but each floating-point number (unquantised weights and
factors, quantisation scales) counted at 16 bits, the precision these models are published and deployed in
(the test models are float32 dequantised GGUF, and the jobs keep float32 and float32 scales; quantising in
float32 or float16 scales changes nothing measurable next to the rounding itself). Packed integers count at
bits/8 bytes each (tight packing; compressed-tensors' int32 words for 4 and 8 bits, GPTQ's 3-bit layout),
zero points at the weight's bits, pivots as stored (int32, one per input column of a pivoted linear).
Embeddings, head and norms are left out: all methods keep them as they are.

Calibration: the plays in streamsvd.assets.CALIB_PLAYS (also for GPTQ); evaluation: held-out tragedies
(EVAL_PLAYS, never calibrated on) and, as another domain, Python's reference docs. Evaluation runs in this
process on `streamsvd.load` of each output (dequantised), the same windows for every row.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shutil
import time
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

import streamsvd
from streamsvd import assets
from streamsvd.io.calibration import default_text, sample_windows
from streamsvd.job.evaluate import perplexity
from streamsvd.math.quantize import gptq, rtn
from streamsvd.model.architecture import decoder_layers
from streamsvd.model.capture import capture_layer_kwargs, first_layer_inputs, run_layer

from bench_quality import MODELS, _streamsvd  # noqa: E402 - tools/ is on sys.path beside this script

FLOAT_BYTES = 2  # every floating-point number counted at 16 bits (see the module's docstring)


def group_quant_bytes(rows: int, cols: int, bits: int, group: int, symmetric: bool = False) -> int:
    """Bytes of a rows x cols matrix quantised per group of `group` columns: tightly packed integers, a
    16-bit scale per (row, group) and, asymmetric, a zero point of `bits` per (row, group)."""
    groups = -(-cols // group)
    numbers = -(-rows * cols * bits // 8)
    zero_points = 0 if symmetric else -(-rows * groups * bits // 8)
    return numbers + rows * groups * FLOAT_BYTES + zero_points


def dense_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The decoder's linears by full name (what streamsvd compresses; the head and embeddings excluded)."""
    out = {}
    for i, layer in enumerate(decoder_layers(model)):
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                out[f"model.layers.{i}.{name}"] = module
    return out


def output_linear_bytes(out_dir: Path) -> int:
    """Bytes of the decoder linears a streamsvd output stores, read from its shards' headers: floating
    tensors at 16 bits, packed words, zero points and pivots as stored; shape records and 1-D floating
    tensors (norms) left out."""
    config = json.loads((out_dir / "config.json").read_text())
    names = set(config["streamsvd"]["ranks"])
    total = 0
    for shard in sorted(out_dir.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for key in f.keys():
                module = next((n for n in names if key.startswith(n + ".")), None)
                if module is None or key.endswith("_shape"):
                    continue
                t = f.get_slice(key)
                shape, dtype = t.get_shape(), t.get_dtype()
                numel = math.prod(shape)
                if dtype in ("F32", "F16", "BF16", "F64"):
                    if len(shape) == 1 and not key.endswith("_scale"):
                        continue
                    total += numel * FLOAT_BYTES
                else:
                    total += numel * {"I32": 4, "I64": 8, "I16": 2, "I8": 1, "U8": 1}[dtype]
    return total


@torch.no_grad()
def quantize_dense(model: nn.Module, bits: int, group: int, windows: torch.Tensor | None) -> None:
    """Replace every decoder linear's weight by its dequantised quantisation: RTN without `windows`, else
    GPTQ block by block on the hidden states the quantised blocks before it produce."""
    layers = decoder_layers(model)
    if windows is None:
        for module in dense_linears(model).values():
            module.weight.copy_(rtn(module.weight, bits, group, symmetric=False).dequantize(module.weight.dtype))
        return
    hidden = [first_layer_inputs(model, windows[w:w + 1]) for w in range(len(windows))]
    layer_args = capture_layer_kwargs(model, windows[:1])
    for i, layer in enumerate(layers):
        args, kwargs = layer_args[i]
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        grams = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in linears.items()}

        def add(name, module, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).to(torch.float64)
            grams[name] += x.T @ x

        hooks = [m.register_forward_pre_hook(functools.partial(add, n)) for n, m in linears.items()]
        try:
            for h in hidden:
                run_layer(layer, h, args, kwargs)
        finally:
            for hook in hooks:
                hook.remove()
        for name, module in linears.items():
            q = gptq(module.weight, grams[name], bits, group, symmetric=False)
            module.weight.copy_(q.dequantize(module.weight.dtype))
        hidden = [run_layer(layer, h, args, kwargs) for h in hidden]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["smollm2"], choices=sorted(MODELS))
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4], help="SVD ratios (default 0.2 0.4)")
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3, 2], help="quantisation-alone bit widths")
    p.add_argument("--groups", type=int, nargs="+", default=[128, 32], help="quantisation-alone group sizes (RTN)")
    p.add_argument("--gptq-bits", type=int, nargs="*", default=[4, 3, 2], help="GPTQ-alone bit widths (group 128)")
    p.add_argument("--svd-quants", nargs="*", default=["none", "int8", "int4"], choices=["none", "int8", "int4"])
    p.add_argument("--svd-int8", choices=["quantize", "run"], default="quantize",
                   help="SVD + int8 by `streamsvd quantize` of the SVD output (default, seconds) or by `run --quant int8`")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--eval-seqlen", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--max-mem", default="8G")
    p.add_argument("--work", type=Path, default=assets.cache_root() / "bench-deploy")
    p.add_argument("--keep-outputs", action="store_true")
    p.add_argument("--plot", type=Path, default=None, help="draw perplexity against bytes to this PNG")
    p.add_argument("--rows", type=Path, default=None,
                   help="draw --plot from these JSON lines (an earlier run's output) instead of measuring")
    args = p.parse_args()
    if args.rows:
        rows = [json.loads(line) for line in args.rows.read_text().splitlines() if line.strip().startswith("{")]
        if args.plot:
            plot(rows, args.plot)
        return
    torch.manual_seed(0)
    args.work.mkdir(parents=True, exist_ok=True)
    calib_path = assets.shakespeare_text(assets.CALIB_PLAYS)
    texts = {"ppl": assets.shakespeare_text(assets.EVAL_PLAYS).read_text(), "ppl_cross": default_text()}
    rows = []

    def emit(row):
        rows.append(row)
        print(json.dumps(row), flush=True)

    for model_key in args.models:
        model_name, model_fn = MODELS[model_key]
        source = model_fn()
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source)
        common = {"model": model_name, "calib_text": "+".join(assets.CALIB_PLAYS), "calib_samples": args.calib_samples,
                  "seqlen": args.seqlen, "eval_text": "+".join(assets.EVAL_PLAYS), "cross_text": "pydoc_data.topics",
                  "eval_seqlen": args.eval_seqlen, "eval_windows": args.eval_windows}

        def score(model) -> dict:
            return {k: round(perplexity(model, tokenizer, t, args.eval_seqlen, args.eval_windows, progress=False)["perplexity"], 3)
                    for k, t in texts.items()}

        model = streamsvd.load(source, dtype=torch.float32)
        shapes = {n: tuple(m.weight.shape) for n, m in dense_linears(model).items()}
        dense_bytes = sum(r * c for r, c in shapes.values()) * FLOAT_BYTES
        emit({**common, "method": "original", "bits": 16, "linear_bytes": dense_bytes, **score(model)})
        original = {k: v.clone() for k, v in model.state_dict().items()}
        windows = sample_windows(tokenizer, calib_path.read_text(), args.calib_samples, args.seqlen, seed=0)
        quant_rows = [("rtn", b, g) for b in args.bits for g in args.groups] + [("gptq", b, 128) for b in args.gptq_bits]
        for method, bits, group in quant_rows:
            model.load_state_dict(original)
            start = time.time()
            quantize_dense(model, bits, group, windows if method == "gptq" else None)
            wall = time.time() - start
            nbytes = sum(group_quant_bytes(r, c, bits, group) for r, c in shapes.values())
            emit({**common, "method": method, "bits": bits, "group_size": group, "linear_bytes": nbytes,
                  "bits_per_weight": round(8 * nbytes / (dense_bytes / FLOAT_BYTES), 3), "quantize_wall_s": round(wall, 1),
                  **score(model)})
        del model, original
        calib = ["--calib", str(calib_path), "--calib-samples", str(args.calib_samples), "--seqlen", str(args.seqlen),
                 "--max-mem", args.max_mem, "--no-progress", "--no-plots"]
        for ratio in args.ratios:
            base = args.work / f"{model_key}-{ratio}"
            for quant in args.svd_quants:
                out = base if quant == "none" else args.work / f"{model_key}-{ratio}-{quant}"
                shutil.rmtree(out, ignore_errors=True)
                start = time.time()
                if quant == "int8" and args.svd_int8 == "quantize" and "none" in args.svd_quants:
                    _streamsvd("quantize", str(base), str(out), "--quant", "int8")
                    how = "streamsvd quantize (rtn)"
                else:
                    _streamsvd("run", str(source), str(out), "--ratio", str(ratio), *calib,
                               *([] if quant == "none" else ["--quant", quant]))
                    how = "streamsvd run" + ("" if quant == "none" else f" --quant {quant} (gptq)")
                wall = time.time() - start
                nbytes = output_linear_bytes(out)
                model = streamsvd.load(out, dtype=torch.float32)
                emit({**common, "method": "svd" if quant == "none" else f"svd+{quant}", "ratio": ratio, "how": how,
                      "bits": {"none": 16, "int8": 8, "int4": 4}[quant], "linear_bytes": nbytes,
                      "bits_per_weight": round(8 * nbytes / (dense_bytes / FLOAT_BYTES), 3), "wall_s": round(wall, 1),
                      **score(model)})
                del model
            if not args.keep_outputs:
                for quant in args.svd_quants:
                    shutil.rmtree(base if quant == "none" else args.work / f"{model_key}-{ratio}-{quant}", ignore_errors=True)
    if args.plot:
        plot(rows, args.plot)


def _label(row: dict) -> str:
    if row["method"] in ("rtn", "gptq"):
        return f"{row['method'].upper()} alone, groups of {row['group_size']}"
    return {"svd": "SVD alone (16-bit factors)", "svd+int8": "SVD + int8", "svd+int4": "SVD + int4 (GPTQ)"}.get(
        row["method"], row["method"])


def plot(rows: list[dict], path: Path) -> None:
    """One panel per model and text: perplexity (log) against MB of decoder linears, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 4.2 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        mine = [r for r in rows if r["model"] == model]
        for j, (key, title) in enumerate((("ppl", "held-out plays (calibration's domain)"), ("ppl_cross", "Python docs (another domain)"))):
            ax = axes[i][j]
            lines: dict[str, list] = {}
            for r in mine:
                if r["method"] != "original":
                    lines.setdefault(_label(r), []).append((r["linear_bytes"] / 1e6, r[key], r.get("bits"), r.get("ratio")))
            for label, pts in lines.items():
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
                for x, y, bits, ratio in pts:
                    ax.annotate(f"{bits}b" if ratio is None else f"r{ratio}", (x, y), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")
            orig = next((r for r in mine if r["method"] == "original"), None)
            if orig:
                ax.axhline(orig[key], color="black", linestyle=":", linewidth=1)
                ax.scatter([orig["linear_bytes"] / 1e6], [orig[key]], color="black", marker="*", s=80, zorder=3,
                           label="original (16-bit)")
            ax.set_xscale("log")
            ax.set_yscale("log")
            if orig:  # 2-bit rounding runs to 1e5-1e11: clipped, so the useful range is readable (the table has them)
                ax.set_ylim(orig[key] * 0.8, orig[key] * 60)
            ax.set_xlabel("MB of decoder linears (floats at 16 bits)")
            ax.set_ylabel("perplexity")
            ax.set_title(f"{model.split(' (')[0]}: {title}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.suptitle("held-out perplexity against bytes; points above a panel's top (2-bit rounding) are off its scale",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


if __name__ == "__main__":
    main()
