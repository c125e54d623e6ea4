"""Tests of ``factor-low-rank`` on ONNX (MatMul, Gemm transB 0/1, Transpose of a weight) and FX
(linear, HF Conv1D addmm, decomposed permute+addmm) graphs: structure, numerics against the
best rank-r weights in ORT/eager, exact low-rank weights, tied weights, activation-aware
factoring, the global budget, report rows, spec errors, and all-MiniLM-L6-v2."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from graphpress.export import to_onnx
from graphpress.graph import capture, verify
from graphpress.graph.errors import PassSpecError, PreconditionError
from graphpress.passes import from_spec, optimize
from graphpress.passes.low_rank import FactorLowRank

F = TensorProto.FLOAT


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Small dense linear algebra gains little from threads and loses 10x or more when the
    (shared, 2-core) test machine is oversubscribed: run these tests on one torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _truncate(w: np.ndarray, r: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(np.asarray(w, np.float64), full_matrices=False)
    return ((u[:, :r] * s[:r]) @ vt[:r]).astype(np.float32)


def _weights(rank: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Initializers of :func:`_onnx_model` (``rank``: every weight of exactly that rank)."""
    rng = np.random.default_rng(seed)

    def w(*shape):
        if rank is None:
            return rng.normal(size=shape).astype(np.float32)
        low = rng.normal(size=(shape[0], rank)) @ rng.normal(size=(rank, shape[1]))
        return (low / np.sqrt(rank)).astype(np.float32)

    return {"w1": w(40, 48), "b1": rng.normal(size=48).astype(np.float32),
            "w2": w(32, 48), "c2": rng.normal(size=32).astype(np.float32),
            "w3": w(32, 24), "e4": w(20, 24)}


def _onnx_model(h, inits):
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),  # W [K, N]
        helper.make_node("Add", ["m1", "b1"], ["h1"]),
        helper.make_node("Gemm", ["h1", "w2", "c2"], ["h2"], transB=1, beta=0.5),  # [N, K]
        helper.make_node("Gemm", ["h2", "w3"], ["h3"], alpha=2.0),  # [K, N]
        helper.make_node("Transpose", ["e4"], ["e4_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["h3", "e4_t"], ["y"], name="mm4"),  # Transpose(E[N, K])
    ]
    return h.make_onnx(nodes, [("x", F, [5, 40])], [("y", F, [5, 20])], inits)


def _nk(inits):
    return {"w1": inits["w1"].T, "w2": inits["w2"], "w3": inits["w3"].T, "e4": inits["e4"]}


X = np.random.default_rng(1).normal(size=(5, 40)).astype(np.float32)


def test_onnx_structure_and_numerics_match_best_rank_r_weights(h):
    inits = _weights()
    model = _onnx_model(h, inits)
    before = h.onnx_snapshot(model)
    result = optimize(model, [FactorLowRank(rank=8)])
    out = result.graph
    assert h.onnx_snapshot(model) == before  # the caller's model is untouched
    assert h.onnx_ops(out) == ["MatMul", "MatMul", "Add", "MatMul", "Gemm", "MatMul", "Gemm",
                               "MatMul", "MatMul"]  # golden sequence; the Transpose is gone
    inits_out = out.graph.initializers
    assert inits_out["w1.lowrank.b"].const_value.numpy().shape == (40, 8)
    assert inits_out["w2.lowrank.a"].const_value.numpy().shape == (32, 8)  # transB=1 kept
    assert inits_out["w3.lowrank.a"].const_value.numpy().shape == (8, 24)  # transB=0
    assert not {"w1", "w2", "w3", "e4"} & set(inits_out)
    assert all(v.metadata_props.get("graphpress.pass") == "factor-low-rank"
               for k, v in inits_out.items() if ".lowrank." in k)
    nk = _nk(inits)
    truncated = dict(inits, w1=_truncate(nk["w1"], 8).T, w2=_truncate(nk["w2"], 8),
                     w3=_truncate(nk["w3"], 8).T, e4=_truncate(nk["e4"], 8))
    (ref,) = h.ort_outputs(_onnx_model(h, truncated), {"x": X})
    (got,) = h.ort_outputs(out, {"x": X})
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    stats = result.report.records[0].stats
    assert stats["linears_factored"] == 4 and stats["params_after"] == 8 * (88 + 80 + 56 + 44)
    rows = {row["layer"]: row for row in result.report.records[0].layers}
    for name, w in nk.items():  # predicted = the optimal rank-8 error of each weight
        row = rows[name]
        expected = np.linalg.norm(w - _truncate(w, 8)) / np.linalg.norm(w)
        np.testing.assert_allclose(row["predicted_error"], expected, rtol=1e-4)
        np.testing.assert_allclose(row["output_error"], expected, rtol=1e-4)
        assert row["rank"] == 8 and row["shape"] == f"{w.shape[0]}x{w.shape[1]}"
        assert len(row["spectrum"]) == min(w.shape) and row["error_curve"][-1][1] < 1e-6


def test_exactly_low_rank_weights_factor_without_error(h):
    inits = _weights(rank=4)
    model = _onnx_model(h, inits)
    result = optimize(model, [FactorLowRank(energy=0.999999)])
    assert {row["rank"] for row in result.report.records[0].layers} == {4}
    (ref,) = h.ort_outputs(model, {"x": X})
    (got,) = h.ort_outputs(result.graph, {"x": X})
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_budget_round_to_and_no_op(h):
    rng = np.random.default_rng(4)
    chain = {f"w{i}": (rng.normal(size=(192, 192)) * np.exp(-0.02 * (i + 1) * np.arange(192))
                       ).astype(np.float32) for i in range(4)}  # different decays per layer
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i}", f"w{i}"],
                              ["y" if i == 3 else f"h{i + 1}"]) for i in range(4)]
    big = h.make_onnx(nodes, [("x", F, [2, 192])], [("y", F, [2, 192])], chain)
    result = optimize(big, ["factor-low-rank:budget=0.6,round_to=2,method=randomized"])
    stats = result.report.records[0].stats
    assert 0.99 * 0.6 <= stats["param_ratio"] <= 0.6
    ranks = [row["rank"] for row in result.report.records[0].layers]
    assert all(r % 2 == 0 for r in ranks) and len(set(ranks)) > 1  # allocated, not uniform
    model = _onnx_model(h, _weights())
    for spec in ("factor-low-rank:rank=22", "factor-low-rank:rank=4,min_features=64",
                 "factor-low-rank:rank=4,exclude=w*|e4"):
        noop = optimize(model, [spec])
        assert noop.modified is False and h.onnx_ops(noop.graph) == h.onnx_ops(model)


