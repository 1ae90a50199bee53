"""run --device: the factorisation math allocates every tensor on its inputs' device.

A GPU job hands math/factorize.py and math/compensate.py tensors on the GPU; a tensor made without
`device=` (torch.zeros, torch.eye, ...) would land on the CPU and the step would fail there, or worse,
move the work back to the CPU. No GPU is needed to find those: with torch's default device set to
"meta" while CPU inputs are factored, every such tensor lands on meta and the step fails or returns
meta tensors. Each route below must return CPU tensors identical to the ones it returns normally.
Where torch sees a GPU the same routes also run there and match the CPU to round-off.
"""

import pytest
import torch

from factor_problems import activation_problem
from streamsvd.math.compensate import (CrossGramAccumulator, ProjectedCrossAccumulator, compensated_target,
                                       compensated_whitening, factorize_compensated, output_error)
from streamsvd.math.factorize import Factors, factorize, factorize_output_side, whiten


def _problem(m=40, n=24, seed=0, tokens=96, device=None):
    """The inputs every route reads, made outside the routes (the job's statistics are made on the CPU too)."""
    w, x = activation_problem(tokens, m, n, seed)
    x_comp = x + 0.1 * torch.roll(x, 1, dims=1)  # the compressed model's inputs: close to X, not X
    cross = CrossGramAccumulator(n)
    cross.add_pair(x.float(), x_comp.float())
    projected = ProjectedCrossAccumulator(w.float())
    projected.add_pair(x.float(), x_comp.float())
    p = {"w": w.float(), "g": (x.T @ x) / tokens, "x": x, "g_comp": (x_comp.T @ x_comp) / tokens,
         "eye": torch.eye(m, dtype=torch.float64), "c": cross.gram}
    p = {k: v.to(device) if device is not None else v for k, v in p.items()}
    p["cross"], p["projected"] = cross, projected
    return p


def _compensated(p, dtype=torch.float64):
    w, g_comp = p["w"], p["g_comp"]
    white, q, inv, lam = compensated_whitening(g_comp, 0.1)
    wc = p["cross"].times(w)
    f = factorize_compensated(w, white, q, inv, lam, None, 5, wc=wc, dtype=dtype)
    # the output error both ways (factors and W'), and W* from C itself as well as from W C
    err = output_error(w, (f.out_factor, f.in_factor), 1.0, None, g_comp, wc=wc)
    err2 = output_error(w, f.out_factor @ f.in_factor, 1.0, p["c"], g_comp)
    return f, torch.tensor([err, err2], dtype=torch.float64, device="cpu"), compensated_target(w, p["c"], q, inv, lam)


def _routes():
    """name -> a function of the problem returning factors, covering every route the job can take."""
    return {
        "tall eig": lambda p: factorize(p["w"], p["g"], 4, "eig"),
        "tall eig float32 (QR)": lambda p: factorize(p["w"], p["g"], 4, "eig", dtype=torch.float32),
        "wide eig": lambda p: factorize(p["w"].T.contiguous(), p["eye"], 4, "eig"),
        "shared whitening": lambda p: factorize(p["w"], whiten(p["g"], "eig"), 4, "eig"),
        "output side": lambda p: factorize(p["w"], p["g"], 4, "eig", side="output"),
        "output side float32": lambda p: factorize_output_side(p["w"], p["w"].double() @ p["g"] @ p["w"].double().T, 4,
                                                               torch.float32),
        "cholesky": lambda p: factorize(p["w"], p["g"], 4, "cholesky"),
        "cholesky, singular Gram (shifted)": lambda p: factorize(p["w"], p["g"][:, :1] @ p["g"][:1, :], 2, "cholesky"),
        "randomized eig": lambda p: factorize(p["w"], p["g"], 2, "eig", svd="randomized"),
        "randomized cholesky": lambda p: factorize(p["w"], p["g"], 2, "cholesky", svd="randomized"),
        "plain svd": lambda p: factorize(p["w"], None, 4, "svd"),
        "compensated": _compensated,
        "compensated float32": lambda p: _compensated(p, torch.float32),
        "projected cross statistic": lambda p: p["projected"].times(p["w"]),
    }


ROUTES = _routes()


def _tensors(result):
    if isinstance(result, Factors):
        return [result.out_factor, result.in_factor, result.spectrum]
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for part in result for t in _tensors(part)]


