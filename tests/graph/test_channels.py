"""graph.channel_groups: coupled channel groups on FX and ONNX, checked by actually slicing.

Every ONNX case prunes units of the prunable groups with a tiny slicer that follows the API
literally (remove ``[u*unit, (u+1)*unit) + offset`` along ``axis`` of each use's tensor,
scale ``"shape"`` entries by kept/size) and runs the result in ONNX Runtime. For groups whose
channels only feed products (FFN neurons, attention heads, conv channels) the pruned model
must equal the original with the consumers' input columns of the pruned channels zeroed.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from graphpress.export import to_onnx
from graphpress.graph import ChannelGroup, capture, channel_groups
from graphpress.graph.onnx import constant_array


# the slicer ---------------------------------------------------------------------------------
def _copy(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def apply_groups(model: ir.Model, plan: list[tuple[ChannelGroup, list[int]]], *,
                 zero_consumers: bool = False) -> ir.Model:
    """A copy of ``model`` with units ``plan[i][1]`` of group ``plan[i][0]`` removed, or (with
    ``zero_consumers``) the same shapes with the ``"in"`` uses of those channels zeroed."""
    model = _copy(model)
    nodes = {node.name: node for node in model.graph}
    axes: dict = defaultdict(lambda: defaultdict(set))
    entries: dict = defaultdict(dict)
    for group, units in plan:
        assert group.prunable, group
        removed = [c for u in units for c in range(u * group.unit, (u + 1) * group.unit)]
        kept = group.size - len(removed)
        for use in group.uses:
            if use.role == "stat":  # a marker: nothing stored to slice
                continue
            if use.role == "shape":
                node, tensor, pos = _stored_at(nodes, use)
                entries[node, tensor][pos] = (kept, group.size)
            elif use.role == "in" or not zero_consumers:
                axes[use.node, use.tensor][use.axis].update(use.offset + c for c in removed)
    for key in {*axes, *([] if zero_consumers else entries)}:
        node = nodes[key[0]]
        index = next(i for i, v in enumerate(node.inputs) if v is not None and v.name == key[1])
        array = _const(node.inputs[index])
        for axis, drop in axes.get(key, {}).items():
            if zero_consumers:
                array[(slice(None),) * axis + (sorted(drop),)] = 0
            else:
                array = np.delete(array, sorted(drop), axis=axis)
        for pos, (kept, size) in ({} if zero_consumers else entries.get(key, {})).items():
            array[pos] = array[pos] * kept // size
        value = ir.Value(name=f"{key[1]}.sliced.{key[0]}", const_value=ir.Tensor(array))
        model.graph.register_initializer(value)
        node.replace_input_with(index, value)
    if not zero_consumers:  # intermediate shapes are stale: let ORT infer them
        for node in model.graph:
            for value in node.outputs:
                if not value.is_graph_output():
                    value.shape = None
    return model


def _stored_at(nodes: dict, use) -> tuple[str, str, int]:
    """(node, constant, position) holding a shape entry: a Reshape target built by a Concat
    is recorded at its full-target position; the number lives in one constant piece."""
    value = next(v for v in nodes[use.node].inputs if v is not None and v.name == use.tensor)
    concat = value.producer()
    if constant_array(value) is not None or concat is None or concat.op_type != "Concat":
        return use.node, use.tensor, use.axis
    start = 0
    for piece in concat.inputs:
        length = len(ints) if (ints := constant_array(piece)) is not None else piece.shape[0]
        if start <= use.axis < start + length:
            return concat.name, piece.name, use.axis - start
        start += length
    raise AssertionError(f"no entry {use.axis} in the target of {use.node}")


def _const(value: ir.Value) -> np.ndarray:
    """An initializer or ``Constant`` output (``value`` or ``value_ints``/``value_floats``)."""
    array = constant_array(value)
    if array is None:
        attrs = value.producer().attributes
        array = next(np.asarray(attrs[k].value) for k in ("value_ints", "value_floats",
                                                           "value_int", "value_float") if k in attrs)
    return np.array(array, copy=True)


def run(model: ir.Model, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    data = ir.serde.serialize_model(model).SerializeToString()
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return session.run(None, {k: np.asarray(v) for k, v in feeds.items()})


def check_exact(model: ir.Model, feeds: dict, plan, atol: float = 1e-4) -> None:
    """Pruned model == original with the pruned channels' consumer inputs zeroed."""
    pruned = run(apply_groups(model, plan), feeds)
    reference = run(apply_groups(model, plan, zero_consumers=True), feeds)
    original = run(model, feeds)
    for p, r, o in zip(pruned, reference, original):
        assert p.shape == o.shape
        np.testing.assert_allclose(p, r, atol=atol, rtol=1e-4)
    assert any(not np.allclose(r, o) for r, o in zip(reference, original))  # pruning mattered


