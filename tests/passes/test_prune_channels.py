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
    kept, hist = ledger.keep("w", 0, 10, np.array([0, 1]))
    assert kept.tolist() == list(range(2, 10))
    ledger.adopt("w.prune", hist)
    assert ledger.keep("w.prune", 0, 8, np.array([5]))[0].tolist() == [0, 1, 2, 4, 5, 6, 7]
    # the original constant read elsewhere (tied weights) is not shifted by w.prune's history
    assert ledger.keep("w", 0, 10, np.array([0, 5]))[0].tolist() == [1, 2, 3, 4, 6, 7, 8, 9]
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


class Tied(nn.Module):
    """One Linear pair called twice: both calls read the same weight constants."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.a, self.b, self.out = (nn.Linear(8, 16), nn.Linear(16, 32),
                                              nn.Linear(32, 16), nn.Linear(16, 4))

    def forward(self, x, drop=None):
        x = self.inp(x)
        for gone in drop or ((), ()):
            hidden = torch.relu(self.a(x))
            if gone:  # the reference: a removed channel reads as zero
                hidden = hidden * torch.from_numpy(~np.isin(np.arange(32), gone)).float()
            x = self.b(hidden)
        return self.out(x)


@pytest.mark.parametrize("ir_kind", ["fx", "onnx"])
def test_tied_weights_slice_each_call_from_the_original(h, ir_kind):
    """Two groups slicing one shared constant through different readers: the second group's
    indices are not shifted by the first's (overlapping removals used to raise, disjoint ones
    removed the wrong rows)."""
    model, x = Tied().eval(), torch.randn(3, 8)
    graph = h.graph_of(model, x, ir_kind)
    shrinker = (FxShrinker if ir_kind == "fx" else OnnxShrinker)(graph, "t")
    from graphpress.graph.channels import channel_groups

    hidden = [g for g in channel_groups(graph) if g.size == 32]
    assert len(hidden) == 2
    drops = ([0, 1], [1, 5])
    for group, gone in zip(hidden, drops):
        shrinker.shrink(group, np.setdiff1d(np.arange(32), gone))
    shrinker.finish()
    with torch.no_grad():
        ref = model(x, drops).numpy()
    np.testing.assert_allclose(h.run_graph(graph, x), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_normalized_shape_is_rescaled(affine):
    """FX aten.layer_norm's normalized_shape is a "shape" use and shrinks with the channels
    (it used to stay [32] and crash); the result is LayerNorm over the kept channels."""
    torch.manual_seed(0)
    a, ln, b = nn.Linear(8, 32), nn.LayerNorm(32, elementwise_affine=affine), nn.Linear(32, 4)
    model, x = nn.Sequential(a, ln, b).eval(), torch.randn(5, 8)
    gm = gp.capture(model, (x,))
    from graphpress.graph.channels import channel_groups

    group = next(g for g in channel_groups(gm) if g.size == 32)
    assert group.prunable and any(u.role == "shape" for u in group.uses)
    keep = np.arange(0, 32, 2)
    shrinker = FxShrinker(gm, "t")
    shrinker.shrink(group, keep)
    shrinker.finish()
    with torch.no_grad():
        k = torch.from_numpy(keep)
        hidden = nn.functional.linear(x, a.weight[k], a.bias[k])
        hidden = nn.functional.layer_norm(hidden, (16,), *((ln.weight[k], ln.bias[k])
                                                           if affine else (None, None)))
        ref = nn.functional.linear(hidden, b.weight[:, k], b.bias)
        np.testing.assert_allclose(gm(x).numpy(), ref.numpy(), rtol=1e-5, atol=1e-5)


def _onnx_model(nodes, x_shape, y_shape, inits, opset=17):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(np.asarray(a), n) for n, a in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=10)
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto, data_prop=True))


def test_onnx_concat_reshape_targets_are_no_groups_and_scale(h):
    """Reshape targets built as Concat(Shape-gather, constant): the constant piece is no
    producer (no placeholder group), the entry is recorded at the Reshape with its position in
    the full target, and pruning heads rewrites it (equals zeroing Wo's rows in ORT)."""
    from onnx import helper

    rng = np.random.default_rng(0)
    inits = {"Wq": rng.standard_normal((16, 16)).astype(np.float32),
             "Wo": rng.standard_normal((16, 16)).astype(np.float32),
             "hd": np.array([4, 4]), "dd": np.array([16]), "i0": np.array([0])}
    mk = helper.make_node
    nodes = [mk("MatMul", ["x", "Wq"], ["q"], name="mq"), mk("Shape", ["x"], ["sx"], name="shp"),
             mk("Gather", ["sx", "i0"], ["b"], name="g0", axis=0),
             mk("Concat", ["b", "hd"], ["t1"], name="c1", axis=0),
             mk("Reshape", ["q", "t1"], ["q4"], name="r1"), mk("Relu", ["q4"], ["q4r"], name="relu"),
             mk("Concat", ["b", "dd"], ["t2"], name="c2", axis=0),
             mk("Reshape", ["q4r", "t2"], ["q2"], name="r2"),
             mk("MatMul", ["q2", "Wo"], ["y"], name="mo")]
    model = _onnx_model(nodes, [2, 16], [2, 16], inits)
    from graphpress.graph.channels import channel_groups

    groups = channel_groups(model)
    assert [g.name for g in groups] == ["mq:heads", "mo:out"]
    shapes = {(u.node, u.axis) for u in groups[0].uses if u.role == "shape"}
    assert shapes == {("r1", 1), ("r2", 1)}
    x = rng.standard_normal((2, 16)).astype(np.float32)
    shrinker = OnnxShrinker(model, "t")
    shrinker.shrink(groups[0], np.array([0, 2]))
    shrinker.finish()
    masked = inits["Wo"].copy()
    masked[[4, 5, 6, 7, 12, 13, 14, 15]] = 0
    ref = np.maximum(x @ inits["Wq"], 0) @ masked
    np.testing.assert_allclose(h.ort_outputs(model, {"x": x})[0], ref, rtol=1e-4, atol=1e-4)


def test_onnx_expand_target_scales_and_legacy_split_blocks(h):
    """An Expand target entry is a shape use the ONNX shrinker rewrites like Reshape's; a
    Split whose sizes are the old attribute (opset 11) is blocked, not a crash."""
    from onnx import helper

    rng = np.random.default_rng(0)
    inits = {"W1": rng.standard_normal((8, 16)).astype(np.float32),
             "W2": rng.standard_normal((16, 4)).astype(np.float32),
             "tgt": np.array([3, 5, 16]), "ax": np.array([1])}
    mk = helper.make_node
    nodes = [mk("MatMul", ["x", "W1"], ["h"], name="m1"),
             mk("Unsqueeze", ["h", "ax"], ["hu"], name="u"),
             mk("Expand", ["hu", "tgt"], ["he"], name="ex"), mk("Relu", ["he"], ["hr"], name="r"),
             mk("MatMul", ["hr", "W2"], ["y"], name="m2")]
    model = _onnx_model(nodes, [3, 8], [3, 5, 4], inits)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    result = PruneChannels(ratio=0.5, round_to=1)(model)
    assert result.modified and result.stats["units_removed"] == 8
    kept = next(v for v in model.graph.initializers.values() if v.name.startswith("tgt"))
    assert kept.const_value.numpy().tolist() == [3, 5, 8]
    assert h.ort_outputs(model, {"x": x})[0].shape == (3, 5, 4)

    nodes = [mk("MatMul", ["x", "W1"], ["h"], name="m1"),
             mk("Split", ["h"], ["h0", "h1"], name="sp", axis=1, split=[6, 10]),
             mk("Concat", ["h1", "h0"], ["hc"], name="cat", axis=1),
             mk("MatMul", ["hc", "W2"], ["y"], name="m2")]
    legacy = _onnx_model(nodes, [3, 8], [3, 4], {k: inits[k] for k in ("W1", "W2")}, opset=11)
    from graphpress.graph.channels import channel_groups

    parts = [g for g in channel_groups(legacy) if g.name.startswith("m1:")]
    assert sorted(g.size for g in parts) == [6, 10]
    assert all(not g.prunable and "attribute" in g.reason for g in parts)
