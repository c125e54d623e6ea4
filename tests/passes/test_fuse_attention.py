"""``fuse-attention``: exported scaled-dot-product attention → ORT ``MultiHeadAttention``.

Reference: ORT on the unfused export and torch eager on the same inputs."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import pytest
import torch
from torch import nn

from graphpress.export import to_onnx
from graphpress.graph import capture
from graphpress.graph.errors import UnsupportedGraphError
from graphpress.passes import optimize
from graphpress.passes.fuse_attention import FuseAttention


class SelfAttention(nn.Module):
    """BERT-style block: q/k/v projections, heads, an additive mask bias, output projection."""

    def __init__(self, hidden=32, heads=4, style="sdpa", causal=False):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v, self.o = (nn.Linear(hidden, hidden) for _ in range(4))
        self.heads, self.style, self.causal = heads, style, causal

    def split(self, x):
        b, s, _ = x.shape
        return x.view(b, s, self.heads, -1).transpose(1, 2)

    def forward(self, x, mask):
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        bias = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        if self.style == "sdpa":
            ctx = nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=None if self.causal else bias, is_causal=self.causal)
        elif self.style == "manual":  # kᵀ by transpose(-1, -2), scale after the product
            scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
            ctx = scores.softmax(-1) @ v
        else:  # "nomask"
            ctx = nn.functional.scaled_dot_product_attention(q, k, v)
        b, _, s, _ = ctx.shape
        return self.o(ctx.transpose(1, 2).reshape(b, s, -1))


def _inputs(batch=3, seq=7, hidden=32):
    torch.manual_seed(1)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[1, seq // 2:] = 0  # padded samples
    mask[-1, 2:] = 0
    return torch.randn(batch, seq, hidden), mask


def _export(module, args):
    batch, seq = torch.export.Dim("batch", max=64), torch.export.Dim("seq", max=256)
    return to_onnx(module, args, dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}))


@pytest.mark.parametrize("style", ["sdpa", "manual", "nomask", "causal"])
def test_fused_matches_eager_and_unfused(style, h):
    module = SelfAttention(style="sdpa" if style == "causal" else style, causal=style == "causal")
    model = _export(module, _inputs())
    result = optimize(model, ["fuse-attention"])
    ops = h.onnx_ops(result.graph)
    assert result.modified and ops.count("MultiHeadAttention") == 1
    assert "Softmax" not in ops and "IsNaN" not in ops
    # the causal mask reads the split heads' shapes, which keeps two cheap [B,S,H,D] transposes
    assert ops.count("Transpose") == (2 if style == "causal" else 0)
    for batch, seq in ((3, 7), (2, 19)):  # dynamic shapes still work
        x, mask = _inputs(batch, seq)
        feeds = {"x": x.numpy(), "mask": mask.numpy()}
        got = h.ort_outputs(result.graph, feeds)[0]
        before = h.ort_outputs(model, feeds)[0]
        with torch.no_grad():
            want = module(x, mask).numpy()
        np.testing.assert_allclose(got, before, atol=2e-6, rtol=1e-5)
        np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("fill", ["exported", "-inf"])
def test_fully_masked_rows_match_the_unfused_export(fill, h):
    """A boolean mask exports as ``Where(mask, 0, float_min)`` plus an ``IsNaN`` guard after
    ``Softmax``. With that finite fill a fully masked row is a uniform average either way; with
    the fill swapped for ``-inf`` the guard turns the row's NaNs into zeros, and the fused graph
    must keep a guard that gives the same zeros (Rule 4)."""

    class BoolMask(SelfAttention):
        def forward(self, x, mask):
            q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
            ctx = nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask[:, None, None, :] > 0)
            b, _, s, _ = ctx.shape
            return ctx.transpose(1, 2).reshape(b, s, -1)  # no output projection: rows visible

    model = _export(BoolMask(), _inputs())
    assert "IsNaN" in h.onnx_ops(model)
    if fill == "-inf":
        where = next(n for n in model.graph if n.op_type == "Where"
                     and n.inputs[2].const_value is not None)
        where.replace_input_with(2, ir.Value(name="minus_inf", const_value=ir.tensor(
            np.array(-np.inf, np.float32), name="minus_inf")))
        model.graph.register_initializer(where.inputs[2])
    result = optimize(model, ["fuse-attention"])
    assert result.report.records[0].stats["guards_kept"] == (fill == "-inf")
    x, mask = _inputs()
    mask[-1] = 0  # every key of the last sample masked
    feeds = {"x": x.numpy(), "mask": mask.numpy()}
    got, before = h.ort_outputs(result.graph, feeds)[0], h.ort_outputs(model, feeds)[0]
    assert np.isfinite(before).all()
    if fill == "-inf":
        assert (before[-1] == 0).all()
    np.testing.assert_allclose(got, before, atol=2e-6, rtol=1e-5)


def test_minilm_fused_is_exact_and_keeps_the_caller_model(bert_onnx, h):
    model, feeds, reference = bert_onnx
    snapshot = [n.op_type for n in model.graph]
    result = optimize(model, ["fuse-attention", "dce"])
    assert [n.op_type for n in model.graph] == snapshot  # caller's model untouched
    stats = result.report.records[0].stats
    assert stats["attention_fused"] == 6 and stats["heads"] == 12 and stats["guards_kept"] == 0
    ops = h.onnx_ops(result.graph)
    assert ops.count("MultiHeadAttention") == 6 and "Softmax" not in ops and "IsNaN" not in ops
    got = h.ort_outputs(result.graph, feeds)[0]
    np.testing.assert_allclose(got, reference, atol=5e-5, rtol=1e-5)  # summation order


@pytest.fixture(scope="module")
def bert_onnx(minilm, minilm_tokenizer):
    model, inputs = minilm
    batch, seq = torch.export.Dim("batch", max=64), torch.export.Dim("seq", max=512)
    onnx_model = to_onnx(model, (), inputs, dynamic_shapes={n: {0: batch, 1: seq} for n in inputs})
    enc = minilm_tokenizer[1](["a first sentence", "a second, somewhat longer sentence here"],
                              padding=True, return_tensors="np")
    feeds = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        reference = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})[0].numpy()
    return onnx_model, feeds, reference


def test_no_attention_is_a_no_op(h):
    lin = nn.Linear(32, 8)
    batch = torch.export.Dim("batch", max=64)
    model = to_onnx(lin, (torch.randn(2, 32),), dynamic_shapes=({0: batch},))
    result = optimize(model, ["fuse-attention"])
    assert not result.modified and h.onnx_ops(result.graph) == h.onnx_ops(model)


def test_fx_graphs_are_refused():
    gm = capture(nn.Linear(4, 4), (torch.randn(2, 4),))
    with pytest.raises(UnsupportedGraphError, match="onnx"):
        FuseAttention()(gm)
