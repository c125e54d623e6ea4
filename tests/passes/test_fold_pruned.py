"""fold-pruned on FX and ONNX: structurally zero channels, neurons and heads go and the outputs
stay those of the unpruned model (eager / ORT): zero producer rows with zero and non-zero
biases (constants folded into the consumer bias, a new bias or Add where there was none),
dead consumer columns, torch.nn.utils.prune masks (ln_structured) on an MLP and a CNN with
batch norms, residual blocks and padded convolutions (ones-channel map, exact at any size),
heads with a zero value or output projection (a zero query is no dead head), concat/split;
100% of the structurally zero prunable units are removed; no-op; fold-batchnorm afterwards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

import graphpress as gp
from graphpress.export import to_onnx
from graphpress.graph import measure, verify
from graphpress.graph.analysis import op_name
from graphpress.graph.channels import channel_groups
from graphpress.passes.prune import FoldPruned
from graphpress.passes.prune._shrink_fx import FxShrinker
from graphpress.passes.prune._shrink_onnx import OnnxShrinker


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(10, 32), nn.Linear(32, 24), nn.Linear(24, 3)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.sigmoid(self.fc1(x)))))


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c1, self.b1 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.c3 = nn.Conv2d(16, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))
        return self.head(torch.relu(self.c3(x)).mean((2, 3)))


class Attention(nn.Module):
    def __init__(self, d: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.ln = nn.LayerNorm(d)
        self.f1, self.f2 = nn.Linear(d, 96), nn.Linear(96, d)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = (p(x).view(b, s, self.heads, d // self.heads).transpose(1, 2)
                   for p in (self.q, self.k, self.v))
        a = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d)
        x = self.ln(x + self.o(a))
        return x + self.f2(nn.functional.gelu(self.f1(x)))


class CatSplit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(8, 24), nn.Linear(40, 32)
        self.d, self.e = nn.Linear(16, 4), nn.Linear(16, 4)

    def forward(self, x):
        h = torch.cat([torch.relu(self.a(x)), torch.tanh(self.b(x))], -1)
        u, v = torch.split(torch.relu(self.c(h)), [16, 16], -1)
        return self.d(u) + self.e(v)


def _zero_units_left(graph) -> int:
    """Units of prunable, channel-local groups whose consumer (or, outside heads, producer)
    weight slices are all zero: what fold-pruned must leave none of."""
    shrinker = (FxShrinker if isinstance(graph, torch.fx.GraphModule) else OnnxShrinker)(
        graph, "test")
    left = 0
    for group in channel_groups(graph):
        if not group.prunable or any("norm" in op_name(shrinker.node(u.node)).lower()
                                     and "batch" not in op_name(shrinker.node(u.node)).lower()
                                     for u in group.uses):
            continue
        units = group.size // group.unit
        for role in ("in", "out") if group.kind != "heads" else ("in",):
            zero = np.ones(units, bool)
            seen = False
            for use in (u for u in group.uses if u.role == role):
                array = shrinker.array(use)
                if array is None or array.ndim < 2:
                    continue
                seen = True
                view = np.moveaxis(array, use.axis % array.ndim, 0)
                view = view[use.offset: use.offset + group.size].reshape(units, -1)
                zero &= ~np.any(view != 0, axis=1)
            left += int(zero.sum()) if seen and units > 1 else 0
    return left


@pytest.mark.parametrize("ir_kind", ["fx", "onnx"])
def test_mlp_zero_rows_and_columns_fold_exactly(h, ir_kind):
    torch.manual_seed(0)
    model = MLP().eval()
    with torch.no_grad():
        model.fc1.weight[0:6] = 0  # sigmoid(b) ≠ 0: folded into fc2's bias
        model.fc1.bias[0:2] = 0  # sigmoid(0) = 0.5, still a constant
        model.fc2.weight[:, 20:23] = 0  # dead neurons of fc1
        model.fc2.weight[3:7] = 0
        model.fc2.bias[3:5] = -1.0  # relu(-1) = 0: removed without folding
        model.fc3.weight[:, 10] = 0
    x = torch.randn(7, 10)
    graph = h.graph_of(model, x, ir_kind)
    expected = model(x).detach().numpy()
    before = measure(graph).params
    result = FoldPruned()(graph)
    verify(graph)
    np.testing.assert_allclose(h.run_graph(graph, x), expected, rtol=1e-5, atol=1e-6)
    rows = {r["layer"]: r for r in result.layers}
    assert sorted(r["size"] - r["kept"] for r in rows.values()) == [5, 9]
    assert result.stats["units_removed"] == 14 and result.stats["biases_folded"] == 2
    # fc1: 9 neurons of 10 weights + bias + 24 fc2 inputs; fc2: 5 of 23 + 1 + 3 fc3 inputs
    assert before - measure(graph).params == 9 * (10 + 1 + 24) + 5 * (23 + 1 + 3)
    assert _zero_units_left(graph) == 0
    assert not FoldPruned()(graph).modified  # nothing left to fold


class BiasLess(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(10, 32), nn.Linear(32, 24, bias=False)
        self.fc3 = nn.Linear(24, 3)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.sigmoid(self.fc1(x)))))


@pytest.mark.parametrize("ir_kind", ["fx", "onnx"])
def test_new_bias_of_a_consumer_whose_outputs_also_go(h, ir_kind):
    """fc2 has no bias: folding fc1's constant neurons gives it one, while fc2's zero rows
    go in the same call; the new bias must lose those rows too."""
    torch.manual_seed(0)
    model = BiasLess().eval()
    with torch.no_grad():
        model.fc1.weight[0:4] = 0  # constant sigmoid(b): folded into a new fc2 bias
        model.fc2.weight[5:8] = 0  # zero rows: tanh(0 + folded bias) is a constant
    x = torch.randn(7, 10)
    graph = h.graph_of(model, x, ir_kind)
    expected = model(x).detach().numpy()
    result = FoldPruned()(graph)
    verify(graph)
    assert result.stats["units_removed"] == 7 and result.stats["biases_folded"] == 2
    np.testing.assert_allclose(h.run_graph(graph, x), expected, rtol=1e-5, atol=1e-6)


def _ln_pruned_mlp():
    torch.manual_seed(1)
    model = MLP().eval()
    torch_prune.ln_structured(model.fc1, "weight", amount=0.5, n=1, dim=0)
    torch_prune.ln_structured(model.fc3, "weight", amount=0.25, n=2, dim=1)
    return model, torch.randn(5, 10)


def _ln_pruned_cnn(h):
    torch.manual_seed(2)
    model = h.randomize_bn(CNN())
    torch_prune.ln_structured(model.stem, "weight", amount=0.25, n=1, dim=0)
    torch_prune.ln_structured(model.c1, "weight", amount=0.5, n=1, dim=0)
    torch_prune.ln_structured(model.c3, "weight", amount=0.25, n=1, dim=1)
    return model.eval(), torch.randn(2, 3, 8, 8)


@pytest.mark.parametrize("ir_kind", ["fx", "onnx"])
@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_torch_prune_masks_are_removed_exactly(h, ir_kind, which):
    model, x = _ln_pruned_mlp() if which == "mlp" else _ln_pruned_cnn(h)
    with torch.no_grad():
        expected = model(x).numpy()
    graph = h.graph_of(model, x, ir_kind)
    before = measure(graph).params
    result = FoldPruned()(graph)
    verify(graph)
    np.testing.assert_allclose(h.run_graph(graph, x), expected, rtol=1e-4, atol=1e-5)
    assert result.modified and measure(graph).params < before
    assert _zero_units_left(graph) == 0
    if ir_kind == "fx":
        assert result.stats["weights_materialized"] == 2 if which == "mlp" else 3
        assert not any(n.target.endswith(("_orig", "_mask")) for n in graph.graph.nodes
                       if n.op == "get_attr")
    if which == "cnn":  # stem's zero channels reach padded convolutions as BN constants
        assert result.stats["maps_folded"] >= 1


def test_padded_convolution_map_is_exact_at_any_size(h):
    model, x = _ln_pruned_cnn(h)
    size = torch.export.Dim("size", min=4, max=64)
    gm = gp.capture(model, (x,), dynamic_shapes={"x": {2: size, 3: size}})
    graph = to_onnx(gm, (x,), dynamic_shapes={"x": {2: size, 3: size}})
    FoldPruned()(graph)
    for shape in ((2, 3, 5, 5), (2, 3, 12, 12)):
        other = torch.randn(*shape)
        with torch.no_grad():
            np.testing.assert_allclose(h.run_graph(graph, other), model(other).numpy(), rtol=1e-4,
                                       atol=1e-5)


@pytest.mark.parametrize("ir_kind", ["fx", "onnx"])
def test_heads_with_zero_value_or_output_projection(h, ir_kind):
    torch.manual_seed(3)
    model = Attention().eval()
    with torch.no_grad():
        model.v.weight[16:32] = 0  # head 1 outputs its value bias: folded into o's bias
        model.o.weight[:, 32:48] = 0  # head 2 is never read
        model.q.weight[48:64] = 0  # head 3: uniform attention still averages v: stays
        model.q.bias[48:64] = 0
        model.f1.weight[:10] = 0
        model.f2.weight[:, 90:] = 0
    x = torch.randn(2, 6, 64)
    expected = model(x).detach().numpy()
    graph = h.graph_of(model, x, ir_kind)
    result = FoldPruned()(graph)
    verify(graph)
    np.testing.assert_allclose(h.run_graph(graph, x), expected, rtol=1e-4, atol=1e-5)
    rows = {r["kind"]: r for r in result.layers}
    assert (rows["heads"]["kept"], rows["heads"]["dead"], rows["heads"]["folded"]) == (32, 1, 1)
    assert (rows["ffn"]["kept"], rows["ffn"]["dead"], rows["ffn"]["folded"]) == (80, 6, 10)


@pytest.mark.parametrize("ir_kind", ["fx", "onnx"])
def test_concat_and_split(h, ir_kind):
    torch.manual_seed(4)
    model = CatSplit().eval()
    with torch.no_grad():
        model.a.weight[2:5] = 0
        model.b.weight[:4] = 0
        model.c.weight[:, 30:33] = 0  # dead channels of b (inside the concat, offset 16)
        model.c.weight[3:5] = 0  # constant channels of the first split part...
        model.c.weight[20:22] = 0  # ...and of the second
        model.e.weight[:, 10] = 0
    x = torch.randn(6, 8)
    expected = model(x).detach().numpy()
    graph = h.graph_of(model, x, ir_kind)
    result = FoldPruned()(graph)
    verify(graph)
    np.testing.assert_allclose(h.run_graph(graph, x), expected, rtol=1e-5, atol=1e-6)
    assert result.stats["units_removed"] == 3 + 4 + 3 + 2 + 3
    assert _zero_units_left(graph) == 0


@pytest.mark.parametrize("ir_kind", ["fx", "onnx"])
def test_dense_model_is_a_no_op(h, ir_kind):
    torch.manual_seed(5)
    model, x = MLP().eval(), torch.randn(3, 10)
    graph = h.graph_of(model, x, ir_kind)
    before = h.fx_snapshot(graph) if ir_kind == "fx" else h.onnx_snapshot(graph)
    result = FoldPruned()(graph)
    assert not result.modified and result.stats["units_removed"] == 0
    if ir_kind == "fx":
        h.assert_fx_unchanged(graph, before)
    else:
        assert h.onnx_snapshot(graph) == before


def test_fold_pruned_then_fold_batchnorm_runs_in_ort(h):
    model, x = _ln_pruned_cnn(h)
    with torch.no_grad():
        expected = model(x).numpy()
    result = gp.optimize(gp.capture(model, (x,)), ["fold-pruned", "fold-batchnorm"])
    onnx_model = to_onnx(result.graph, (x,))
    assert "BatchNormalization" not in h.onnx_ops(onnx_model)
    np.testing.assert_allclose(h.run_graph(onnx_model, x), expected, rtol=1e-4, atol=1e-5)
    assert result.report.records[0].stats["units_removed"] > 0


class NormMid(nn.Module):
    """Linear → (decomposed RMSNorm | weightless LayerNorm) → Linear whose first 8 input
    columns are zero: the zero channels still count in the norm's mean."""

    def __init__(self, norm: str) -> None:
        super().__init__()
        self.norm, self.a, self.b = norm, nn.Linear(8, 32), nn.Linear(32, 4)
        self.ln, self.w = nn.LayerNorm(32, elementwise_affine=False), nn.Parameter(
            torch.rand(32) + 0.5)
        with torch.no_grad():
            self.b.weight[:, :8] = 0

    def forward(self, x):
        h = self.a(x)
        if self.norm == "rms":  # as torch.export records LLaMA's RMSNorm
            return self.b(h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.w)
        return self.b(self.ln(h))


