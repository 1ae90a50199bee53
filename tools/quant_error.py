"""Which rounding of the factors loses least: RTN or GPTQ, symmetric or asymmetric, group size, plain or pivoted.

On real weights and real input Grams: SmolLM2-135M (tools/fetch_assets.py puts it in the cache), the
inputs of every linear of a few decoder blocks over N windows of a Shakespeare text, captured on
the original model. Each linear is factored as `run` does without compensation (eig, ratio R,
pivoted or plain), then its factors are quantised: the in-side factor (in_rest with the Gram of
x[q], or in_factor with G) first, then the out-factor with the Gram of its actual input z (B_q x,
with the quantised in-side factor). Errors are tr(D G D^T) / tr(W G W^T): the output error on the
calibration inputs relative to the linear's output energy. Prints one JSON line per setting
(mean over the matrices) and a markdown table.

    python tools/quant_error.py [--blocks 2 14 26] [--windows 8] [--seqlen 256] [--ratio 0.4]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamsvd import assets  # noqa: E402
from streamsvd.math.factorize import factorize, rank_for_ratio  # noqa: E402
from streamsvd.math.pivot import pivot_factors  # noqa: E402
from streamsvd.math.quantize import quantize, weighted_error  # noqa: E402


def capture_grams(model_dir: Path, text: str, blocks: list[int], windows: int, seqlen: int):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(text, return_tensors="pt").input_ids[0]
    step = max(1, (len(ids) - seqlen) // windows)
    batch = torch.stack([ids[i * step:i * step + seqlen] for i in range(windows)])
    grams, weights, handles = {}, {}, []
    for b in blocks:
        layer = model.model.layers[b]
        for name, m in layer.named_modules():
            if isinstance(m, torch.nn.Linear):
                full = f"{b}.{name}"
                weights[full] = m.weight.detach().clone()

                def hook(mod, inputs, full=full):
                    x = inputs[0].reshape(-1, inputs[0].shape[-1]).to(torch.float64)
                    grams[full] = grams.get(full, 0) + x.T @ x
                handles.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(batch)
    for h in handles:
        h.remove()
    return weights, grams


def quantised_pair(A, B, G, form, bits, group, sym, rounding):
    """The product the stored quantised factors give (and for pivoted the permutation)."""
    if form == "pivoted":
        pf = pivot_factors(A, B)
        perm = pf.pivots.long()
        r = A.shape[1]
        Gp = G[perm][:, perm]
        Bq = quantize(pf.in_rest, bits, group, sym, Gp[r:, r:].float(), rounding).dequantize()
        M = torch.cat([torch.eye(r), Bq], dim=1)  # z = M x[perm]
        Az = quantize(pf.out_factor, bits, group, sym, (M.double() @ Gp @ M.double().T).float(), rounding).dequantize()
        Wq = torch.zeros_like(A @ B)
        Wq[:, perm] = Az @ M
        return Wq
    Bq = quantize(B, bits, group, sym, G.float(), rounding).dequantize()
    Aq = quantize(A, bits, group, sym, (Bq.double() @ G @ Bq.double().T).float(), rounding).dequantize()
    return Aq @ Bq


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, nargs="+", default=[2, 14, 26])
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--groups", type=int, nargs="+", default=[32, 64, 128])
    args = p.parse_args()
    model_dir = assets.smollm2_checkpoint()
    text_path = assets.cache_root() / "text" / "hamlet+macbeth+othello+lear.txt"
    weights, grams = capture_grams(model_dir, text_path.read_text()[:400_000], args.blocks, args.windows, args.seqlen)
    rows = {}
    start = time.time()
    for full, W in weights.items():
        G = grams[full]
        energy = weighted_error(W, torch.zeros_like(W), G)
        for form in ("pivoted", "plain"):
            rank = rank_for_ratio(W.shape[0], W.shape[1], args.ratio, form)
            f = factorize(W, G, rank, "eig")
            A, B = f.out_factor.float(), f.in_factor.float()
            Wf = A @ B
            trunc = weighted_error(W, Wf, G) / energy
            rows.setdefault((form, "none", 0, True, "-"), []).append((trunc, 0.0))
            for bits in (4, 8):
                for group in args.groups:
                    for sym in (True, False):
                        for rounding in ("rtn", "gptq"):
                            Wq = quantised_pair(A, B, G, form, bits, group, sym, rounding)
                            rows.setdefault((form, f"int{bits}", group, sym, rounding), []).append(
                                (weighted_error(W, Wq, G) / energy, weighted_error(Wf, Wq, G) / energy))
    print(f"{len(weights)} matrices, {time.time() - start:.0f} s", file=sys.stderr)
    print("| factors | quant | group | scheme | rounding | total error | quantisation error |")
    print("|---|---|---|---|---|---|---|")
    for (form, q, group, sym, rounding), vals in rows.items():
        total = sum(v[0] for v in vals) / len(vals)
        quant = sum(v[1] for v in vals) / len(vals)
        print(json.dumps({"factors": form, "quant": q, "group": group, "symmetric": sym, "rounding": rounding,
                          "total": total, "quant_only": quant}), file=sys.stderr)
        print(f"| {form} | {q} | {group or '-'} | {'sym' if sym else 'asym'} | {rounding} | {total:.5f} | {quant:.2e} |")


if __name__ == "__main__":
    main()