def half(group: ChannelGroup) -> list[int]:
    return list(range(0, group.size // group.unit, 2))


def signature(groups) -> list[tuple]:
    """What FX and ONNX must agree on (names, layouts and bias placement differ)."""
    return sorted((g.kind, g.size, g.unit, g.prunable, sum(u.role == "in" for u in g.uses))
                  for g in groups)


def both(model: nn.Module, args: tuple, **kw):
    model = model.eval()
    return channel_groups(capture(model, args)), to_onnx(model, args, **kw)


# an MLP ---------------------------------------------------------------------------------------
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.GELU(),
                         nn.Linear(12, 4))


def test_mlp_groups_fx_and_onnx():
    x = torch.randn(3, 8)
    fx_groups, onnx_model = both(_mlp(), (x,))
    assert [(g.name, g.kind, g.size, g.unit, g.prunable) for g in fx_groups] == [
        ("linear:out", "ffn", 16, 1, True), ("linear_1:out", "ffn", 12, 1, True),
        ("linear_2:out", "linear", 4, 1, False)]
    assert {(u.node, u.tensor, u.axis, u.role) for u in fx_groups[0].uses} == {
        ("linear", "0.weight", 0, "out"), ("linear", "0.bias", 0, "out"),
        ("linear_1", "2.weight", 1, "in")}
    assert "graph output" in fx_groups[2].reason
    groups = channel_groups(onnx_model)
    assert signature(groups) == signature(fx_groups)
    check_exact(onnx_model, _feeds(onnx_model, x),
                [(g, half(g)) for g in groups if g.prunable])


def _feeds(model: ir.Model, *arrays) -> dict:
    return {v.name: np.asarray(a) for v, a in zip(model.graph.inputs, arrays)}


def test_analysis_is_read_only_and_deterministic():
    onnx_model = to_onnx(_mlp().eval(), (torch.randn(3, 8),))
    before = ir.serde.serialize_model(onnx_model).SerializeToString()
    assert channel_groups(onnx_model) == channel_groups(onnx_model)
    assert ir.serde.serialize_model(onnx_model).SerializeToString() == before


# a CNN with BatchNorm and residual blocks ------------------------------------------------------
class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class _ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(_Block(8), _Block(8))
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16),
                                  nn.ReLU())
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.down(self.blocks(self.stem(x)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = _ResNet()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 2)
                m.bias.uniform_(-1, 1)
    x = torch.randn(2, 1, 8, 8)
    return model.eval(), x


def test_resnet_groups(resnet):
    model, x = resnet
    fx_groups, _ = both(model, (x,), optimize=False)
    kinds = [(g.kind, g.size, g.prunable) for g in fx_groups]
    assert kinds == [("residual", 8, True), ("conv", 8, True), ("conv", 8, True),
                     ("conv", 16, True), ("linear", 10, False)]
    stream = fx_groups[0]  # stem, both blocks' conv2 + bn2, every reader of the stream
    assert Counter(u.role for u in stream.uses) == {"out": 4, "norm": 12, "in": 3}
    bn = {u.tensor for u in fx_groups[1].uses if u.role == "norm"}
    assert bn == {f"blocks.0.bn1.{k}" for k in ("weight", "bias", "running_mean", "running_var")}


def test_resnet_onnx_slices_exactly(resnet):
    model, x = resnet
    fx_groups, onnx_model = both(model, (x,))  # the exporter folds BatchNorm into Conv
    groups = channel_groups(onnx_model)
    assert signature(groups) == signature(fx_groups)
    feeds = _feeds(onnx_model, x)
    check_exact(onnx_model, feeds, [(g, half(g)) for g in groups if g.kind == "conv"])
    stream = next(g for g in groups if g.kind == "residual")
    pruned = run(apply_groups(onnx_model, [(stream, [1, 5, 6])]), feeds)
    assert pruned[0].shape == (2, 10) and np.isfinite(pruned[0]).all()


def test_unfolded_export_is_conservative(resnet):
    """Without the optimizer a conv bias is computed (Expand of Shape(weight)) with no static
    shape: those conv channels cannot be proven to follow, so they are not prunable."""
    model, x = resnet
    groups = channel_groups(to_onnx(model, (x,), optimize=False))
    blocked = [g for g in groups if not g.prunable and g.kind in ("conv", "residual")]
    assert len(blocked) == 3 and all("unknown" in g.reason for g in blocked)


def _onnx(nodes, inputs, outputs, inits) -> ir.Model:
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        [numpy_helper.from_array(np.asarray(a), n) for n, a in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    import onnx

    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))


