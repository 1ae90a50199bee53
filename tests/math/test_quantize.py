"""Per-group quantisation (math/quantize.py) and the packed layout it is stored in (model/quantized.py)."""

import pytest
import torch

from streamsvd.math.quantize import QuantSpec, gptq, quantize_module_tensors, rtn, stored_linear_bytes, weighted_error
from streamsvd.model.quantized import dequantize, dequantizing_getter, logical_keys, pack_int32, unpack_int32


def _gram(n, seed=0):
    """The Gram of correlated inputs with unequal scales, as a linear layer sees them."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) * 0.2 + torch.eye(n)
    x = (torch.randn(2000, n, generator=g) @ mix) * (torch.rand(n, generator=g) * 3 + 0.1)
    return x.T @ x


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("cols,group", [(96, 32), (100, 32), (50, 128)])
def test_dequantised_error_is_within_half_a_step_of_each_group(bits, symmetric, cols, group):
    w = torch.randn(24, cols, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.01, 3, cols)
    q = rtn(w, bits, group, symmetric)
    assert q.q.dtype == torch.int8 and q.scale.shape == (24, -(-cols // group))
    assert int(q.q.min()) >= -(2 ** (bits - 1)) and int(q.q.max()) <= 2 ** (bits - 1) - 1
    step = q.scale.to(torch.float32)[:, torch.arange(cols) // group]
    err = (q.dequantize() - w).abs()
    assert bool((err <= step / 2 + 1e-6).all())
    # and the step is what the bit width affords: max |w| of the group over 2^(b-1) - 1 (symmetric)
    if symmetric:
        g0 = w[:, :group].abs().amax(dim=1)
        assert torch.allclose(q.scale[:, 0], g0 / (2 ** (bits - 1) - 1))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_packing_round_trip_with_the_compressed_tensors_bit_layout(bits, dim):
    q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (13, 37), dtype=torch.int8, generator=torch.Generator().manual_seed(2))
    packed = pack_int32(q, bits, dim)
    per_word = 32 // bits
    assert packed.dtype == torch.int32
    assert packed.shape == ((13, -(-37 // per_word)) if dim == 1 else (-(-13 // per_word), 37))
    assert torch.equal(unpack_int32(packed, bits, q.shape[dim], dim), q)
    # compressed-tensors' layout: element j of a row at bits (j % per_word) * bits of word j // per_word, offset by 2^(b-1)
    row = q[0] if dim == 1 else q[:, 0]
    word0 = int(packed[0, 0]) & 0xFFFFFFFF
    expected = sum((int(row[j]) + 2 ** (bits - 1)) << (j * bits) for j in range(per_word))
    assert word0 == expected


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_rounding_is_never_worse_than_round_to_nearest_in_the_weighted_error(bits, symmetric):
    n = 192
    H = _gram(n)
    for seed in range(3):
        w = torch.randn(48, n, generator=torch.Generator().manual_seed(10 + seed))
        e_rtn = weighted_error(w, rtn(w, bits, 64, symmetric).dequantize(), H)
        e_gptq = weighted_error(w, gptq(w, H, bits, 64, symmetric).dequantize(), H)
        assert e_gptq < 0.9 * e_rtn  # measured about half on this Gram


def test_asymmetric_groups_fit_one_signed_range_better():
    w = torch.rand(16, 128, generator=torch.Generator().manual_seed(4)) + 0.5  # all positive: half the symmetric grid unused
    assert weighted_error(w, rtn(w, 4, 32, False).dequantize()) < 0.5 * weighted_error(w, rtn(w, 4, 32, True).dequantize())


@pytest.mark.parametrize("symmetric", [True, False])
def test_stored_tensors_dequantise_to_what_was_rounded(symmetric):
    g = torch.Generator().manual_seed(6)
    full = "model.layers.0.mlp.up_proj"
    tensors = {full + ".out_factor": torch.randn(40, 12, generator=g).to(torch.bfloat16),
               full + ".in_rest": torch.randn(12, 20, generator=g).to(torch.bfloat16),
               full + ".pivots": torch.randperm(32, generator=g).to(torch.int32), full + ".bias": torch.randn(40)}
    spec = QuantSpec("int4", 8, symmetric=symmetric)
    packed = quantize_module_tensors(tensors, full, spec)
    assert torch.equal(packed[full + ".pivots"], tensors[full + ".pivots"]) and torch.equal(packed[full + ".bias"], tensors[full + ".bias"])
    assert packed[full + ".out_factor_packed"].dtype == torch.int32 and packed[full + ".out_factor_scale"].dtype == torch.bfloat16
    assert packed[full + ".out_factor_shape"].tolist() == [40, 12]
    assert (full + ".in_rest_zero_point" in packed) == (not symmetric)
    assert logical_keys(packed) == set(tensors)
    get = dequantizing_getter(packed.__getitem__, packed, 4, 8)
    for key in (full + ".out_factor", full + ".in_rest"):
        value = get(key)
        expected = rtn(tensors[key], 4, 8, symmetric).dequantize(torch.bfloat16)
        assert value.dtype == torch.bfloat16 and torch.equal(value, expected)
    assert sum(v.numel() * v.element_size() for k, v in packed.items() if not k.endswith((".bias", ".pivots"))) + 4 * 32 == \
        stored_linear_bytes(40, 32, 12, "pivoted", 2, spec) - 2 * (3 if symmetric else 4) * 290  # less the header entries


def test_dequantize_refuses_a_scale_that_does_not_fit():
    q = torch.zeros(4, 10, dtype=torch.int8)
    with pytest.raises(ValueError):
        dequantize(pack_int32(q, 4), torch.ones(4, 3), (4, 10), 4, 3)  # 10 columns in groups of 3 need 4 scales


@pytest.mark.parametrize("factors", ["pivoted", "plain"])
def test_gptq_rounding_of_a_factor_pair_lowers_the_linears_output_error(factors):
    """Each factor rounded for the Gram of its own input (B' for x[q], A' for z = x[p] + B'_q x[q])."""
    from streamsvd.math.factorize import factorize
    from streamsvd.math.pivot import pivot_factors

    n, m, r = 96, 80, 40
    H = _gram(n, seed=3)
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(8))
    f = factorize(w, H, r, "eig")
    full = "x"
    if factors == "pivoted":
        pf = pivot_factors(f.out_factor, f.in_factor)
        tensors = {"x.out_factor": pf.out_factor.float(), "x.in_rest": pf.in_rest.float(), "x.pivots": pf.pivots.to(torch.int32)}
    else:
        tensors = {"x.out_factor": f.out_factor.float(), "x.in_factor": f.in_factor.float()}

    def product(spec):
        packed = quantize_module_tensors(tensors, full, spec, H)
        get = dequantizing_getter(packed.__getitem__, packed, spec.bits, spec.group_size)
        a = get("x.out_factor").double()
        if factors == "plain":
            return a @ get("x.in_factor").double()
        perm = tensors["x.pivots"].long()
        wq = torch.zeros(m, n, dtype=torch.float64)
        wq[:, perm] = a @ torch.cat([torch.eye(r, dtype=torch.float64), get("x.in_rest").double()], dim=1)
        return wq

    exact = f.out_factor.double() @ f.in_factor.double()
    e_rtn = weighted_error(exact, product(QuantSpec("int4", 32)), H)
    e_gptq = weighted_error(exact, product(QuantSpec("int4", 32, rounding="gptq")), H)
    # over weight seeds 8-15 the ratio was 0.76-0.82 (plain), with the factors' signs from gesdd or from eigh alike:
    # which signs a decomposition gives moves it by about 0.02, so the bound leaves that room
    assert e_gptq < 0.85 * e_rtn
