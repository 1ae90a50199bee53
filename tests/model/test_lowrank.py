"""The stored forms of a compressed linear (plain, pivoted, dense) and the modules rebuilt from them."""

import pytest
import torch
from torch import nn

from streamsvd.model.lowrank import LowRankLinear, PivotedLinear, factor_tensors, module_from_tensors, stored_form


def _factors(m=40, n=96, r=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g, dtype=torch.float64), torch.randn(r, n, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("bias", [False, True])
def test_pivoted_module_computes_the_same_linear_map_as_the_factors(bias):
    a, b = _factors()
    bvec = torch.randn(40) if bias else None
    tensors = factor_tensors("x.proj", a, b, bvec, torch.float32, factors="pivoted")
    assert set(tensors) == {"x.proj.out_factor", "x.proj.in_rest", "x.proj.pivots"} | ({"x.proj.bias"} if bias else set())
    assert tensors["x.proj.pivots"].dtype == torch.int32 and tensors["x.proj.in_rest"].shape == (17, 96 - 17)
    module = module_from_tensors(tensors.__getitem__, set(tensors), "x.proj", torch.float32)
    assert isinstance(module, PivotedLinear) and module.rank == 17
    assert sum(p.numel() for n, p in module.named_parameters() if n != "bias") == 17 * (40 + 96 - 17)
    x = torch.randn(3, 5, 96)
    want = x.double() @ (a @ b).T + (0 if bvec is None else bvec.double())
    torch.testing.assert_close(module(x).double(), want, rtol=1e-4, atol=1e-4)


def test_plain_form_and_outputs_from_before_pivoting_still_load_as_two_factors():
    a, b = _factors()
    tensors = factor_tensors("x.proj", a, b, None, torch.float32)  # the default is still plain here
    assert set(tensors) == {"x.proj.out_factor", "x.proj.in_factor"} and stored_form(set(tensors), "x.proj") == "plain"
    module = module_from_tensors(tensors.__getitem__, set(tensors), "x.proj", torch.float32)
    assert isinstance(module, LowRankLinear)
    x = torch.randn(4, 96)
    torch.testing.assert_close(module(x).double(), x.double() @ (a @ b).T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("factors,rank", [("pivoted", 40), ("plain", 30)])
def test_a_factorisation_that_would_not_be_smaller_is_stored_dense(factors, rank):
    a, b = _factors(r=rank)
    tensors = factor_tensors("x.proj", a, b, torch.ones(40), torch.bfloat16, factors=factors)
    assert set(tensors) == {"x.proj.weight", "x.proj.bias"} and tensors["x.proj.weight"].dtype == torch.bfloat16
    module = module_from_tensors(tensors.__getitem__, set(tensors), "x.proj", torch.float32)
    assert type(module) is nn.Linear
    torch.testing.assert_close(module.weight, (a @ b).to(torch.bfloat16).float())


def test_pivoted_module_exports_with_gather_matmul_and_add_only():
    """What ONNX / GGUF-style / quantised paths must support (docs/DESIGN.md): no scatter, no solve."""
    a, b = _factors()
    tensors = factor_tensors("p", a, b, torch.zeros(40), torch.float32, factors="pivoted")
    module = module_from_tensors(tensors.__getitem__, set(tensors), "p", torch.float32)
    program = torch.export.export(module, (torch.randn(2, 7, 96),))
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    gather, matmul_add = {"aten.index_select.default"}, {"aten.addmm.default", "aten.linear.default", "aten.t.default"}
    shape = {"aten.slice.Tensor", "aten.view.default", "aten.reshape.default"}
    assert ops <= gather | matmul_add | shape, ops
    assert "aten.index_select.default" in ops and "aten.addmm.default" in ops and "aten.linear.default" in ops