def test_onnx_batchnorm_residual_block():
    """Conv → BatchNormalization → Relu → Conv → BatchNormalization, + input, Relu, GAP, Gemm."""
    from onnx import helper

    rng = np.random.default_rng(0)
    f = np.float32
    inits = {"w0": rng.normal(size=(8, 3, 3, 3)).astype(f), "b0": rng.normal(size=8).astype(f),
             "w1": rng.normal(size=(6, 8, 3, 3)).astype(f), "w2": rng.normal(size=(8, 6, 3, 3))
             .astype(f), "fc": rng.normal(size=(8, 5)).astype(f)}
    for k, c in (("1", 6), ("2", 8)):
        inits |= {f"s{k}": rng.uniform(0.5, 2, c).astype(f), f"t{k}": rng.normal(size=c).astype(f),
                  f"m{k}": rng.normal(size=c).astype(f), f"v{k}": rng.uniform(0.5, 2, c).astype(f)}
    pad = {"pads": [1, 1, 1, 1]}
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="stem", **pad),
             helper.make_node("Conv", ["c0", "w1"], ["c1"], name="conv1", **pad),
             helper.make_node("BatchNormalization", ["c1", "s1", "t1", "m1", "v1"], ["n1"], name="bn1"),
             helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", **pad),
             helper.make_node("BatchNormalization", ["c2", "s2", "t2", "m2", "v2"], ["n2"], name="bn2"),
             helper.make_node("Add", ["n2", "c0"], ["a"], name="add"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["flat"], name="flatten"),
             helper.make_node("MatMul", ["flat", "fc"], ["y"], name="fc")]
    model = _onnx(nodes, [("x", [2, 3, 6, 6])], [("y", [2, 5])], inits)
    groups = {g.name: g for g in channel_groups(model)}
    assert {n: (g.kind, g.size, g.prunable) for n, g in groups.items()} == {
        "stem:out": ("residual", 8, True), "conv1:out": ("conv", 6, True),
        "fc:out": ("linear", 5, False)}
    assert {(u.node, u.tensor, u.axis, u.role) for u in groups["stem:out"].uses} == {
        ("stem", "w0", 0, "out"), ("stem", "b0", 0, "out"), ("conv1", "w1", 1, "in"),
        ("conv2", "w2", 0, "out"), ("fc", "fc", 0, "in")} | {
        ("bn2", t, 0, "norm") for t in ("s2", "t2", "m2", "v2")}
    feeds = {"x": rng.normal(size=(2, 3, 6, 6)).astype(f)}
    check_exact(model, feeds, [(groups["conv1:out"], [0, 3, 4])])
    both_pruned = apply_groups(model, [(groups["conv1:out"], [1]), (groups["stem:out"], [2, 7])])
    assert run(both_pruned, feeds)[0].shape == (2, 5)


