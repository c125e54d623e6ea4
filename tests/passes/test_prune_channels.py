"""prune-channels on FX and ONNX: pruning a unit equals zeroing its consumers' input slices
(checked against the masked unpruned model in eager / ORT for an MLP, a CNN with batch norms
and residual blocks, a transformer block with heads and FFN, concat/split), the graph interface
is unchanged, parameters drop by the expected amount, the IR-free scores and selection, the
hand-built group contract, prune → fold-batchnorm → smaller ONNX in ORT, options and errors,
and all-MiniLM-L6-v2's FFN pruned 50% on ONNX."""

from __future__ import annotations

import copy

import numpy as np
import onnx_ir as ir
import pytest
import torch
from torch import nn

import graphpress as gp
from graphpress.export import to_onnx
from graphpress.graph import measure, verify
from graphpress.graph.channels import ChannelGroup, ChannelUse
from graphpress.graph.errors import PassSpecError, PreconditionError, UnsupportedGraphError
from graphpress.passes import from_spec
from graphpress.passes.prune import PruneChannels
from graphpress.passes.prune._importance import (
    ChannelStats,
    IndexLedger,
    keep_count,
    magnitude_scores,
    select_units,
)
from graphpress.passes.prune._shrink_fx import FxShrinker
from graphpress.passes.prune._shrink_onnx import OnnxShrinker


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(12, 40), nn.Linear(40, 24), nn.Linear(24, 5)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.relu(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.block1, self.block2, self.head = Block(16), Block(16), nn.Linear(16, 10)

    def forward(self, x):
        x = self.block2(self.block1(torch.relu(self.bn(self.stem(x)))))
        return self.head(x.mean((2, 3)))


class Attention(nn.Module):
    """A MiniLM-style encoder block: 4 heads of 16, GELU FFN of 96, post-LayerNorm."""

    def __init__(self, d: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.f1, self.f2 = nn.Linear(d, 96), nn.Linear(96, d)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = (p(x).view(b, s, self.heads, d // self.heads).transpose(1, 2)
                   for p in (self.q, self.k, self.v))
        a = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d)
        x = self.ln1(x + self.o(a))
        return self.ln2(x + self.f2(nn.functional.gelu(self.f1(x))))


class CatSplit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(8, 24), nn.Linear(40, 32)
        self.d, self.e = nn.Linear(16, 4), nn.Linear(16, 4)

    def forward(self, x):
        h = torch.cat([torch.relu(self.a(x)), torch.tanh(self.b(x))], -1)
        u, v = torch.split(torch.relu(self.c(h)), [16, 16], -1)
        return self.d(u) + self.e(v)


def _models(h):
    torch.manual_seed(0)
    return {"mlp": (MLP().eval(), torch.randn(6, 12)),
            "cnn": (h.randomize_bn(CNN()), torch.randn(2, 3, 8, 8)),
            "attention": (Attention().eval(), torch.randn(2, 5, 64)),
            "catsplit": (CatSplit().eval(), torch.randn(4, 8))}


@pytest.fixture(scope="module")
def models(h):
    return _models(h)


def _record(monkeypatch) -> list:
    """Spy on both shrinkers: every (group, kept units) the pass applies."""
    records = []
    for cls in (FxShrinker, OnnxShrinker):
        original = cls.shrink

        def spy(self, group, keep, _original=original):
            records.append((group, np.asarray(keep)))
            return _original(self, group, keep)

        monkeypatch.setattr(cls, "shrink", spy)
    return records


def _masked(graph, records, model):
    """The unpruned graph with every removed unit's consumer slices zeroed (same function)."""
    ref = copy.deepcopy(model) if isinstance(graph, torch.fx.GraphModule) else graph
    arrays = {}
    for group, keep in records:
        units = np.setdiff1d(np.arange(group.size // group.unit), keep)
        for use in (u for u in group.uses if u.role == "in"):
            if isinstance(ref, nn.Module):
                array = ref.get_parameter(use.tensor).detach().numpy()  # in place on the copy
            else:
                array = arrays.setdefault(use.tensor, np.array(
                    ref.graph.initializers[use.tensor].const_value.numpy(), copy=True))
            view = np.moveaxis(array, use.axis, 0)
            for u in units:
                view[use.offset + u * group.unit: use.offset + (u + 1) * group.unit] = 0
    if isinstance(ref, nn.Module):
        return ref
    ref = ref.clone()
    for name, array in arrays.items():
        ref.graph.initializers[name].const_value = ir.Tensor(array, name=name)
    return ref


@pytest.mark.parametrize("ir_kind", ["fx", "onnx"])
@pytest.mark.parametrize("name,options", [
    ("mlp", {"importance": "l1"}), ("mlp", {"importance": "l2", "global_ranking": True}),
    ("cnn", {"importance": "l1", "round_to": 4}), ("attention", {"importance": "activation"}),
    ("attention", {"importance": "l2", "scope": "heads"}), ("catsplit", {"round_to": 4}),
])
def test_pruning_equals_masking(h, models, monkeypatch, ir_kind, name, options):
    model, x = models[name]
    pruned = h.graph_of(model, x, ir_kind)
    unpruned = pruned.clone() if ir_kind == "onnx" else pruned
    records = _record(monkeypatch)
    calibration = [(x,)] if ir_kind == "fx" else [(x.numpy(),)]
    result = PruneChannels(ratio=0.5, **options)(pruned, calibration=calibration)
    verify(pruned)
    assert result.modified and records and result.stats["units_removed"] > 0
    assert result.stats["params_after"] < result.stats["params_before"]
    masked = _masked(unpruned, records, model)
    expected = masked(x).detach().numpy() if isinstance(masked, nn.Module) else h.run_graph(masked, x)
    got = h.run_graph(pruned, x)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert {row["layer"] for row in result.layers} == {g.name for g, _ in records}


def _interface(graph):
    if isinstance(graph, torch.fx.GraphModule):
        return [(n.op, n.name, tuple(n.meta["val"].shape)) for n in graph.graph.nodes
                if n.op == "placeholder"]
    return [(v.name, v.shape, v.dtype) for v in (*graph.graph.inputs, *graph.graph.outputs)]


@pytest.mark.parametrize("ir_kind", ["fx", "onnx"])
def test_parameters_drop_by_the_expected_amount_and_interface_stays(h, models, ir_kind):
    model, x = models["attention"]
    graph = h.graph_of(model, x, ir_kind)
    interface, before = _interface(graph), measure(graph).params
    result = PruneChannels(ratio=0.5, round_to=8)(graph)
    # 2 of 4 heads (16 channels each: q, k, v rows + biases, o columns) and 48 of 96 neurons
    expected = 2 * 16 * (3 * (64 + 1) + 64) + 48 * (64 + 1 + 64)
    assert before - measure(graph).params == expected
    assert result.stats["params_before"] - result.stats["params_after"] == expected
    assert _interface(graph) == interface
    assert h.run_graph(graph, x).shape == (2, 5, 64)
    kinds = {row["kind"]: row for row in result.layers}
    assert kinds["heads"]["units_kept"] == 2 and kinds["ffn"]["kept"] == 48
    assert 0 < kinds["ffn"]["importance"] <= 1


def test_taylor_on_fx_and_its_loss(models):
    model, x = models["attention"]
    calls = []

    def loss(outputs, batch):
        calls.append(1)
        return outputs.pow(2).mean()

    gm = gp.capture(model, (x,))
    result = PruneChannels(ratio=0.25, importance="taylor", loss=loss)(gm, calibration=[(x,)] * 2)
    assert result.modified and len(calls) == 2
    for p in model.parameters():
        assert p.grad is None  # the caller's parameters get no gradients
    assert gm(x).shape == x.shape


def test_activation_keeps_the_channels_that_carry_signal():
    """Neurons that never fire (ReLU of a negative bias) score 0 under activation importance
    although their weights are the largest."""
    torch.manual_seed(0)
    model = MLP().eval()
    with torch.no_grad():
        model.fc1.weight[:20] *= 0.01
        model.fc1.weight[20:] *= 5
        model.fc1.bias[20:] = -1e3  # silent
    x = torch.randn(32, 12)
    gm = gp.capture(model, (x,))
    PruneChannels(ratio=0.5, importance="activation", scope="ffn", round_to=1)(
        gm, calibration=[(x,)])
    kept = gm.get_buffer("fc1_weight_prune")
    assert kept.shape[0] == 20
    assert torch.equal(kept, model.fc1.weight[:20])


def test_round_to_and_global_ranking(models):
    model, x = models["mlp"]
    gm = gp.capture(model, (x,))
    result = PruneChannels(ratio=0.5, round_to=8)(gm)
    assert {r["layer"]: r["kept"] for r in result.layers} == {"linear:out": 24, "linear_1:out": 16}
    gm = gp.capture(model, (x,))
    result = PruneChannels(ratio=0.3, round_to=1, global_ranking=True)(gm)
    assert result.stats["units_removed"] == round(0.3 * 64)


def test_importance_math():
    rng = np.random.default_rng(0)
    small = rng.normal(size=(4, 8)) * np.array([1, 2, 3, 4])[:, None]
    other = small[::-1].T  # per-unit norms reversed, units on axis 1
    scores = magnitude_scores([(small, 0, 0), (1000 * other, 1, 0)], 4, 1, p=1)
    np.testing.assert_allclose(scores, magnitude_scores([(small, 0, 0), (other, 1, 0)], 4, 1, 1))
    np.testing.assert_allclose(scores, scores[::-1])  # each tensor normalised: an equal say
    assert keep_count(10, 0.5, 8) == 8 and keep_count(3, 0.99, 1) == 1
    assert keep_count(12, 0.5, 8) == 8 and keep_count(12, 0.99, 8) == 1
    keeps = select_units([np.arange(5.0), np.ones(3)], 0.99)
    assert [len(k) for k in keeps] == [1, 1] and keeps[0].tolist() == [4]
    glob = select_units([np.array([1.0, 2, 3, 4]), np.array([1.0, 1, 1, 100])], 0.5,
                        global_ranking=True)
    # normalised: [.4, .8, 1.2, 1.6] and [.04, .04, .04, 3.9]: the four lowest go
    assert glob[0].tolist() == [1, 2, 3] and glob[1].tolist() == [3]
    ledger = IndexLedger()
    assert ledger.keep(("w", 0), 10, np.array([0, 1])).tolist() == list(range(2, 10))
    assert ledger.keep(("w", 0), 8, np.array([5])).tolist() == [0, 1, 2, 4, 5, 6, 7]
    stats = ChannelStats(axis=1)
    stats.update(np.array([[1.0, -2.0], [3.0, 0.0]]))
    np.testing.assert_allclose(stats.energy, [5.0, 2.0])
    stats.update_taylor(np.array([[1.0, -2.0]]), np.array([[-3.0, 0.5]]))
    np.testing.assert_allclose(stats.taylor, [3.0, 1.0])


@pytest.mark.parametrize("ir_kind", ["fx", "onnx"])
def test_hand_built_group_contract(h, models, ir_kind):
    """The shrinkers on a group built by hand: unit = 2 channels, offset 0, in/out/act uses."""
    model, x = models["mlp"]
    graph = h.graph_of(model, x, ir_kind)
    if ir_kind == "fx":
        uses = (ChannelUse("linear", "fc1.weight", 0, "out"), ChannelUse("linear", "fc1.bias", 0, "out"),
                ChannelUse("relu", "", -1, "act"), ChannelUse("linear_1", "fc2.weight", 1, "in"))
        shrinker = FxShrinker(graph, "prune-channels")
    else:
        gemms = [n for n in graph.graph if n.op_type == "Gemm"]
        uses = (ChannelUse(gemms[0].name, "fc1.weight", 0, "out"),
                ChannelUse(gemms[0].name, "fc1.bias", 0, "out"),
                ChannelUse(gemms[1].name, "fc2.weight", 1, "in"))
        shrinker = OnnxShrinker(graph, "prune-channels")
    group = ChannelGroup("hand", "ffn", 40, 2, uses, True)
    keep = np.arange(0, 20, 2)  # channels 0-1, 4-5, 8-9, ...
    shrinker.shrink(group, keep)
    shrinker.finish()
    verify(graph)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        mask = torch.ones(40)
        mask[[c for u in range(20) if u not in keep for c in (2 * u, 2 * u + 1)]] = 0
        ref.fc2.weight.mul_(mask)
        expected = ref(x).numpy()
    np.testing.assert_allclose(h.run_graph(graph, x), expected, rtol=1e-5, atol=1e-5)
    assert measure(graph).params < measure(h.graph_of(model, x, ir_kind)).params


def test_prune_then_fold_batchnorm_exports_smaller_onnx(h, models, tmp_path):
    model, x = models["cnn"]
    gm = gp.capture(model, (x,))
    full = to_onnx(gp.capture(model, (x,)), (x,))
    result = gp.optimize(gm, ["prune-channels:ratio=0.5,round_to=4", "fold-batchnorm"])
    assert result.report.records[1].stats["batchnorms_folded"] == 5
    small = to_onnx(result.graph, (x,))
    assert "BatchNormalization" not in h.onnx_ops(small)
    gp.export.save(small, tmp_path / "small.onnx")
    gp.export.save(full, tmp_path / "full.onnx")
    assert (tmp_path / "small.onnx").stat().st_size < 0.5 * (tmp_path / "full.onnx").stat().st_size
    with torch.no_grad():
        np.testing.assert_allclose(h.run_graph(small, x), result.graph(x).numpy(), rtol=1e-4,
                                   atol=1e-4)


def test_options_and_errors(models):
    spec = "prune-channels:ratio=0.25,importance=l2,scope=ffn,round_to=4,global_ranking=true"
    pass_ = from_spec(spec)
    assert (pass_.ratio, pass_.importance, pass_.scope, pass_.round_to, pass_.global_ranking) == (
        0.25, "l2", "ffn", 4, True)
    with pytest.raises(PassSpecError, match="ratio"):
        from_spec("prune-channels:ratio=1.5")
    model, x = models["mlp"]
    gm = gp.capture(model, (x,))
    with pytest.raises(PreconditionError, match="calibration"):
        PruneChannels(importance="activation")(gm)
    with pytest.raises(UnsupportedGraphError, match="taylor"):
        PruneChannels(importance="taylor")(to_onnx(gm, (x,)))
    code = gm.code
    assert not PruneChannels(ratio=0.0)(gm).modified and gm.code == code
    result = PruneChannels(exclude=("linear_1*",))(gm)
    assert [r["layer"] for r in result.layers] == ["linear:out"]
    assert not PruneChannels(scope="heads")(gp.capture(model, (x,))).modified


def test_caller_model_untouched_by_optimize(h, models):
    model, x = models["attention"]
    gm = gp.capture(model, (x,))
    snapshot = h.fx_snapshot(gm)
    result = gp.optimize(gm, ["prune-channels:ratio=0.5"])
    h.assert_fx_unchanged(gm, snapshot)
    assert result.graph(x).shape == x.shape


@pytest.mark.slow
def test_minilm_ffn_half_on_onnx(h, minilm):
    model, inputs = minilm
    graph = to_onnx(model, (), inputs)
    names = [v.name for v in graph.graph.outputs]
    feeds = {k: v.numpy() for k, v in inputs.items()}
    result = PruneChannels(ratio=0.5, scope="ffn")(graph)
    verify(graph)
    assert result.stats["groups_pruned"] == 6
    assert result.stats["params_before"] - result.stats["params_after"] == 6 * 768 * (2 * 384 + 1)
    assert [v.name for v in graph.graph.outputs] == names
    states = h.ort_outputs(graph, feeds)[0]
    assert states.shape == (*inputs["input_ids"].shape, 384) and np.isfinite(states).all()
