"""FX block-quantized linears export as com.microsoft.MatMulNBits and embedding tables as
GatherBlockQuantized: 4 and 8 bits, symmetric and asymmetric, K not a multiple of the block,
3-D input with a dynamic batch; ORT equals the FX graph, no decode chain is left, the caller's
graph is untouched; the decode and zero-point packing against the quantizer's own;
matmul_nbits=False keeps the decode chain."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from torch import nn

import graphpress as gp
from graphpress.export._nbits import find_nbits_sites
from graphpress.passes.quantize._blockwise import quantize_rtn


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(72, 48), nn.Linear(48, 40, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (8, False)])
def test_quantized_linears_become_matmulnbits_with_parity(bits, symmetric):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 72)
    batch = torch.export.Dim("batch", min=1, max=64)
    gm = gp.capture(Block().eval(), (x,), dynamic_shapes=({0: batch},))
    spec = f"quantize-weights:bits={bits},block_size=32,symmetric={str(symmetric).lower()}"
    quantized = gp.optimize(gm, [spec]).graph
    code, buffers = quantized.code, dict(quantized.named_buffers())
    model = gp.export.to_onnx(quantized, (x,), dynamic_shapes=({0: batch},))
    ops = [node.op_type for node in model.graph]
    assert ops.count("MatMulNBits") == 2 and not {"Floor", "Div", "MatMul", "Gemm"} & set(ops)
    fused = [node for node in model.graph if node.op_type == "MatMulNBits"]
    assert {node.attributes.get_int("bits") for node in fused} == {bits}
    assert [node.attributes.get_int("K") for node in fused] == [72, 48]
    assert all(len(node.inputs) == (3 if symmetric else 4) for node in fused)
    for rows in (2, 7):  # the exported batch and another one
        probe = torch.randn(rows, 5, 72)
        with torch.no_grad():
            expected = quantized(probe).numpy()
        np.testing.assert_allclose(_run(model, probe.numpy()), expected, rtol=1e-5, atol=1e-5)
    assert quantized.code == code and dict(quantized.named_buffers()).keys() == buffers.keys()
    plain = gp.export.to_onnx(quantized, (x,), dynamic_shapes=({0: batch},), matmul_nbits=False)
    assert "MatMulNBits" not in {node.op_type for node in plain.graph}


@pytest.mark.parametrize("symmetric", [False, True])
def test_decode_and_zero_point_packing_match_the_quantizer(symmetric):
    torch.manual_seed(1)
    gm = gp.capture(nn.Linear(80, 6).eval(), (torch.randn(3, 80),))
    quantized = gp.optimize(gm, ["quantize-weights:bits=4,block_size=16,"
                                 f"symmetric={str(symmetric).lower()},clip_search=false"]).graph
    (site,) = find_nbits_sites(quantized)
    assert site.k == 80 and site.block_size == 16 and site.codes.shape == (6, 5, 8)
    weight = dict(gm.named_parameters())["weight"].detach().numpy()
    reference = quantize_rtn(weight, 4, 16, symmetric, False)
    np.testing.assert_array_equal(site.decode(), reference.dequantize())
    np.testing.assert_array_equal(site.codes, reference.packed())
    if symmetric:
        assert site.zero_points is None and site.packed_zero_points() is None
        return
    packed = site.packed_zero_points()  # 5 blocks -> 3 bytes, low nibble first, padded with 0
    assert packed.shape == (6, 3)
    np.testing.assert_array_equal(packed & 15, np.pad(site.zero_points, ((0, 0), (0, 1)))[:, 0::2])
    np.testing.assert_array_equal(packed >> 4, np.pad(site.zero_points, ((0, 0), (0, 1)))[:, 1::2])


class Embedder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table, self.head = nn.Embedding(100, 72), nn.Linear(72, 16)

    def forward(self, ids):
        return self.head(self.table(ids))


@pytest.mark.parametrize("symmetric", [False, True])
def test_quantized_embedding_becomes_gather_block_quantized(symmetric):
    torch.manual_seed(2)
    ids = torch.randint(0, 100, (3, 7))
    batch = torch.export.Dim("batch", min=1, max=64)
    gm = gp.capture(Embedder().eval(), (ids,), dynamic_shapes=({0: batch},))
    spec = f"quantize-weights:bits=4,block_size=32,symmetric={str(symmetric).lower()}"
    quantized = gp.optimize(gm, [spec]).graph
    model = gp.export.to_onnx(quantized, (ids,), dynamic_shapes=({0: batch},))
    ops = [node.op_type for node in model.graph]
    assert ops.count("GatherBlockQuantized") == 1 and ops.count("MatMulNBits") == 1
    assert not {"Floor", "Div", "Gather"} & set(ops)
    probe = torch.randint(0, 100, (5, 7))
    with torch.no_grad():
        expected = quantized(probe).numpy()
    np.testing.assert_allclose(_run(model, probe.numpy()), expected, rtol=1e-5, atol=1e-5)


class TiedHead(nn.Module):
    """The embedding table is also the output projection (a tied LM head)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(96, 64)

    def forward(self, ids):
        return nn.functional.linear(torch.tanh(self.table(ids)), self.table.weight)


def test_tied_table_and_head_each_get_their_layout():
    torch.manual_seed(3)
    ids = torch.randint(0, 96, (2, 6))
    gm = gp.capture(TiedHead().eval(), (ids,))
    quantized = gp.optimize(gm, ["quantize-weights:bits=4,block_size=32"]).graph
    model = gp.export.to_onnx(quantized, (ids,))
    ops = [node.op_type for node in model.graph]
    assert ops.count("GatherBlockQuantized") == 1 and ops.count("MatMulNBits") == 1
    with torch.no_grad():
        expected = quantized(ids).numpy()
    np.testing.assert_allclose(_run(model, ids.numpy()), expected, rtol=1e-5, atol=1e-5)