# a MiniLM-style transformer block (manual attention) -------------------------------------------
class _Layer(nn.Module):
    def __init__(self, d: int = 32, heads: int = 4, ff: int = 64, sdpa: bool = False) -> None:
        super().__init__()
        self.heads, self.sdpa = heads, sdpa
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ff1, self.ff2 = nn.Linear(d, ff), nn.Linear(ff, d)

    def forward(self, x):
        b, s, d = x.shape

        def split(t):
            return t.view(b, s, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        if self.sdpa:
            ctx = F.scaled_dot_product_attention(q, k, v)
        else:
            ctx = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1) @ v
        x = self.ln1(x + self.o(ctx.transpose(1, 2).reshape(b, s, d)))
        return self.ln2(x + self.ff2(F.gelu(self.ff1(x))))


def test_transformer_block_heads_ffn_residual():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 32)
    fx_groups, onnx_model = both(_Layer(), (x,))
    by_kind = {g.kind: g for g in fx_groups}
    assert sorted(by_kind) == ["ffn", "heads", "residual"] and len(fx_groups) == 3
    heads = by_kind["heads"]
    assert (heads.size, heads.unit, heads.prunable) == (32, 8, True)
    assert {(u.tensor, u.role) for u in heads.uses if u.role != "shape"} == {
        (f"{p}.{t}", "out") for p in "qkv" for t in ("weight", "bias")} | {("o.weight", "in")}
    assert (by_kind["ffn"].size, by_kind["ffn"].prunable) == (64, True)
    assert not by_kind["residual"].prunable and "graph input" in by_kind["residual"].reason
    groups = channel_groups(onnx_model)
    assert signature(groups) == signature(fx_groups)
    plan = [(g, [0, 2]) for g in groups if g.prunable]
    check_exact(onnx_model, _feeds(onnx_model, x), plan)


# the real all-MiniLM-L6-v2 ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm_graphs(minilm):
    model, inputs = minilm
    gm = capture(model, (), inputs)
    return gm, to_onnx(gm, (), inputs), inputs


