"""A sharded bf16 checkpoint with real Llama shapes and trained-like spectra, for scale benchmarks.

    python tools/make_synthetic.py llama2-7b /data/synth-7b            # 32 layers, ~13 GB
    python tools/make_synthetic.py llama3-70b /data/synth-70b --layers 1

White noise has a flat spectrum (no low-rank structure), which makes every loss and timing of a
truncated SVD meaningless. Here every weight is U diag(s) V^T with orthonormal U, V and a spectrum s
taken from the real SmolLM2-135M: for each matrix type, the mean over its 30 layers of s_i / s_0 as
a function of the relative index i / (k - 1), interpolated to the target size and scaled so that the
entries' RMS is SmolLM2's times sqrt(fan_in ratio) (trained weights scale like 1/sqrt(fan_in)). The
check at the end measures the stored (bf16) matrices' singular values against that profile and
prints the deviation as JSON. To keep generation to minutes, a few random orthonormal bases per
shape are drawn once and each matrix uses one with its columns permuted and signs flipped (a
different matrix with the same spectrum).

The vocabulary and tokenizer are SmolLM2's (49,152 words; the real 7B/70B vocabularies are 32,000 and
128,256: the embedding and head sizes differ, the decoder blocks do not). Everything is written one
layer at a time, so memory stays at about one layer.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from streamsvd import assets  # noqa: E402
from streamsvd.io.checkpoint import Checkpoint  # noqa: E402

PRESETS = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      num_hidden_layers=32, max_position_embeddings=4096, rope_theta=10000.0),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                       num_hidden_layers=80, max_position_embeddings=8192, rope_theta=500000.0),
}
TYPES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
         "mlp.down_proj")


def smollm2_profiles() -> dict[str, dict]:
    """Per matrix type: the mean normalised spectrum (s_i / s_0) over SmolLM2's layers, RMS and fan-in."""
    ckpt = Checkpoint(assets.smollm2_checkpoint())
    n_layers = ckpt.config_dict["num_hidden_layers"]
    out = {}
    for t in TYPES:
        curves, rms = [], []
        for i in range(n_layers):
            w = ckpt.get(f"model.layers.{i}.{t}.weight").double()
            s = torch.linalg.svdvals(w)
            curves.append(s / s[0])
            rms.append(float(w.pow(2).mean().sqrt()))
        out[t] = {"curve": torch.stack(curves).mean(0), "rms": sum(rms) / len(rms), "fan_in": w.shape[1],
                  "top_to_rms": float(torch.stack(curves).mean(0)[0])}
    out["embed_std"] = float(ckpt.get("model.embed_tokens.weight").float().std())
    return out


def spectrum(curve: torch.Tensor, k: int, rms: float, m: int, n: int) -> torch.Tensor:
    """The profile resampled to k values, scaled so the matrix's entries have RMS `rms`."""
    x = torch.linspace(0, 1, k, dtype=torch.float64) * (len(curve) - 1)
    lo = x.floor().long().clamp(max=len(curve) - 2)
    frac = x - lo
    s = curve[lo] * (1 - frac) + curve[lo + 1] * frac
    return s * (rms * (m * n) ** 0.5 / s.pow(2).sum().sqrt())


class Bases:
    """A few random orthonormal bases per shape; each draw permutes columns and flips signs."""

    def __init__(self, gen: torch.Generator, per_shape: int = 2):
        self.gen, self.per_shape, self.pool = gen, per_shape, {}

    def get(self, rows: int, cols: int) -> torch.Tensor:
        key = (rows, cols)
        if key not in self.pool:
            self.pool[key] = [torch.linalg.qr(torch.randn(rows, cols, generator=self.gen))[0] for _ in range(self.per_shape)]
        base = self.pool[key][int(torch.randint(self.per_shape, (1,), generator=self.gen))]
        perm = torch.randperm(cols, generator=self.gen)
        signs = torch.randint(0, 2, (cols,), generator=self.gen).float() * 2 - 1
        return base[:, perm] * signs


def make_matrix(bases: Bases, m: int, n: int, s: torch.Tensor) -> torch.Tensor:
    k = min(m, n)
    u, v = bases.get(m, k), bases.get(n, k)
    return ((u * s.float()) @ v.T).to(torch.bfloat16)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("preset", choices=sorted(PRESETS))
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--layers", type=int, default=None, help="number of decoder layers (default: the preset's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="measure the stored spectra of layer 0 against the profile")
    args = ap.parse_args(argv)
    cfg = dict(PRESETS[args.preset])
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    h, f, n_layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    head_dim = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h), "mlp.down_proj": (h, f)}
    started = time.time()
    prof = smollm2_profiles()
    smol = assets.smollm2_checkpoint()
    vocab = json.loads((smol / "config.json").read_text())["vocab_size"]
    gen = torch.Generator().manual_seed(args.seed)
    bases = Bases(gen)
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    total = n_layers + 1
    weight_map, total_size = {}, 0

    def write(shard: int, tensors: dict) -> None:
        nonlocal total_size
        name = f"model-{shard:05d}-of-{total:05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = name
            total_size += v.numel() * v.element_size()

    std = prof["embed_std"]
    write(1, {"model.embed_tokens.weight": (torch.randn(vocab, h, generator=gen) * std).to(torch.bfloat16),
              "lm_head.weight": (torch.randn(vocab, h, generator=gen) * std).to(torch.bfloat16),
              "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)})
    for i in range(n_layers):
        tensors = {f"model.layers.{i}.input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                   f"model.layers.{i}.post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)}
        for t, (m, n) in shapes.items():
            p = prof[t]
            rms = p["rms"] * (p["fan_in"] / n) ** 0.5
            tensors[f"model.layers.{i}.{t}.weight"] = make_matrix(bases, m, n, spectrum(p["curve"], min(m, n), rms, m, n))
        write(i + 2, tensors)
        print(json.dumps({"layer": i, "seconds": round(time.time() - started, 1)}), flush=True)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_act": "silu",
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
              "attention_bias": False, "mlp_bias": False, "dtype": "bfloat16", "head_dim": head_dim,
              "rope_parameters": {"rope_type": "default", "rope_theta": cfg.pop("rope_theta")}, **cfg,
              "streamsvd_synthetic": {"preset": args.preset, "seed": args.seed, "spectra": "SmolLM2-135M profile per matrix type"}}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (smol / name).exists():
            shutil.copyfile(smol / name, out / name)
    summary = {"preset": args.preset, "layers": n_layers, "weight_bytes": total_size, "seconds": round(time.time() - started, 1)}
    if args.check:
        ckpt = Checkpoint(out)
        dev = {}
        for t, (m, n) in shapes.items():
            s = torch.linalg.svdvals(ckpt.get(f"model.layers.0.{t}.weight").double())
            target = spectrum(prof[t]["curve"], min(m, n), 1.0, m, n)
            a, b = s / s[0], target / target[0]
            dev[t] = {"max_abs_dev_normalised": round(float((a - b).abs().max()), 5),
                      "rel_dev_at_half": round(float((a[len(a) // 2] - b[len(b) // 2]).abs() / b[len(b) // 2]), 5),
                      "s_last_over_s0": round(float(a[-1]), 5), "target_last_over_s0": round(float(b[-1]), 5)}
        summary["spectrum_check_layer0"] = dev
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
