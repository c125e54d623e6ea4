"""Tests of ``passes._linears``: linear sites of FX (linear, HF Conv1D addmm, decomposed
addmm/mm through permute, tied weights) and ONNX (MatMul, Gemm transB 0/1, Transpose of a
constant, tied initializers) graphs, their ``[N, K]`` weights, and ``replace_weight``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from graphpress.graph import capture, verify
from graphpress.graph.kind import clone
from graphpress.passes._collect import collect
from graphpress.passes._linears import find_linears, replace_weight

F = TensorProto.FLOAT
RNG = np.random.default_rng(0)


class Conv1D(nn.Module):
    """Hugging Face GPT-2 ``Conv1D``: weight ``[in, out]``, ``addmm(b, x2d, W)``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))
        self.nf = nf

    def forward(self, x):
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(x.size()[:-1] + (self.nf,))


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.c = Conv1D(12, 16)
        self.d = nn.Linear(12, 4, bias=False)

    def forward(self, x):
        y = self.c(torch.relu(self.a(x)))
        return self.d(y) + torch.matmul(y, self.d.weight.t())  # d.weight read twice (tied)


X = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def mixed():
    torch.manual_seed(0)
    model = Mixed().eval()
    plain = capture(model, (X,))
    decomposed = torch.export.export(model, (X,)).run_decompositions().module()
    return model, plain, decomposed


def _by_name(sites):
    out = {}
    for s in sites:
        out.setdefault(s.name, []).append(s)
    return out


def test_fx_sites_layouts_weights_and_sharing(mixed):
    model, plain, decomposed = mixed
    sites = _by_name(find_linears(plain))
    assert [s.layout for s in sites["a.weight"]] == ["linear"]
    assert [s.layout for s in sites["c.weight"]] == ["addmm"]
    assert sorted(s.layout for s in sites["d.weight"]) == ["linear", "matmul"]
    assert not sites["a.weight"][0].shared and not sites["c.weight"][0].shared
    assert all(s.shared for s in sites["d.weight"])
    conv = sites["c.weight"][0]
    w = conv.weight_nk(plain)
    assert w.shape == (12, 16) and np.array_equal(w, model.c.weight.detach().numpy().T)
    w[:] = 0  # a fresh array: the model's tensor is untouched
    assert model.c.weight.abs().sum() > 0
    # run_decompositions: addmm/mm through permute of the [N, K] parameter
    dec = _by_name(find_linears(decomposed))
    assert [s.layout for s in dec["a.weight"]] == ["addmm"] and dec["a.weight"][0].via is not None
    assert np.array_equal(dec["a.weight"][0].weight_nk(decomposed), model.a.weight.detach().numpy())
    assert sorted(s.layout for s in dec["d.weight"]) == ["mm", "mm"]
    assert all(s.shared for s in dec["d.weight"]) and not dec["a.weight"][0].shared
    kept = find_linears(plain, exclude=("c.*", "linear_1"))
    assert [(s.name, s.layout) for s in kept] == [("a.weight", "linear"), ("d.weight", "matmul")]


def test_fx_x_names_feed_collect(mixed):
    _, plain, decomposed = mixed
    for gm in (plain, decomposed):
        sites = find_linears(gm)
        seen: dict = {}
        collect(gm, [(X,)], [s.x for s in sites],
                lambda n, a, seen=seen: seen.setdefault(n, a.shape))
        for s in sites:
            assert seen[s.x][-1] == s.weight_nk(gm).shape[1]  # x has K features


@pytest.mark.parametrize("which", ["plain", "decomposed"])
def test_fx_replace_weight(mixed, which):
    model, plain, decomposed = mixed
    gm = clone(plain if which == "plain" else decomposed)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    sites = [s for s in find_linears(gm) if not s.shared]
    new = {s.name: 0.5 * s.weight_nk(gm) for s in sites}
    for s in sites:
        replace_weight(gm, s, new[s.name], "test", "half")
    verify(gm)
    ref = Mixed().eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        ref.a.weight.mul_(0.5)
        ref.c.weight.mul_(0.5)
        expected = ref(X)
    torch.testing.assert_close(gm(X), expected, rtol=1e-5, atol=1e-5)
    names = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    assert "a_weight_half" in names and "c_weight_half" in names
    assert "a.weight" not in names and not hasattr(gm.a, "weight")  # old constant dropped
    marked = [n for n in gm.graph.nodes if n.meta.get("graphpress.pass") == "test"]
    assert len(marked) == 2
    for key, value in before.items():  # the originals were never modified
        torch.testing.assert_close(getattr(model, key.split(".")[0]).get_parameter(
            key.split(".", 1)[1]), value, rtol=0, atol=0)