def _check_minilm(groups) -> None:
    ffn = [g for g in groups if g.kind == "ffn"]
    heads = [g for g in groups if g.kind == "heads"]
    assert [(g.size, g.unit, g.prunable) for g in ffn] == [(1536, 1, True)] * 6
    assert [(g.size // g.unit, g.unit, g.prunable) for g in heads] == [(12, 32, True)] * 6
    assert all(Counter(u.role for u in g.uses if u.role != "shape") == {"out": 6, "in": 1}
               for g in heads)  # q, k, v weight rows and biases; the output projection
    stream = [g for g in groups if g.kind == "residual"]
    assert len(stream) == 1 and not stream[0].prunable
    assert "graph output" in stream[0].reason
    assert sum(u.role == "norm" for u in stream[0].uses) == 2 * 13  # every LayerNorm


def test_minilm_fx_groups(minilm_graphs):
    _check_minilm(channel_groups(minilm_graphs[0]))


def test_minilm_onnx_groups_slice_exactly(minilm_graphs):
    gm, onnx_model, inputs = minilm_graphs
    groups = channel_groups(onnx_model)
    _check_minilm(groups)
    assert signature(groups) == signature(channel_groups(gm))
    heads = [g for g in groups if g.kind == "heads"]
    ffn = [g for g in groups if g.kind == "ffn"]
    plan = [(heads[0], [0, 5, 11]), (heads[3], list(range(6)))] + [
        (g, list(range(k, 1536, 4))) for k, g in enumerate(ffn)]
    feeds = {k: v.numpy() for k, v in inputs.items()}
    check_exact(onnx_model, feeds, plan)


# concat and split --------------------------------------------------------------------------------
class _CatSplit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 6), nn.Linear(8, 10), nn.Linear(16, 4)
        self.fused, self.d, self.e = nn.Linear(8, 18), nn.Linear(6, 4), nn.Linear(12, 4)
        self.f, self.g, self.h, self.i = nn.Linear(8, 5), nn.Linear(8, 7), nn.Linear(5, 4), \
            nn.Linear(7, 4)

    def forward(self, x):
        y1 = self.c(torch.relu(torch.cat([self.a(x), self.b(x)], -1)))  # concat: offsets
        p, q = torch.split(self.fused(x), [6, 12], dim=-1)  # split of a fused producer
        y2 = self.d(torch.relu(p)) + self.e(torch.sigmoid(q))
        f, g = torch.split(torch.cat([self.f(x), self.g(x)], -1), [5, 7], -1)  # cat → split
        return y1 + y2 + self.h(f) + self.i(torch.tanh(g))


def test_concat_split_offsets_fx_and_onnx():
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    fx_groups, onnx_model = both(_CatSplit(), (x,))
    prunable = {(g.size, tuple(sorted((u.tensor, u.role, u.offset) for u in g.uses
                                      if u.role != "shape"))) for g in fx_groups if g.prunable}
    assert prunable == {
        (6, (("a.bias", "out", 0), ("a.weight", "out", 0), ("c.weight", "in", 0))),
        (10, (("b.bias", "out", 0), ("b.weight", "out", 0), ("c.weight", "in", 6))),
        (6, (("d.weight", "in", 0), ("fused.bias", "out", 0), ("fused.weight", "out", 0))),
        (12, (("e.weight", "in", 0), ("fused.bias", "out", 6), ("fused.weight", "out", 6))),
        (5, (("f.bias", "out", 0), ("f.weight", "out", 0), ("h.weight", "in", 0))),
        (7, (("g.bias", "out", 0), ("g.weight", "out", 0), ("i.weight", "in", 0)))}
    split_sizes = [u for g in fx_groups for u in g.uses if u.role == "shape"]
    assert len(split_sizes) == 4 and all(u.tensor == "" for u in split_sizes)  # FX size lists
    groups = channel_groups(onnx_model)
    assert signature(groups) == signature(fx_groups)
    check_exact(onnx_model, _feeds(onnx_model, x), [(g, [1, 2]) for g in groups if g.prunable])


class _Chunk(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fused, self.d, self.e = nn.Linear(8, 12), nn.Linear(6, 4), nn.Linear(6, 4)
        self.w = nn.Linear(8, 6)

    def forward(self, x):
        p, q = self.fused(x).chunk(2, dim=-1)  # equal parts: sizes cannot follow one part
        h = self.w(x)
        return self.d(p) + self.e(q) + self.d(h[:, :6] * 2), h[:, 2:].sum(-1)


def test_equal_chunks_and_partial_slices_are_not_prunable():
    torch.manual_seed(0)
    fx_groups, onnx_model = both(_Chunk(), (torch.randn(3, 8),))
    for groups in (fx_groups, channel_groups(onnx_model)):
        assert [g.prunable for g in groups] == [False] * 4
        assert sum("equal parts" in g.reason for g in groups) == 2
        assert sum("sliced at constant offsets" in g.reason for g in groups) == 1
        assert {g.size for g in groups if "sliced" in g.reason} == {6}  # the whole producer


# LLaMA-style decoder: GQA and SwiGLU ---------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_graphs(llama_model):
    model, inputs = llama_model
    gm = capture(model, (), inputs)
    return gm, to_onnx(gm, (), inputs), inputs


def test_llama_gqa_heads_and_swiglu(llama_graphs):
    gm, onnx_model, inputs = llama_graphs
    fx_groups, groups = channel_groups(gm), channel_groups(onnx_model)
    assert signature(groups) == signature(fx_groups)
    for gs in (fx_groups, groups):
        ffn = [g for g in gs if g.kind == "ffn"]
        assert [(g.size, g.prunable) for g in ffn] == [(128, True)] * 2
        assert all(Counter(u.role for u in g.uses) == {"out": 2, "in": 1} for g in ffn)  # gate+up
        heads = [g for g in gs if g.kind == "heads"]
        assert len(heads) == 2 and not any(g.prunable for g in heads)
        assert all("grouped-query attention: 2 query heads" in g.reason for g in heads)
        # the kv heads are grouped with their query heads: q, k, v rows and o's input columns
        assert all(Counter(u.role for u in g.uses if u.role != "shape") == {"out": 3, "in": 1}
                   for g in heads)
        stream = next(g for g in gs if g.kind == "residual")  # logits are vocab-sized: the
        assert stream.prunable and stream.size == 64          # hidden stream may shrink
    feeds = {"input_ids": inputs["input_ids"].numpy()}
    ffn = [g for g in groups if g.kind == "ffn"]
    check_exact(onnx_model, feeds, [(g, list(range(0, 128, 3))) for g in ffn])
    stream = next(g for g in groups if g.kind == "residual")
    logits = run(apply_groups(onnx_model, [(stream, list(range(0, 64, 4)))]), feeds)[0]
    assert logits.shape == (2, 12, 256) and np.isfinite(logits).all()


# what is never guessed ------------------------------------------------------------------------------
def _hidden(op_nodes, hidden="h", extra_inits=None):
    """x → MatMul(w1) → h → <op_nodes> → MatMul(w2) → y."""
    from onnx import helper

    rng = np.random.default_rng(0)
    inits = {"w1": rng.normal(size=(4, 6)).astype(np.float32),
             "w2": rng.normal(size=(6, 3)).astype(np.float32), **(extra_inits or {})}
    nodes = [helper.make_node("MatMul", ["x", "w1"], [hidden], name="fc1"), *op_nodes,
             helper.make_node("MatMul", ["z", "w2"], ["y"], name="fc2")]
    return channel_groups(_onnx(nodes, [("x", [2, 4])], [("y", [2, 3])], inits))[0]


def test_unknown_ops_reductions_and_indexing_block():
    from onnx import helper

    ok = _hidden([helper.make_node("Mul", ["h", "scale"], ["z"], name="scale")],
                 extra_inits={"scale": np.ones(6, np.float32)})
    assert ok.prunable and ("scale", "scale", 0, "act") in {
        (u.node, u.tensor, u.axis, u.role) for u in ok.uses}
    unknown = _hidden([helper.make_node("Hardmax", ["h"], ["z"], name="odd")])
    assert not unknown.prunable and "no channel rule for Hardmax (odd)" in unknown.reason
    softmax = _hidden([helper.make_node("Softmax", ["h"], ["z"], name="sm", axis=-1)])
    assert not softmax.prunable and "normalised over" in softmax.reason
    reduced = _hidden([helper.make_node("ReduceSum", ["h", "ax"], ["s"], name="sum", keepdims=1),
                       helper.make_node("Add", ["h", "s"], ["z"], name="add")],
                      extra_inits={"ax": np.array([1], np.int64)})
    assert not reduced.prunable and "reduced by ReduceSum" in reduced.reason
    gathered = _hidden([helper.make_node("Gather", ["h", "idx"], ["g"], name="pick", axis=1),
                        helper.make_node("Mul", ["h", "g"], ["z"], name="mul")],
                       extra_inits={"idx": np.array([0, 2, 1, 3, 5, 4], np.int64)})
    assert not gathered.prunable and "indexed along the channel axis" in gathered.reason
    then = helper.make_graph([helper.make_node("Relu", ["h"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", 1, [2, 6])])
    other = helper.make_graph([helper.make_node("Neg", ["h"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", 1, [2, 6])])
    branch = helper.make_node("If", ["c"], ["z"], name="branch", then_branch=then, else_branch=other)
    model = _onnx([helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), branch,
                   helper.make_node("MatMul", ["z", "w2"], ["y"], name="fc2")],
                  [("x", [2, 4])], [("y", [2, 3])],
                  {"w1": np.ones((4, 6), np.float32), "w2": np.ones((6, 3), np.float32)})
    model.graph.inputs.append(ir.Value(name="c", type=ir.TensorType(ir.DataType.BOOL),
                                       shape=ir.Shape([])))
    inside = channel_groups(model)[0]  # h is read inside the If branches
    assert not inside.prunable and "no channel rule for If (branch)" in inside.reason


class _Separable(nn.Module):
    """Depthwise-separable convs (MobileNet-style) and a GroupNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, 12, 1)
        self.depthwise = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.project = nn.Conv2d(12, 8, 1)
        self.norm = nn.GroupNorm(2, 8)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = F.relu6(self.depthwise(F.relu6(self.expand(x))))
        return self.out(self.norm(self.project(h)))


def test_depthwise_conv_couples_and_groupnorm_blocks():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    fx_groups, onnx_model = both(_Separable(), (x,))
    groups = channel_groups(onnx_model)
    assert signature(groups) == signature(fx_groups)
    for gs in (fx_groups, groups):
        expand, project, out = gs  # the depthwise conv couples its input and output channels
        assert (expand.kind, expand.size, expand.prunable) == ("conv", 12, False)
        assert Counter(u.role for u in expand.uses) == {"out": 4, "in": 1}  # + depthwise w, b
        assert "group count" in expand.reason
        assert not project.prunable  # GroupNorm (ONNX: decomposed over a [2, 4·h·w] reshape)
        assert "whole groups" in project.reason or "GroupNorm" in project.reason
        assert not out.prunable


def test_fx_dynamic_batch_gives_the_same_groups():
    torch.manual_seed(0)
    model, x = _Layer().eval(), torch.randn(2, 5, 32)
    batch = torch.export.Dim("batch", max=16)
    dynamic = capture(model, (x,), dynamic_shapes=({0: batch},))
    assert signature(channel_groups(dynamic)) == signature(channel_groups(capture(model, (x,))))


def test_rejects_what_it_cannot_read():
    from graphpress.graph import UnsupportedGraphError

    with pytest.raises(UnsupportedGraphError, match="graphpress.graph.capture"):
        channel_groups(torch.fx.symbolic_trace(_mlp()))
    with pytest.raises(UnsupportedGraphError):
        channel_groups(_mlp())


def test_onnx_dynamic_shapes_follow_run_time_reshapes():
    """A dynamic export computes reshape targets from Shape/Slice/Concat at run time and
    leaves the axes after them unknown; the entries that read a head axis couple it."""
    torch.manual_seed(0)
    model, x = _Layer(sdpa=True).eval(), torch.randn(2, 5, 32)
    dims = ({0: torch.export.Dim("batch", max=16), 1: torch.export.Dim("seq", max=64)},)
    onnx_model = to_onnx(model, (x,), dynamic_shapes=dims)
    unknown = [v for n in onnx_model.graph for v in n.outputs
               if v.shape is None or any(not isinstance(d, int) and d.value is None for d in v.shape)]
    assert unknown  # the decomposed attention merges batch and heads into one unknown axis
    groups = channel_groups(onnx_model)
    assert signature(groups) == signature(channel_groups(capture(model, (x,))))
    bigger = torch.randn(3, 7, 32)
    check_exact(onnx_model, _feeds(onnx_model, bigger), [(g, [1, 3]) for g in groups if g.prunable])


def test_computed_linear_weight_blocks_instead_of_crashing():
    """F.linear(x, w * g) (weight norm): the weight is no constant, so its input and output
    spaces are blocked (this used to raise AttributeError)."""

    class WeightNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w, self.g = nn.Parameter(torch.randn(16, 8)), nn.Parameter(torch.ones(16, 1))
            self.a, self.b = nn.Linear(8, 8), nn.Linear(16, 4)

        def forward(self, x):
            return self.b(F.linear(self.a(x), self.w * self.g))

    groups = {g.name: g for g in channel_groups(capture(WeightNorm().eval(), (torch.randn(3, 8),)))}
    assert not groups["linear:out"].prunable  # a's output feeds the computed-weight linear
    assert "the weight is not a constant" in groups["linear:out"].reason
    assert all(not g.prunable for g in groups.values())


def test_onnx_model_saved_without_shapes_is_analysed_after_inference():
    """A hand-built model records no intermediate shapes: the analysis infers them (on a
    copy) and finds the same groups as with shapes; the model keeps its missing shapes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    import graphpress as gp

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (8, 16)), ("w2", (16, 4)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["a"], name="act"),
             helper.make_node("MatMul", ["a", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])],
                              inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    bare, inferred = gp.load(proto), gp.load(onnx.shape_inference.infer_shapes(proto))
    groups = [(g.kind, g.size, g.prunable) for g in channel_groups(bare)]
    assert groups == [(g.kind, g.size, g.prunable) for g in channel_groups(inferred)]
    assert ("ffn", 16, True) in groups  # fc1's neurons, read by fc2
    hidden = next(node.outputs[0] for node in bare.graph if node.name == "fc1")
    assert hidden.shape is None