@pytest.mark.parametrize("norm", ["rms", "layernorm"])
@pytest.mark.parametrize("ir_kind", ["fx", "onnx"])
def test_norm_statistics_block_folding(h, ir_kind, norm):
    """A keep-dim mean or a weightless norm counts the channels: the group carries a "stat"
    use and fold-pruned leaves it (removing 8 zero channels changed outputs by ~0.09)."""
    model, x = NormMid(norm).eval(), torch.randn(5, 8)
    graph = h.graph_of(model, x, ir_kind)
    hidden = next(g for g in channel_groups(graph) if g.size == 32)
    if ir_kind == "fx" or norm == "rms":  # ONNX LayerNormalization always has a scale
        assert any(u.role == "stat" and u.tensor == "" for u in hidden.uses)
    result = gp.optimize(graph, [FoldPruned()], verify="off")
    assert not result.modified
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(h.run_graph(result.graph, x), ref, rtol=1e-5, atol=1e-6)


def test_consumer_without_readable_input_does_not_crash(h):
    """A ConvTranspose consumer has no readable data input (None in the example-value list)."""

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c, self.t = nn.Conv2d(3, 8, 3), nn.ConvTranspose2d(8, 4, 3)
            self.f1, self.f2 = nn.Linear(4 * 6 * 6, 16), nn.Linear(16, 2)

        def forward(self, x):
            return self.f2(torch.relu(self.f1(self.t(torch.relu(self.c(x))).flatten(1))))

    model, x = M().eval(), torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        model.c.weight[0] = 0
        model.f1.weight[0] = 0
        ref = model(x).numpy()
    result = FoldPruned()(gp.capture(model, (x,)))
    assert result.modified and result.stats["units_removed"] >= 1
    np.testing.assert_allclose(h.run_graph(result.graph, x), ref, rtol=1e-5, atol=1e-5)
