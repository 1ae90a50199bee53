"""How well the profile predicts what truncation costs: per matrix type, predicted against measured.

For one model and ratio: `streamsvd profile` (16 x 256 windows of the calibration plays by default), then
for each matrix type (q_proj, ..., down_proj) every matrix of that type alone is truncated to its uniform
rank along the profile's own directions (math/factorize.factorize, eig, on the mean input Gram of the same
calibration windows), the rest of the model left whole, and the mean next-token NLL on the sensitivity
windows (the profile's first 16) is measured against the original's. Two predictions of the same figure:

- `single_weight`: 1/2 sum_i w_i sum(s_i[r:]^2), one mean squared gradient w_i per matrix (the profile
  before weighted energies);
- `token_weighted`: 1/2 sum_i sum(d_i[r:]), each token weighted by its own mean squared gradient
  (`weighted.safetensors`, math/allocate.Matrix.loss), what the allocator ranks by now.

One JSON line per type: {"model", "ratio", "type", "single_weight", "token_weighted", "measured"}. The whole
model is held in memory (float32): a tool for the small models, not a streamed job.

    python tools/bench_sensitivity.py --model gemma3 --ratio 0.6
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from streamsvd import assets
from streamsvd.io.calibration import load_texts, load_tokenizer, sample_windows
from streamsvd.job.profile import ProfileConfig, make_profile
from streamsvd.math.allocate import allocate, matrix_type
from streamsvd.math.factorize import factorize
from streamsvd.math.gram import GramAccumulator

MODELS = {"smollm2": assets.smollm2_checkpoint, "gemma3": assets.gemma3_checkpoint}


def _nll(model, windows: torch.Tensor) -> float:
    """Mean next-token NLL, one window at a time (Gemma's 262k-word head would not fit a batch's logits)."""
    total = 0.0
    for i in range(windows.shape[0]):
        logits = model(windows[i : i + 1]).logits[0, :-1]
        total += float(F.cross_entropy(logits.double(), windows[i, 1:], reduction="sum"))
    return total / (windows.shape[0] * (windows.shape[1] - 1))


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3", help=f"{' or '.join(sorted(MODELS))}, or a checkpoint folder")
    ap.add_argument("--calib", type=Path, default=None, help="calibration text (default: the four calibration plays)")
    ap.add_argument("--ratio", type=float, default=0.6)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--work", type=Path, default=assets.cache_root() / "bench" / "sensitivity")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    model_dir = MODELS[args.model]() if args.model in MODELS else Path(args.model)
    calib = args.calib or assets.shakespeare_text(assets.CALIB_PLAYS)
    prof_dir = args.work / f"{model_dir.name}-{args.calib_samples}x{args.seqlen}"
    profile = make_profile(ProfileConfig(model_dir, prof_dir, calib=[str(calib)], calib_samples=args.calib_samples,
                                         seqlen=args.seqlen, progress=False))
    mats = profile.matrices()
    ranks = allocate("uniform", mats, args.ratio)
    keep = profile.meta["sensitivity_samples"]
    text, _ = load_texts([str(calib)])
    windows = sample_windows(load_tokenizer(model_dir), text, args.calib_samples, args.seqlen, 0)

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n in profile.spectra}
    grams = {n: GramAccumulator(m.in_features) for n, m in linears.items()}

    def add(name):
        def hook(module, inputs):
            grams[name].add_batch(inputs[0].double())  # float64 products, as the profile's float32 ones within 1e-7
        return hook

    handles = [m.register_forward_pre_hook(add(n)) for n, m in linears.items()]
    for i in range(windows.shape[0]):
        model.model(windows[i : i + 1])
    for h in handles:
        h.remove()
    base = _nll(model, windows[:keep])
    for kind in sorted({matrix_type(n) for n in linears}):
        names = [n for n in linears if matrix_type(n) == kind]
        saved = {}
        for n in names:
            w = linears[n].weight
            f = factorize(w, grams[n].gram, ranks[n], "eig")  # the job's own truncation: W' = U_k U_k^T W
            saved[n] = w.data.clone()
            w.data = (f.out_factor @ f.in_factor).float()
        measured = _nll(model, windows[:keep]) - base
        for n, w in saved.items():
            linears[n].weight.data = w
        by_name = {a.name: a for a in mats}
        row = {"model": args.model, "ratio": args.ratio, "type": kind,
               "single_weight": round(0.5 * sum(by_name[n].weight * by_name[n].tail(ranks[n]) for n in names), 4),
               "token_weighted": round(0.5 * sum(by_name[n].loss(ranks[n]) for n in names), 4),
               "measured": round(measured, 4)}
        print(json.dumps(row), flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