@pytest.mark.parametrize("route", list(ROUTES))
def test_every_route_allocates_on_its_inputs_device(route):
    p = _problem()  # tall: gate/up's shape; the wide route transposes it
    expected = _tensors(ROUTES[route](p))
    with torch.device("meta"):  # a tensor made without device= lands here and cannot meet the CPU inputs
        got = _tensors(ROUTES[route](p))
    assert [t.device.type for t in got] == ["cpu"] * len(got)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_factors_move_whole():
    p = _problem()
    f = factorize(p["w"], p["g"], 4, "eig")
    moved = f.to(torch.device("meta"))
    assert {t.device.type for t in (moved.out_factor, moved.in_factor, moved.spectrum)} == {"meta"}
    assert (moved.shift, moved.tail_loss, moved.precision, moved.rank) == (f.shift, f.tail_loss, f.precision, f.rank)


def test_the_same_routes_on_a_gpu_match_the_cpu():
    """Where torch sees a GPU: every route there gives the CPU's factors' loss to round-off (the factors themselves
    may differ in sign or within a repeated singular value). Without one, the check that CUDA is absent is what is
    tested here, and docs/RESULTS.md marks the GPU rows unmeasured."""
    if not torch.cuda.is_available():
        from streamsvd.errors import StreamSVDError
        from streamsvd.job.device import resolve_device

        with pytest.raises(StreamSVDError, match="--device cuda"):
            resolve_device("cuda")
        return
    p, on_gpu = _problem(), _problem(device=torch.device("cuda"))
    for name, route in ROUTES.items():
        cpu_out, gpu_out = route(p), route(on_gpu)
        if isinstance(cpu_out, tuple):
            cpu_out, gpu_out = cpu_out[0], gpu_out[0]
        if not isinstance(cpu_out, Factors):
            assert torch.allclose(gpu_out.cpu(), cpu_out, rtol=1e-6, atol=1e-9), name
            continue
        assert gpu_out.out_factor.device.type == "cuda", name
        w = (p["w"].T if name == "wide eig" else p["w"]).double()
        x = torch.eye(w.shape[1], dtype=torch.float64) if name == "wide eig" else p["x"]

        def loss(f):
            return float(((w - (f.out_factor @ f.in_factor).cpu()) @ x.T).norm())

        assert loss(gpu_out) == pytest.approx(loss(cpu_out), rel=1e-4, abs=1e-9), name


def _profiled_block(seed=0, weighted=False):
    """A tiny llama block with its statistics (and with `weighted` its sensitivity-weighted Grams) collected from
    random inputs, as the profile's statistics pass leaves them for job/profile.block_spectra."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from streamsvd.job.profile import WeightedEnergies
    from streamsvd.job.stages import GramCollector, output_side_linears
    from streamsvd.model.architecture import linear_modules

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=80, num_attention_heads=4, num_key_value_heads=2)
    layer = LlamaDecoderLayer(config, 0)
    linears = linear_modules(layer)
    stats = GramCollector(linears, output_side_linears(layer, "eig"))
    weighing = None
    if weighted:
        weighing = WeightedEnergies(linears, {n: torch.rand(2, 24, dtype=torch.float64) for n in linears})
        weighing.rows = (0, 2)
    with torch.no_grad():
        inputs = {}
        for name, m in linears.items():  # one tensor per input width: q/k/v and gate/up share theirs
            x = inputs.setdefault(m.in_features, torch.randn(2, 24, m.in_features))
            m(x)
    stats.close()
    if weighing is not None:
        weighing.close()
    return layer, stats, weighing


@pytest.mark.parametrize("weighted", [False, True], ids=["spectra", "weighted energies"])
def test_the_profiles_spectra_allocate_on_their_inputs_device(weighted):
    from streamsvd.job.profile import block_spectra

    expected = block_spectra(*_profiled_block(weighted=weighted))
    layer, stats, weighing = _profiled_block(weighted=weighted)
    with torch.device("meta"):
        got = block_spectra(layer, stats, weighing, device=torch.device("cpu"))
    assert got.keys() == expected.keys() and len(got) == 7
    for name in got:
        (s, d), (s0, d0) = got[name], expected[name]
        assert (s == s0).all(), name
        assert (d is None and d0 is None) if not weighted else (d == d0).all(), name
    if torch.cuda.is_available():  # on a GPU: the same spectra and energies to round-off
        on_gpu = block_spectra(*_profiled_block(weighted=weighted), device=torch.device("cuda"))
        for name in got:
            assert on_gpu[name][0] == pytest.approx(expected[name][0], rel=1e-6, abs=1e-9), name
            if weighted:
                assert on_gpu[name][1] == pytest.approx(expected[name][1], rel=1e-5, abs=1e-9), name