def _onnx_model(h, inits=None):
    rng = np.random.default_rng(1)
    inits = inits or {
        "w_kn": rng.normal(size=(6, 5)).astype(np.float32),  # MatMul [K, N]
        "g_nk": rng.normal(size=(4, 5)).astype(np.float32),  # Gemm transB=1 [N, K]
        "g_kn": rng.normal(size=(4, 3)).astype(np.float32),  # Gemm transB=0 [K, N]
        "e_nk": rng.normal(size=(2, 3)).astype(np.float32),  # MatMul(Transpose(E))
        "tied": rng.normal(size=(2, 2)).astype(np.float32),
        "c": rng.normal(size=(4,)).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w_kn"], ["h1"], name="mm1"),
        helper.make_node("Gemm", ["h1", "g_nk", "c"], ["h2"], name="gemm_t", transB=1, beta=0.5),
        helper.make_node("Gemm", ["h2", "g_kn"], ["h3"], name="gemm_n", alpha=2.0),
        helper.make_node("Transpose", ["e_nk"], ["e_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["h3", "e_t"], ["h4"], name="mm_t"),
        helper.make_node("MatMul", ["h4", "tied"], ["h5"], name="tied1"),
        helper.make_node("MatMul", ["h5", "tied"], ["h6"], name="tied2"),
        helper.make_node("Gemm", ["h6", "tied"], ["y"], name="gemm_ta", transA=1),
    ]
    return h.make_onnx(nodes, [("x", F, [2, 6])], [("y", F, [2, 2])], inits), inits


def test_onnx_sites_and_weights(h):
    model, inits = _onnx_model(h)
    sites = find_linears(model)
    assert [(s.name, s.layout, s.shared) for s in sites] == [
        ("w_kn", "matmul", False), ("g_nk", "gemm", False), ("g_kn", "gemm", False),
        ("e_nk", "matmul", False), ("tied", "matmul", True), ("tied", "matmul", True)]
    expected = [inits["w_kn"].T, inits["g_nk"], inits["g_kn"].T, inits["e_nk"], inits["tied"].T]
    for site, ref in zip(sites, expected):
        assert np.array_equal(site.weight_nk(model), ref)
    assert [s.x for s in sites][:4] == ["x", "h1", "h2", "h3"]
    assert [s.name for s in find_linears(model, exclude=("gemm_*", "tied"))] == ["w_kn", "e_nk"]


def test_onnx_replace_weight_numerics(h):
    model, inits = _onnx_model(h)
    x = RNG.normal(size=(2, 6)).astype(np.float32)
    work = model.clone()
    factors = {"w_kn": -1.0, "g_nk": 2.0, "g_kn": 0.5, "e_nk": 3.0}
    for site in find_linears(work):
        if not site.shared:
            replace_weight(work, site, factors[site.name] * site.weight_nk(work), "test", "neg")
    verify(work)
    ops = h.onnx_ops(work)
    assert "Transpose" not in ops and ops.count("MatMul") == 4
    names = set(work.graph.initializers)
    assert {"w_kn.neg", "g_nk.neg", "g_kn.neg", "e_nk.neg", "tied"} <= names
    assert not names & {"w_kn", "g_nk", "g_kn", "e_nk"}
    assert work.graph.initializers["g_nk.neg"].const_value.numpy().shape == (4, 5)  # transB=1
    assert work.graph.initializers["e_nk.neg"].metadata_props["graphpress.pass"] == "test"
    scaled, _ = _onnx_model(h, {k: v * factors.get(k, 1.0) for k, v in inits.items()})
    np.testing.assert_allclose(h.ort_outputs(work, {"x": x})[0], h.ort_outputs(
        scaled, {"x": x})[0], rtol=1e-5, atol=1e-5)
    assert np.array_equal(model.graph.initializers["w_kn"].const_value.numpy(), inits["w_kn"])


def test_minilm_fx_sites(minilm):
    model, inputs = minilm
    gm = capture(model, (), inputs)
    sites = find_linears(gm)
    assert len(sites) == 6 * 6 + 1  # q, k, v, out, fc1, fc2 per layer + pooler
    assert all(s.layout == "linear" and not s.shared for s in sites)
    shapes = {s.weight_nk(gm).shape for s in sites}
    assert shapes == {(384, 384), (1536, 384), (384, 1536)}
    assert len(find_linears(gm, exclude=("pooler.*",))) == 36
