"""tools/bench_deploy.py's byte accounting: the equal-bytes comparison is only as fair as its counting."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import bench_deploy as bd  # noqa: E402

import streamsvd  # noqa: E402
from streamsvd.cli import main  # noqa: E402
from streamsvd.math.quantize import QuantSpec, factor_shapes  # noqa: E402


@pytest.fixture(scope="module")
def outputs(tiny_checkpoints, tmp_path_factory):
    src = tiny_checkpoints("llama")
    root = tmp_path_factory.mktemp("deploy")
    text = root / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    made = {}
    for quant in (None, "int8", "int4"):
        out = root / str(quant)
        args = ["run", str(src), str(out), "--ratio", "0.4", "--calib", str(text), "--calib-samples", "4", "--seqlen", "32",
                "--no-progress", "--no-plots"]
        assert main(args + (["--quant", quant] if quant else [])) == 0
        made[quant] = out
    return src, made


@pytest.mark.parametrize("quant", [None, "int8", "int4"])
def test_output_bytes_equal_the_stored_shapes_at_16_bit_floats(outputs, quant):
    src, made = outputs
    section = json.loads((made[quant] / "config.json").read_text())["streamsvd"]
    shapes = {n: tuple(m.weight.shape) for n, m in bd.dense_linears(streamsvd.load(src)).items()}
    assert set(shapes) == set(section["ranks"])
    spec = QuantSpec(quant) if quant else None
    expect = 0
    for name, rank in section["ranks"].items():
        m, n = shapes[name]
        form = section.get("forms", {}).get(name, "plain")
        parts = factor_shapes(m, n, rank, form)
        expect += 4 * n if form == "pivoted" and len(parts) == 2 else 0  # int32 pivots
        for rows, cols in parts:
            if spec is None:
                expect += rows * cols * bd.FLOAT_BYTES
            else:  # packed words, 16-bit scales, packed zero points; no header entries or shape records
                expect += spec.packed_bytes(rows, cols, bd.FLOAT_BYTES) - 16 - 4 * 290
                assert bd.group_quant_bytes(rows, cols, spec.bits, spec.group_size) <= spec.packed_bytes(rows, cols, 2)
    assert bd.output_linear_bytes(made[quant]) == expect
    if quant:
        assert bd.output_linear_bytes(made[quant]) < bd.output_linear_bytes(made[None])


def test_group_bytes_count_every_part():
    # 8 x 64 at 4 bits in groups of 16: 256 bytes of integers, 32 scales of 2 bytes, 32 zero points of half a byte
    assert bd.group_quant_bytes(8, 64, 4, 16) == 256 + 64 + 16
    assert bd.group_quant_bytes(8, 64, 4, 16, symmetric=True) == 256 + 64
    assert bd.group_quant_bytes(8, 70, 3, 32) == 210 + 8 * 3 * 2 + 9  # a shorter last group still has its scale


@pytest.mark.parametrize("gptq", [False, True])
def test_quantising_the_dense_model_changes_only_the_decoder_linears(tiny_checkpoints, gptq):
    model = streamsvd.load(tiny_checkpoints("llama"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    windows = torch.randint(0, 100, (4, 16)) if gptq else None
    bd.quantize_dense(model, 3, 16, windows)
    linears = {f"{n}.weight" for n in bd.dense_linears(model)}
    for key, value in model.state_dict().items():
        if key in linears:
            assert not torch.equal(value, before[key])
            # at most 8 distinct values per (row, group of 16)
            assert all(len(torch.unique(value[r, :16])) <= 8 for r in range(value.shape[0]))
        else:
            assert torch.equal(value, before[key]), key