def test_onnx_tied_weight_is_skipped(h):
    w = np.random.default_rng(2).normal(size=(32, 32)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("MatMul", ["h", "w"], ["y"])]
    model = h.make_onnx(nodes, [("x", F, [2, 32])], [("y", F, [2, 32])], {"w": w})
    result = optimize(model, [FactorLowRank(rank=4)])
    assert result.modified is False
    assert result.report.records[0].stats["skipped_shared"] == 2


class Conv1D(nn.Module):
    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))
        self.nf = nf

    def forward(self, x):
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(x.size()[:-1] + (self.nf,))


class Net(nn.Module):
    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.a = nn.Linear(40, 48)
        self.c = Conv1D(32, 48)
        self.d = nn.Linear(32, 24, bias=False)
        self.tied = tied

    def forward(self, x):
        y = self.d(torch.relu(self.c(torch.relu(self.a(x)))))
        return y + (y @ self.d.weight[:, :24].T if self.tied else 0)


XT = torch.randn(2, 5, 40, generator=torch.Generator().manual_seed(3))


def _truncated_net(net: Net, r: int) -> Net:
    ref = Net(net.tied).eval()
    ref.load_state_dict(net.state_dict())
    with torch.no_grad():
        ref.a.weight.copy_(torch.from_numpy(_truncate(net.a.weight.numpy(), r)))
        ref.c.weight.copy_(torch.from_numpy(_truncate(net.c.weight.numpy(), r)))
        ref.d.weight.copy_(torch.from_numpy(_truncate(net.d.weight.numpy(), r)))
    return ref


@pytest.mark.parametrize("decomposed", [False, True])
def test_fx_linear_addmm_layouts_and_export(h, decomposed):
    torch.manual_seed(0)
    net = Net().eval()
    gm = capture(net, (XT,))
    if decomposed:  # addmm/mm through permute of the [N, K] parameter
        gm = torch.export.export(net, (XT,)).run_decompositions().module()
    snapshot = h.fx_snapshot(gm)
    result = optimize(gm, [FactorLowRank(rank=6)])
    out = result.graph
    h.assert_fx_unchanged(gm, snapshot)
    verify(out)
    ops = h.fx_ops(out)
    if decomposed:
        assert ops.count("aten.mm") == 4 and ops.count("aten.addmm") == 2  # one mm per factor
    else:
        assert ops.count("aten.linear") == 4 and ops.count("aten.mm") == 1
        assert ops.count("aten.addmm") == 1
    marked = [n for n in out.graph.nodes if n.meta.get("graphpress.pass") == "factor-low-rank"]
    assert len(marked) == 3 * 4  # two constants and two products per layer
    assert not hasattr(out.a, "weight") and hasattr(out, "a_weight_lowrank_a")
    with torch.no_grad():
        expected = _truncated_net(net, 6)(XT)
        got = out(XT)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    exported = to_onnx(out, (XT,))
    (onnx_out,) = h.ort_outputs(exported, {exported.graph.inputs[0].name: XT.numpy()})
    np.testing.assert_allclose(onnx_out, got.numpy(), rtol=1e-4, atol=1e-4)


