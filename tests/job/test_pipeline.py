"""End to end on tiny random models of every supported family, against an in-memory reference."""

import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

import streamsvd
from streamsvd.io.calibration import default_text, sample_windows
from streamsvd.math.factorize import factorize, rank_for_ratio
from streamsvd.model.lowrank import LowRankLinear, PivotedLinear, replace_module
from streamsvd.job.pipeline import JobConfig, run_job
from tiny_models import CONFIGS, NEW_FAMILIES, make_tiny_checkpoint

SAMPLES, SEQLEN = 6, 48


@pytest.fixture
def checkpoint(tiny_checkpoints):
    return tiny_checkpoints


@pytest.fixture(params=sorted(CONFIGS))
def tiny(request, checkpoint):
    return checkpoint(request.param)


def _job(model_dir, out_dir, **kw):
    return JobConfig(model_dir=model_dir, out_dir=out_dir, calib_samples=SAMPLES, seqlen=SEQLEN, progress=False, **{"alloc": "uniform", **kw})


@torch.no_grad()
def reference_compress(model_dir, ratio, method, propagate, factors="pivoted"):
    """The same job done the obvious way: whole model in memory, statistics from full forwards."""
    windows = sample_windows(AutoTokenizer.from_pretrained(model_dir), default_text(), SAMPLES, SEQLEN, seed=0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    source = model if propagate == "compressed" else AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for index in range(model.config.num_hidden_layers):
        names = [n for n, m in model.model.layers[index].named_modules() if isinstance(m, nn.Linear)]
        grams, hooks = {}, []
        for name in names:
            def hook(module, inputs, name=name):
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
                grams[name] = grams.get(name, 0) + x.T @ x / x.shape[0]
            hooks.append(source.model.layers[index].get_submodule(name).register_forward_pre_hook(hook))
        source(windows)
        for h in hooks:
            h.remove()
        for name in names:
            linear = model.model.layers[index].get_submodule(name)
            k = rank_for_ratio(linear.out_features, linear.in_features, ratio, factors)
            f = factorize(linear.weight, grams[name], k, method)
            bias = None if linear.bias is None else linear.bias.detach()
            replace_module(model.model.layers[index], name, LowRankLinear.from_factors(f.out_factor.float(), f.in_factor.float(), bias))
    return model


VARIANTS = [("eig", "compressed", "pivoted"), ("cholesky", "original", "pivoted"), ("eig", "compressed", "plain")]
# The later families (tests/model/test_families.py) take the default variant only, to keep the suite's time.
CASES = [(family, *v) for family in sorted(CONFIGS) for v in (VARIANTS[:1] if family in NEW_FAMILIES else VARIANTS)]


@pytest.mark.parametrize("family,method,propagate,factors", CASES)
def test_loaded_output_equals_in_memory_compression(family, checkpoint, tmp_path, method, propagate, factors):
    tiny = checkpoint(family)
    # The reference is uniform truncation; compensation is checked against brute force in tests/math/test_compensate.py.
    report = run_job(_job(tiny, tmp_path / "out", ratio=0.4, method=method, propagate=propagate, factors=factors,
                          compensate=False))
    loaded = streamsvd.load(tmp_path / "out")
    # The reference keeps plain two-factor modules at the rank the form affords: pivoting changes the
    # stored numbers, not the matrix.
    reference = reference_compress(tiny, 0.4, method, propagate, factors)
    ids = torch.randint(0, loaded.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = loaded(ids).logits, reference(ids).logits
        original = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)(ids).logits
    assert isinstance(loaded.model.layers[0].mlp.down_proj, PivotedLinear if factors == "pivoted" else LowRankLinear)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - original).abs().max() > 1e-3  # it really is a different (compressed) model
    assert report["ratio_linear"] == pytest.approx(0.4, abs=0.02)


def test_output_layout_config_report_and_spectra(tiny, tmp_path):
    out = tmp_path / "out"
    report = run_job(_job(tiny, out, ratio=0.3))
    config = json.loads((out / "config.json").read_text())
    section = config["streamsvd"]
    assert section["method"] == "eig" and section["ratio"] == 0.3
    assert section["calibration"] == {"source": section["calibration"]["source"], "samples": SAMPLES, "seqlen": SEQLEN, "seed": 0}
    n_layers = config["num_hidden_layers"]
    family = section["base_model_type"]  # config.json itself says model_type "streamsvd" (the remote code)
    per_layer = 4 if family == "phi3" else 7  # phi3's qkv_proj and gate_up_proj are single (fused) linears
    assert len(section["ranks"]) == per_layer * n_layers
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == n_layers + 1
    assert (out / "tokenizer.json").is_file() and (out / "streamsvd_report.md").is_file()
    assert not (out / ".streamsvd-work").exists()
    from safetensors.torch import load_file

    spectra = load_file(out / "spectra" / "block-00000.safetensors")
    q_name = "model.layers.0.self_attn." + ("qkv_proj" if family == "phi3" else "q_proj")
    q = spectra[q_name]
    assert q.numel() == 64 and bool((q[:-1] >= q[1:]).all())
    module = report["modules"][q_name]
    assert module["truncation_loss"] == pytest.approx(float(q[module["rank"]:].double().pow(2).sum().sqrt()), rel=1e-4)
    # q, k and v read the same input, so they share one Gram; gate and up share another (phi3: one linear each).
    groups = {m["input_group"] for n, m in report["modules"].items() if ".layers.0." in n}
    assert len(groups) == 4
    assert report["ratio_model"] < report["ratio_linear"]


@pytest.mark.parametrize("family", sorted(set(CONFIGS) - set(NEW_FAMILIES)))  # the later ones generate in test_families
def test_generate_on_loaded_model(family, checkpoint, tmp_path):
    run_job(_job(checkpoint(family), tmp_path / "out", ratio=0.5))
    model = streamsvd.load(tmp_path / "out")
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert out.shape == (1, 9)
