"""``quantize-weights`` with calibration on FX graphs: GPTQ (act-order) and AWQ against RTN and
fp32 eager, export parity in ONNX Runtime, the caller's graph untouched, ``auto`` choosing by
calibration, tied weights falling back to RTN, and the same codes as the ONNX path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from graphpress.export import to_onnx
from graphpress.graph import capture, measure, verify
from graphpress.graph.errors import PreconditionError
from graphpress.passes import optimize
from graphpress.passes._collect import collect
from graphpress.passes.quantize._blockwise import quantize_rtn

PASS = "quantize-weights"
SALIENT = [3, 40, 77]  # input channels 12x larger than the rest


class Block(nn.Module):
    """``q`` and ``k`` read the same input (AWQ gives them one scale); ``o`` reads their product."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.o = nn.Linear(128, 96), nn.Linear(128, 96), nn.Linear(96, 64)

    def forward(self, x):
        return self.o(torch.relu(self.q(x)) * self.k(x))


def _batches(rng: np.random.Generator, mix: np.ndarray, count: int) -> list[tuple[torch.Tensor]]:
    """Correlated channels (rank 16 through ``mix``, + noise) with a few salient ones: GPTQ
    and AWQ have something to exploit, as on real activations."""
    out = []
    for _ in range(count):
        x = rng.normal(size=(48, 16)) @ mix + 0.3 * rng.normal(size=(48, 128))
        x[:, SALIENT] *= 12.0
        out.append((torch.from_numpy(x.reshape(2, 24, 128).astype(np.float32)),))
    return out


@pytest.fixture(scope="module")
def block(h):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = Block().eval()
    mix = rng.normal(size=(16, 128))
    calibration, evaluation = _batches(rng, mix, 8), _batches(rng, mix, 8)
    gm = capture(model, calibration[0])
    snapshot = h.fx_snapshot(gm)
    results = {a: optimize(gm, [f"{PASS}:algorithm={a}"], calibration=calibration)
               for a in ("rtn", "gptq", "awq")}
    return model, gm, snapshot, calibration, evaluation, results


def _error(graph, model, batches) -> float:
    """Relative output error of ``graph`` against fp32 eager ``model`` over ``batches``."""
    with torch.no_grad():
        got = torch.cat([graph(*b) for b in batches])
        ref = torch.cat([model(*b) for b in batches])
    return float((got - ref).norm() / ref.norm())


def _stats(result) -> dict[str, float]:
    return dict(result.report.records[0].stats)