def test_fx_tied_weight_is_skipped():
    net = Net(tied=True).eval()
    gm = capture(net, (XT,))
    result = optimize(gm, [FactorLowRank(rank=6)])
    stats = result.report.records[0].stats
    assert stats["linears_factored"] == 2 and stats["skipped_shared"] == 1
    assert {row["layer"] for row in result.report.records[0].layers} == {"a.weight", "c.weight"}


MIX = np.random.default_rng(5).normal(size=(40, 40)) * np.exp(-0.25 * np.arange(40))[:, None]


def _correlated(n: int, k: int, seed: int) -> np.ndarray:
    """Rows from one strongly anisotropic distribution (``MIX``), ``seed`` picks the rows."""
    return (np.random.default_rng(seed).normal(size=(n, k)) @ MIX).astype(np.float32)


@pytest.mark.parametrize("ir_kind", ["onnx", "fx"])
def test_activation_aware_lowers_output_error(h, ir_kind):
    torch.manual_seed(0)
    lin = nn.Linear(40, 48).eval()
    if ir_kind == "fx":
        graph = capture(lin, (torch.zeros(8, 40),))
        run = lambda g, x: g(torch.from_numpy(x)).detach().numpy()  # noqa: E731
    else:
        w, b = lin.weight.detach().numpy().T, lin.bias.detach().numpy()
        graph = h.make_onnx([helper.make_node("MatMul", ["x", "w"], ["m"]),
                             helper.make_node("Add", ["m", "b"], ["y"])],
                            [("x", F, [8, 40])], [("y", F, [8, 48])], {"w": w, "b": b})
        run = lambda g, x: h.ort_outputs(g, {"x": x})[0]  # noqa: E731
    calib = [(_correlated(8, 40, seed),) for seed in range(8)]
    held_out = _correlated(8, 40, 99)
    ref = run(graph, held_out)
    errors = {}
    for aware in (False, True):
        result = optimize(graph, [FactorLowRank(rank=6, activation_aware=aware)],
                          calibration=calib)
        (row,) = result.report.records[0].layers
        assert row["output_error_on"] == "calibration" and row["whitened"] is aware
        errors[aware] = np.linalg.norm(run(result.graph, held_out) - ref) / np.linalg.norm(ref)
    assert errors[True] < 0.5 * errors[False], errors
    with pytest.raises(PreconditionError, match="calibration"):
        optimize(graph, [FactorLowRank(rank=6, activation_aware=True)])


def test_sensitivity_moves_rank_to_the_layer_that_matters(h):
    rng = np.random.default_rng(6)
    inits = {f"w{i}": (rng.normal(size=(64, 64)) * np.exp(-0.03 * np.arange(64))).astype(
        np.float32) for i in (1, 2)}
    inits["scale"] = np.array(0.01, np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"]),
             helper.make_node("Mul", ["m1", "scale"], ["s1"]),  # w1's error is damped 100x
             helper.make_node("MatMul", ["x", "w2"], ["m2"]),
             helper.make_node("Add", ["s1", "m2"], ["y"])]
    model = h.make_onnx(nodes, [("x", F, [16, 64])], [("y", F, [16, 64])], inits)
    calib = [(rng.normal(size=(16, 64)).astype(np.float32),) for _ in range(4)]
    x = rng.normal(size=(16, 64)).astype(np.float32)
    (ref,) = h.ort_outputs(model, {"x": x})
    ranks, errors = {}, {}
    for weighted in (False, True):
        result = optimize(model, [FactorLowRank(budget=0.4, sensitivity=weighted)],
                          calibration=calib)
        rows = {row["layer"]: row for row in result.report.records[0].layers}
        ranks[weighted] = (rows["w1"]["rank"], rows["w2"]["rank"])
        (got,) = h.ort_outputs(result.graph, {"x": x})
        errors[weighted] = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        if weighted:
            assert rows["w1"]["sensitivity"] < 1e-2 * rows["w2"]["sensitivity"]
    assert abs(ranks[False][0] - ranks[False][1]) <= 2  # alike without the measurement
    assert ranks[True][0] < ranks[True][1] // 2
    assert errors[True] < 0.7 * errors[False], (ranks, errors)


class Damped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(64, 64, bias=False), nn.Linear(64, 64)

    def forward(self, x):
        return 0.01 * self.l1(x) + self.l2(x)


