"""Tests of ``quantize-weights``: packing layout, MatMulNBits/GatherBlockQuantized numerics in
ONNX Runtime, any K, size, tied weights, GPTQ/AWQ vs RTN, FX simulation and its export, and
the real all-MiniLM-L6-v2 model."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from graphpress.export import to_onnx
from graphpress.graph import capture, save, verify
from graphpress.graph.analysis import measure
from graphpress.graph.errors import PassSpecError, PreconditionError
from graphpress.passes import from_spec, optimize
from graphpress.passes.quantize import QuantizeWeights
from graphpress.passes.quantize._blockwise import fp16_exact, quantize_rtn
from graphpress.passes.quantize._gptq import InputStats, awq_scales, gptq
from graphpress.passes.quantize._packing import (
    pack,
    pack_zero_points,
    unpack,
    unpack_zero_points,
)

F, I64 = TensorProto.FLOAT, TensorProto.INT64
RNG = np.random.default_rng(0)


def _linear_model(h, k: int, n: int, *, gemm: bool = False, bias: bool = True):
    w = RNG.normal(size=(n, k) if gemm else (k, n)).astype(np.float32)
    b = RNG.normal(size=(n,)).astype(np.float32)
    if gemm:
        nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1, beta=0.5)]
    else:
        nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm")]
        nodes.append(helper.make_node("Add", ["m", "b"], ["y"]) if bias else
                     helper.make_node("Identity", ["m"], ["y"]))
    return h.make_onnx(nodes, [("x", F, [3, k])], [("y", F, [3, n])], {"w": w, "b": b}), w, b


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("k", [64, 300, 37])
def test_pack_round_trip(bits, k):
    bq = quantize_rtn(RNG.normal(size=(5, k)), bits, 16, symmetric=False)
    packed = pack(bq.q, bits, 16)
    assert packed.shape == (5, -(-k // 16), 16 * bits // 8) and packed.dtype == np.uint8
    assert np.array_equal(unpack(packed, bits), bq.q)
    zp = bq.zero_points
    assert np.array_equal(unpack_zero_points(pack_zero_points(zp, bits), bits, zp.shape[1]), zp)
    assert bq.q.max() <= (1 << bits) - 1


@pytest.mark.parametrize("symmetric", [True, False])
def test_clip_search_lowers_error_with_fp16_scales(symmetric):
    w = RNG.standard_t(3, size=(64, 256))  # heavy tails: clipping pays
    plain = quantize_rtn(w, 4, 32, symmetric, search_clip=False)
    best = quantize_rtn(w, 4, 32, symmetric)
    err = [np.sum((bq.dequantize() - w) ** 2, axis=1) for bq in (plain, best)]
    assert np.all(err[1] <= err[0] * (1 + 1e-5)) and err[1].sum() < 0.97 * err[0].sum()
    assert fp16_exact(best.scales) and fp16_exact(plain.scales)
    assert from_spec("quantize-weights:clip_search=false").clip_search is False


@pytest.mark.parametrize("bits,symmetric", [(2, True), (4, True), (4, False), (8, False)])
@pytest.mark.parametrize("k,block", [(64, 16), (300, 32), (300, 128)])
def test_matmulnbits_matches_numpy_dequantized(h, bits, symmetric, k, block):
    model, w, b = _linear_model(h, k, 24)
    x = RNG.normal(size=(3, k)).astype(np.float32)
    (ref,) = h.ort_outputs(model, {"x": x})
    result = optimize(model, [QuantizeWeights(bits=bits, block_size=block, symmetric=symmetric)])
    out = result.graph
    assert h.onnx_ops(out) == ["Reshape", "Cast", "MatMulNBits", "Add"]  # golden sequence
    scales = next(v for v in out.graph.initializers.values() if v.name.endswith(".scales"))
    assert scales.const_value.numpy().dtype == np.float16  # fp16 on disk, Cast folded by ORT
    verify(out)
    (got,) = h.ort_outputs(out, {"x": x})
    deq = quantize_rtn(w.T, bits, block, symmetric).dequantize()  # the layout proof
    np.testing.assert_allclose(got, x @ deq.T + b, rtol=1e-4, atol=1e-4)
    relative = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert relative < {2: 0.7, 4: 0.15, 8: 0.01}[bits]
    node = next(n for n in out.graph if n.op_type == "MatMulNBits")
    assert node.metadata_props["graphpress.pass"] == "quantize-weights"
    assert node.attributes["K"].value == k and node.attributes["block_size"].value == block


def test_gemm_bias_and_spec(h):
    model, w, b = _linear_model(h, 64, 32, gemm=True)
    x = RNG.normal(size=(3, 64)).astype(np.float32)
    out = optimize(model, ["quantize-weights:bits=8,block_size=16"]).graph
    assert h.onnx_ops(out) == ["Reshape", "Cast", "MatMulNBits", "Add"]
    np.testing.assert_allclose(h.ort_outputs(out, {"x": x})[0], x @ w.T + 0.5 * b, atol=0.2)
    # the bias (scaled by beta) moved to a new initializer: the original, unread, is gone
    assert "b" not in out.graph.initializers and "w" not in out.graph.initializers
    assert all(v.uses() for v in out.graph.initializers.values())
    stored = sum(v.const_value.nbytes for v in out.graph.initializers.values())
    assert measure(out).bytes == stored
    assert from_spec("quantize-weights:algorithm=gptq,act_order=false").act_order is False
    with pytest.raises(PassSpecError, match="block_size"):
        from_spec("quantize-weights:block_size=48")
    with pytest.raises(PassSpecError, match="bits"):
        QuantizeWeights(bits=3)


def test_gemm_bias_read_elsewhere_stays(h):
    """A Gemm bias also read by another node stays (only an unread original is dropped)."""
    w = RNG.normal(size=(32, 64)).astype(np.float32)
    b = RNG.normal(size=(32,)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["g"], transB=1),
             helper.make_node("Add", ["g", "b"], ["y"])]
    model = h.make_onnx(nodes, [("x", F, [3, 64])], [("y", F, [3, 32])], {"w": w, "b": b})
    x = RNG.normal(size=(3, 64)).astype(np.float32)
    out = optimize(model, ["quantize-weights:bits=8,block_size=16"]).graph
    assert "MatMulNBits" in h.onnx_ops(out) and "b" in out.graph.initializers
    assert all(v.uses() for v in out.graph.initializers.values())
    np.testing.assert_allclose(h.ort_outputs(out, {"x": x})[0], x @ w.T + 2 * b, atol=0.2)


def _embedding_model(h, vocab: int, hidden: int, *, tied: bool):
    table = RNG.normal(size=(vocab, hidden)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed")]
    if tied:  # LLaMA-style tied LM head: MatMul(e, Transpose(table))
        nodes += [helper.make_node("Transpose", ["table"], ["tt"], perm=[1, 0]),
                  helper.make_node("MatMul", ["e", "tt"], ["y"], name="lm_head")]
    else:
        nodes.append(helper.make_node("Identity", ["e"], ["y"]))
    out = ("y", F, [2, 5, vocab if tied else hidden])
    return h.make_onnx(nodes, [("ids", I64, [2, 5])], [out], {"table": table}), table


@pytest.mark.parametrize("hidden", [64, 300])
def test_gather_block_quantized_parity(h, hidden):
    model, table = _embedding_model(h, 50, hidden, tied=False)
    ids = np.array([[1, 3, 49, 0, 7], [2, 2, 2, 9, 11]], np.int64)
    result = optimize(model, ["quantize-weights"])
    out = result.graph
    expected = ["GatherBlockQuantized", "Cast"] + (["Slice"] if hidden % 32 else []) + ["Identity"]
    assert h.onnx_ops(out) == expected
    (got,) = h.ort_outputs(out, {"ids": ids})
    bq = quantize_rtn(table, 4, 32, symmetric=False)
    deq = type(bq)(bq.q, bq.scales.astype(np.float16).astype(np.float32), bq.zero_points, 4, 32,
                   hidden).dequantize()
    np.testing.assert_allclose(got, deq[ids], atol=2e-3, rtol=2e-3)  # fp16 rows
    assert result.report.records[0].stats["embeddings_quantized"] == 1
    assert optimize(model, ["quantize-weights:embeddings=false"]).modified is False


def test_tied_embedding_and_lm_head_shared(h):
    model, table = _embedding_model(h, 256, 64, tied=True)
    ids = RNG.integers(0, 256, size=(2, 5)).astype(np.int64)
    result = optimize(model, ["quantize-weights"])
    out = result.graph
    assert h.onnx_ops(out) == ["GatherBlockQuantized", "Cast", "Reshape", "Cast", "MatMulNBits"]
    codes = [v for v in out.graph.initializers.values() if v.name.endswith(".codes")]
    assert len(codes) == 1 and len(codes[0].uses()) == 2  # stored once, read by both
    assert result.report.records[0].stats["shared_weights"] == 1
    (got,) = h.ort_outputs(out, {"ids": ids})
    deq = quantize_rtn(table, 4, 32, symmetric=False).dequantize()
    rows = deq[ids].astype(np.float16).astype(np.float32)  # fp16 scales give fp16 rows
    np.testing.assert_allclose(got, rows @ deq.T, rtol=1e-3, atol=1e-3)
    assert measure(out).bytes < measure(model).bytes / 5


def test_size_ratio_skips_tiny_never_bigger(h):
    model, *_ = _linear_model(h, 512, 256)
    result = optimize(model, ["quantize-weights:symmetric=true"])
    stats = result.report.records[0].stats
    assert stats["weight_bytes_before"] / stats["weight_bytes_after"] >= 6.0
    tiny, *_ = _linear_model(h, 8, 4)  # K < 16: scales would cost more than they save
    result = optimize(tiny, ["quantize-weights"])
    assert result.modified is False and result.report.records[0].stats["skipped_small"] == 1
    for spec in ("quantize-weights:bits=8,block_size=16", "quantize-weights:bits=2"):
        assert measure(optimize(model, [spec]).graph).bytes < measure(model).bytes


def test_noop_and_calibration_required(h):
    model = h.make_onnx([helper.make_node("MatMul", ["x", "z"], ["y"])],
                        [("x", F, [3, 64]), ("z", F, [64, 8])], [("y", F, [3, 8])])
    assert optimize(model, ["quantize-weights"]).modified is False
    linear, *_ = _linear_model(h, 64, 32)
    for algorithm in ("gptq", "awq"):
        with pytest.raises(PreconditionError, match="calibration"):
            optimize(linear, [f"quantize-weights:algorithm={algorithm}"])


def _activations(n: int = 4096, k: int = 128, dominant: bool = False) -> np.ndarray:
    x = RNG.normal(size=(n, 16)) @ RNG.normal(size=(16, k)) + 0.3 * RNG.normal(size=(n, k))
    if dominant:
        x[:, [3, 40, 77]] *= 12.0
    return x


def _error(x, w, deq, s=None) -> float:
    got = (x / s) @ deq.T if s is not None else x @ deq.T
    return float(np.linalg.norm(got - x @ w.T) / np.linalg.norm(x @ w.T))


def test_gptq_beats_rtn_and_act_order_helps():
    w = RNG.normal(size=(64, 128)) * 0.05
    for dominant in (False, True):
        x = _activations(dominant=dominant)
        stats = InputStats(128)
        stats.update(x)
        rtn = _error(x, w, quantize_rtn(w, 4, 32, False).dequantize())
        plain = _error(x, w, gptq(w, stats.hessian, 4, 32, False, act_order=False).dequantize())
        ordered = _error(x, w, gptq(w, stats.hessian, 4, 32, False, act_order=True).dequantize())
        assert plain < 0.5 * rtn
        if dominant:
            assert ordered < plain


def test_awq_beats_rtn_with_outlier_channel():
    x = RNG.normal(size=(2048, 128))
    x[:, 5] *= 40.0  # one salient input channel
    w = RNG.normal(size=(64, 128)) * 0.05
    stats = InputStats(128, need_hessian=False)
    stats.update(x)
    s, alpha, _ = awq_scales([w], stats, 4, 32, True)
    awq = quantize_rtn(w * s[None, :], 4, 32, True).dequantize()
    assert alpha > 0 and _error(x, w, awq, s) < _error(x, w, quantize_rtn(w, 4, 32, True).dequantize())


@pytest.mark.parametrize("algorithm", ["gptq", "awq"])
def test_calibrated_onnx_pass(h, algorithm):
    model, w, b = _linear_model(h, 128, 64)
    x = _activations(n=96, dominant=True).astype(np.float32)
    batches = [{"x": x[i:i + 3]} for i in range(0, 96, 3)]
    result = optimize(model, [f"quantize-weights:algorithm={algorithm}"], calibration=batches)
    stats = result.report.records[0].stats
    assert stats["output_error_mean"] < stats["rtn_output_error_mean"]
    verify(result.graph)
    rtn = optimize(model, ["quantize-weights"]).graph

    def error(m):  # end to end in ORT, against the float layer
        got = np.concatenate([h.ort_outputs(m, bt)[0] for bt in batches])
        return np.linalg.norm(got - (x @ w + b)) / np.linalg.norm(x @ w + b)

    assert error(result.graph) < error(rtn)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 96)
        self.fc = nn.Linear(96, 48)
        self.tiny = nn.Linear(48, 8)

    def forward(self, ids):
        return self.tiny(torch.relu(self.fc(self.embed(ids))))


def test_fx_rtn_simulates_onnx_and_exports():
    model, ids = Net().eval(), torch.randint(0, 40, (2, 7))
    gm = capture(model, (ids,))
    result = optimize(gm, ["quantize-weights"])
    out = result.graph
    stats = result.report.records[0].stats
    assert stats["weights_quantized"] == 3 and stats["embeddings_quantized"] == 1
    verify(out)
    w = model.fc.weight.detach().numpy()
    deq = quantize_rtn(w, 4, 32, symmetric=False).dequantize()
    e = quantize_rtn(model.embed.weight.detach().numpy(), 4, 32, False).dequantize()[ids.numpy()]
    expected = torch.relu(torch.from_numpy(e @ deq.T) + model.fc.bias)
    with torch.no_grad():
        head = quantize_rtn(model.tiny.weight.numpy(), 4, 32, False).dequantize()
        expected = expected @ torch.from_numpy(head).T + model.tiny.bias
        torch.testing.assert_close(out(ids), expected, rtol=1e-4, atol=1e-4)
        onnx_model = to_onnx(out, (ids,))
        from graphpress.export import session

        got = session(onnx_model, providers="cpu").run([ids.numpy()])[0]
        np.testing.assert_allclose(got, out(ids).numpy(), rtol=1e-4, atol=1e-4)
    assert measure(out).bytes < measure(gm).bytes / 4
    gptq = optimize(capture(model, (ids,)), ["quantize-weights:algorithm=gptq"],
                    calibration=[(ids,)])
    assert gptq.report.records[0].stats["gptq"] == 1.0  # FX runs GPTQ too


@pytest.mark.slow
def test_minilm_rtn_and_gptq(minilm_tokenizer, tmp_path):
    from graphpress.data import mean_pool, stdlib_sentences
    from graphpress.export import session

    model, tokenizer = minilm_tokenizer

    def batches(sentences):
        out = []
        for i in range(0, len(sentences), 8):
            enc = tokenizer(sentences[i:i + 8], padding="max_length", max_length=48,
                            truncation=True, return_tensors="np")
            out.append({k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")})
        return out

    evaluation, calibration = batches(stdlib_sentences(32)), batches(stdlib_sentences(16, offset=500))
    fp32 = to_onnx(model, (), {k: torch.from_numpy(v) for k, v in evaluation[0].items()})

    def embed(m):
        runner = session(m, providers="cpu")
        return np.concatenate([mean_pool(runner.run(b)[0], b["attention_mask"]) for b in evaluation])

    def cosine(a, b):
        return float(np.mean((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))

    ref, results = embed(fp32), {}
    auto = "quantize-weights"  # GPTQ when calibration is given, as here
    for spec in ("quantize-weights:algorithm=rtn", "quantize-weights:algorithm=gptq,embeddings=false",
                 "quantize-weights:algorithm=rtn,embeddings=false", "quantize-weights:block_size=128",
                 auto):
        start = time.perf_counter()
        result = optimize(fp32, [spec], calibration=calibration)
        out = result.graph
        assert result.report.records[0].stats["gptq"] == float("rtn" not in spec)
        results[spec] = (measure(fp32).bytes / measure(out).bytes, cosine(embed(out), ref),
                         time.perf_counter() - start)
        if spec == "quantize-weights:algorithm=rtn":  # the benchmark's measure: bytes of the files on disk
            save(fp32, tmp_path / "fp32.onnx")
            save(out, tmp_path / "q.onnx")
            disk = (tmp_path / "fp32.onnx").stat().st_size / (tmp_path / "q.onnx").stat().st_size
    print("minilm quantize-weights (ratio, cosine, seconds):", results, "disk ratio", disk)
    ratio, cos, _ = results["quantize-weights:algorithm=rtn"]
    assert ratio >= 6.5 and disk >= 6.5 and cos >= 0.97  # target 0.985 is GPTQ's: see report
    assert results["quantize-weights:block_size=128"][1] >= 0.94  # K = 384 and 1536 both work
    assert (results["quantize-weights:algorithm=gptq,embeddings=false"][1]
            > results["quantize-weights:algorithm=rtn,embeddings=false"][1])
    assert results[auto][1] > cos and results[auto][0] >= 6.5  # auto = GPTQ with calibration