def _ort_parity(h, graph, batch) -> None:
    onnx_model = to_onnx(graph, batch)
    (got,) = h.ort_outputs(onnx_model, {onnx_model.graph.inputs[0].name: batch[0].numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, graph(*batch).numpy(), rtol=1e-4, atol=1e-4)


def test_gptq_fx_beats_rtn_exports_and_copies(h, block):
    model, gm, snapshot, _, evaluation, results = block
    h.assert_fx_unchanged(gm, snapshot)  # optimize ran on a copy, three times
    out, stats = results["gptq"].graph, _stats(results["gptq"])
    verify(out)
    assert stats["gptq"] == 1.0 and stats["weights_quantized"] == 3
    assert stats["output_error_mean"] < 0.5 * stats["rtn_output_error_mean"]
    rtn, gptq = _error(results["rtn"].graph, model, evaluation), _error(out, model, evaluation)
    assert gptq < 0.5 * rtn and gptq < 0.05  # held-out batches, end to end vs fp32 eager
    assert measure(out).bytes == measure(results["rtn"].graph).bytes  # equal size
    assert measure(out).bytes < measure(gm).bytes / 5
    buffers = dict(out.named_buffers())
    assert not {"q.weight", "k.weight", "o.weight"} & set(dict(out.named_parameters()))
    assert {"q_weight_weights_codes", "o_weight_weights_scales"} <= set(buffers)
    linears = [n for n in out.graph.nodes if n.target is torch.ops.aten.linear.default]
    assert [n.args[1].meta["graphpress.pass"] for n in linears] == [PASS] * 3
    _ort_parity(h, out, evaluation[0])


def test_awq_fx_inserts_one_mul_per_input(h, block):
    model, _, _, _, evaluation, results = block
    out, stats = results["awq"].graph, _stats(results["awq"])
    verify(out)
    assert stats["gptq"] == 0.0 and stats["awq_alpha_mean"] > 0
    assert stats["output_error_mean"] < stats["rtn_output_error_mean"]
    assert _error(out, model, evaluation) <= _error(results["rtn"].graph, model, evaluation)
    q, k, o = [n for n in out.graph.nodes if n.target is torch.ops.aten.linear.default]
    mul = q.args[0]
    assert k.args[0] is mul and mul.target is torch.ops.aten.mul.Tensor  # one shared scale
    assert mul.args[0].op == "placeholder" and mul.meta["graphpress.pass"] == PASS
    assert "awq" in mul.name and mul.args[1].meta["graphpress.pass"] == PASS
    inv = getattr(out, mul.args[1].target)
    assert inv.shape == (128,) and bool((inv > 0).all())
    scale = 1.0 / inv
    assert bool((scale[SALIENT] > scale.median()).all())  # salient channels are protected
    _ort_parity(h, out, evaluation[0])


def test_auto_is_gptq_with_calibration_rtn_without(block):
    model, gm, _, calibration, evaluation, results = block
    auto = optimize(gm, [PASS], calibration=calibration)
    assert _stats(auto)["gptq"] == 1.0
    plain = optimize(gm, [PASS])
    assert _stats(plain)["gptq"] == 0.0 and "output_error_mean" not in _stats(plain)
    with torch.no_grad():
        x = evaluation[0][0]
        assert torch.equal(auto.graph(x), results["gptq"].graph(x))
        assert torch.equal(plain.graph(x), results["rtn"].graph(x))
    for algorithm in ("gptq", "awq"):
        with pytest.raises(PreconditionError, match="calibration"):
            optimize(gm, [f"{PASS}:algorithm={algorithm}"])


def test_fx_and_onnx_gptq_agree(h, block):
    model, _, _, calibration, evaluation, results = block
    onnx_model = to_onnx(model, calibration[0])
    name = onnx_model.graph.inputs[0].name
    onnx_result = optimize(onnx_model, [f"{PASS}:algorithm=gptq"],
                           calibration=[{name: b[0].numpy()} for b in calibration])
    fx_stats, onnx_stats = _stats(results["gptq"]), _stats(onnx_result)
    for key in ("output_error_mean", "rtn_output_error_mean"):
        assert abs(fx_stats[key] - onnx_stats[key]) < 0.02 * onnx_stats[key], key
    # q reads the graph input: the same Hessian on both sides, so the same packed codes
    fx_codes = results["gptq"].graph.q_weight_weights_codes.numpy()
    nbits = next(n for n in onnx_result.graph.graph if n.op_type == "MatMulNBits")
    codes = nbits.inputs[1].producer().inputs[0]  # MatMulNBits reads them through a Reshape
    onnx_codes = codes.const_value.numpy().reshape(fx_codes.shape)
    assert np.mean(fx_codes == onnx_codes) > 0.999
    fx_err = _error(results["gptq"].graph, model, evaluation)
    with torch.no_grad():
        ref = torch.cat([model(*b) for b in evaluation]).numpy()
    got = np.concatenate([h.ort_outputs(onnx_result.graph, {name: b[0].numpy()})[0]
                          for b in evaluation])
    onnx_err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    assert abs(fx_err - onnx_err) < 0.05 * onnx_err


class Tied(nn.Module):
    """A tied embedding/LM head around one hidden linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.fc = nn.Embedding(256, 64), nn.Linear(64, 64)
        self.head = nn.Linear(64, 256, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.relu(self.fc(self.embed(ids))))


def test_tied_weight_falls_back_to_rtn_hidden_linear_gptq():
    model = Tied().eval()
    ids = [(torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(i)),)
           for i in range(6)]
    gm = capture(model, ids[0])
    result = optimize(gm, [f"{PASS}:algorithm=gptq"], calibration=ids)
    stats, out = _stats(result), result.graph
    verify(out)
    assert stats["shared_weights"] == 1 and stats["embeddings_quantized"] == 1
    assert stats["weights_quantized"] == 3 and stats["output_error_mean"] > 0  # fc: GPTQ
    (embedding,) = [n for n in out.graph.nodes if n.target is torch.ops.aten.embedding.default]
    readers = [n.target for n in embedding.args[0].users]
    assert sorted(map(str, readers)) == ["aten.embedding.default", "aten.linear.default"]
    rows = {}
    collect(out, ids[:1], [embedding.name], lambda name, a: rows.setdefault(name, a))
    deq = quantize_rtn(model.embed.weight.detach().numpy(), 4, 32, symmetric=False).dequantize()
    np.testing.assert_allclose(rows[embedding.name], deq[ids[0][0].numpy()], atol=1e-6)  # Rule 3
    with torch.no_grad():
        ref = model(*ids[0])
        assert float((out(*ids[0]) - ref).norm() / ref.norm()) < 0.2