def test_sensitivity_on_fx():
    torch.manual_seed(0)
    gm = capture(Damped().eval(), (torch.randn(16, 64),))
    calib = [(torch.randn(16, 64),) for _ in range(3)]
    result = optimize(gm, ["factor-low-rank:budget=0.4,sensitivity=true"], calibration=calib)
    rows = {row["layer"]: row for row in result.report.records[0].layers}
    assert rows["l1.weight"]["sensitivity"] < 1e-2 * rows["l2.weight"]["sensitivity"]
    assert rows["l1.weight"]["rank"] < rows["l2.weight"]["rank"] // 2


def test_ensures_rejects_a_pair_that_saves_nothing(h):
    from graphpress.graph.errors import PostconditionError

    rng = np.random.default_rng(7)
    inits = {"w.lowrank.b": rng.normal(size=(16, 12)).astype(np.float32),  # r = 12 > 7
             "w.lowrank.a": rng.normal(size=(12, 16)).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w.lowrank.b"], ["h"]),
             helper.make_node("MatMul", ["h", "w.lowrank.a"], ["y"])]
    model = h.make_onnx(nodes, [("x", F, [2, 16])], [("y", F, [2, 16])], inits)
    with pytest.raises(PostconditionError, match="saves no parameters"):
        FactorLowRank(rank=4).ensures(model)
    good = {"w.lowrank.b": inits["w.lowrank.b"][:, :4], "w.lowrank.a": inits["w.lowrank.a"][:4]}
    FactorLowRank(rank=4).ensures(h.make_onnx(nodes, [("x", F, [2, 16])], [("y", F, [2, 16])],
                                              good))


@pytest.mark.parametrize("spec,message", [
    ("factor-low-rank", "exactly one of"),
    ("factor-low-rank:rank=4,energy=0.9", "exactly one of"),
    ("factor-low-rank:energy=1.5", "in \\(0, 1\\)"),
    ("factor-low-rank:budget=0", "in \\(0, 1\\)"),
    ("factor-low-rank:rank=0", ">= 1"),
    ("factor-low-rank:rank=4,method=qr", "must be one of"),
    ("factor-low-rank:rank=4,round_to=0", "round_to"),
    ("factor-low-rank:rank=4,sensitivity=true", "use it with budget"),
])
def test_spec_errors(spec, message):
    with pytest.raises(PassSpecError, match=message):
        from_spec(spec)


def test_spec_round_trip():
    spec = "factor-low-rank:budget=0.75,method=randomized,round_to=16,activation_aware=true"
    built = from_spec(spec)
    assert built == FactorLowRank(budget=0.75, method="randomized", round_to=16,
                                  activation_aware=True)
    assert from_spec(built.spec()) == built


@pytest.mark.slow
def test_minilm_budget_activation_aware(minilm_tokenizer):
    from graphpress.data import mean_pool, stdlib_sentences

    model, tokenizer = minilm_tokenizer

    def encode(sentences):
        enc = tokenizer(sentences, padding="max_length", max_length=32, truncation=True,
                        return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    evaluation = encode(stdlib_sentences(16))
    gm = capture(model, (), evaluation)
    calib = [encode(stdlib_sentences(16, offset=1000 + 16 * i)) for i in range(2)]
    start = time.perf_counter()
    result = optimize(gm, ["factor-low-rank:budget=0.75,activation_aware=true,exclude=pooler.*"],
                      calibration=calib)
    seconds = time.perf_counter() - start
    stats = result.report.records[0].stats
    assert stats["linears_considered"] == 36
    assert abs(stats["param_ratio"] - 0.75) <= 0.0075
    mask = evaluation["attention_mask"].numpy()
    with torch.no_grad():
        ref = mean_pool(model(**evaluation).last_hidden_state.numpy(), mask)
        got = mean_pool(result.graph(**evaluation)[0].numpy(), mask)
    cosine = np.sum(ref * got, 1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert cosine.min() > 0.75 and cosine.mean() > 0.85, (cosine, seconds)


def test_sensitivity_sees_a_factored_fx_output_layer():
    """The last layer's output is the graph output: factoring it renames the FX node, and its
    measured sensitivity must still be its real effect (not 0, which would crush its rank)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32)).eval()
    x = torch.randn(64, 32)
    result = optimize(capture(model, (x,)), ["factor-low-rank:budget=0.5,sensitivity=true"],
                      calibration=[(x,)])
    rows = result.report.records[0].layers
    assert len(rows) == 2 and all(row["sensitivity"] > 0.1 for row in rows)


def test_a_calibration_table_is_not_inputs():
    from graphpress.passes import calibrate

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32)).eval()
    x = torch.randn(16, 32)
    gm = capture(model, (x,))
    table = calibrate(gm, [(x,)])
    assert optimize(gm, ["factor-low-rank:rank=4"], calibration=table).modified
    with pytest.raises(PreconditionError, match="CalibrationTable"):
        optimize(gm, ["factor-low-rank:rank=4,activation_aware=true"], calibration=table)
