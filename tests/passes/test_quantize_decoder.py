"""Quantization passes on a LLaMA-style decoder (tied embedding and LM head, external data).

A seeded two-layer ``LlamaForCausalLM`` (grouped-query attention, ``tie_word_embeddings``) is
exported, saved with external data and loaded back lazily; every quantization pass then runs on
it through ``optimize`` and must keep the tied weight shared (one stored copy), never make the
model bigger (in memory and on disk) and keep the logits close to the float32 ORT logits.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch

import graphpress as gp
from graphpress.export import session
from graphpress.graph.analysis import measure
from graphpress.passes import optimize

transformers = pytest.importorskip("transformers")

logger = logging.getLogger(__name__)

VOCAB, HIDDEN, BATCH, SEQ = 512, 128, 4, 32
TIED = "lm_head.weight"  # the exporter names the tied table after the LM head
SPECS = {  # spec: minimum cosine of the logits vs float32 ORT
    "quantize-weights": 0.98,
    "quantize-weights:algorithm=gptq": 0.98,
    "quantize-dynamic": 0.98,
    "insert-qdq": 0.98,
    "quantize-ternary": None,  # post-training ternary: reported, not promised
}

#: model bytes when the tied table was stored twice (float for one reader, int8 for the other)
BEFORE_FIX = {"insert-qdq": 679_693, "quantize-dynamic": 606_944}


def _disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.name))


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    """``(path, fp32 ORT logits, feeds, calibration batches)`` of the saved decoder."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=HIDDEN, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    exported = gp.export.to_onnx(model, (), {"input_ids": ids, "use_cache": False})
    path = tmp_path_factory.mktemp("decoder") / "llama.onnx"
    gp.save(exported, path, external_data=True)
    assert (path.parent / "llama.onnx.data").exists()  # the weights really live outside
    rng = np.random.default_rng(1)
    feeds = [{"input_ids": rng.integers(0, VOCAB, (BATCH, SEQ)).astype(np.int64)}
             for _ in range(10)]  # 2 to evaluate, 8 (1024 rows) to calibrate
    ref = [session(gp.load(path)).run(f)[0] for f in feeds[:2]]
    return path, ref, feeds[:2], feeds[2:]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1, VOCAB), b.reshape(-1, VOCAB)
    return float(np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def _tied_copies(model) -> list[tuple[str, int]]:
    """Initializers holding (a quantized form of) the tied table, with their sizes."""
    return [(name, value.const_value.nbytes) for name, value in model.graph.initializers.items()
            if name.startswith(TIED) and value.const_value is not None]


@pytest.mark.parametrize("spec", list(SPECS))
def test_decoder_quantization(decoder, spec, tmp_path, monkeypatch):
    path, ref, feeds, calibration = decoder
    monkeypatch.chdir(path.parent.parent)  # data files resolve against the model, not the cwd
    fp32 = gp.load(path)
    before = measure(fp32).bytes
    result = optimize(gp.load(path), [spec], calibration=calibration)
    assert result.modified is True
    out = result.graph
    gp.graph.verify(out)
    assert measure(out).bytes < before  # never bigger: strictly smaller here
    saved = tmp_path / "q.onnx"
    gp.save(out, saved, external_data=True)
    assert _disk_bytes(saved) < _disk_bytes(path)

    copies = _tied_copies(out)  # tied weights stay shared: one stored table
    tables = [c for c in copies if not any(t in c[0] for t in ("scale", "zero_point"))]
    logger.info("%s: tied table stored as %s", spec, copies)
    assert len(tables) == 1, copies
    assert sum(size for _, size in copies) <= VOCAB * HIDDEN * 4
    if spec in BEFORE_FIX:  # the tied table is quantized once (int8 per row), read by both
        assert TIED not in out.graph.initializers  # the float table is gone
        (name, size), = tables
        assert size == VOCAB * HIDDEN, copies  # one int8 byte per element
        assert out.graph.initializers[name].dtype == ir.DataType.INT8
        assert measure(out).bytes < BEFORE_FIX[spec]

    run = session(gp.load(saved))
    cosine = min(_cosine(r, run.run(f)[0]) for r, f in zip(ref, feeds))
    logger.info("%s: logits cosine vs fp32 %.4f, %d -> %d bytes", spec, cosine, before,
                measure(out).bytes)
    bound = SPECS[spec]
    if bound is None:
        assert np.isfinite(cosine) and cosine < 0.98  # honest: ternary PTQ is lossy
    else:
        assert cosine >= bound, f"{spec}: logits cosine {cosine:.4f} < {bound}"


def test_decoder_tied_table_quantized_once(decoder, monkeypatch):
    """quantize-weights stores one packed table read by GatherBlockQuantized and the LM head."""
    path, _, _, _ = decoder
    monkeypatch.chdir(path.parent.parent)
    out = optimize(gp.load(path), ["quantize-weights"]).graph
    codes = [v for name, v in out.graph.initializers.items()
             if name.startswith(TIED) and name.endswith(".codes")]
    assert len(codes) == 1
    users = sorted(u.node.op_type for u in codes[0].uses())
    assert users == ["GatherBlockQuantized", "Reshape"]  # Reshape feeds the LM-head MatMulNBits
    assert TIED not in out.graph.initializers  # the float table is gone


@pytest.mark.parametrize(("spec", "head"), [("insert-qdq", "DequantizeLinear"),
                                            ("quantize-dynamic", "DynamicQuantizeMatMul")])
def test_decoder_tied_table_int8_once(decoder, spec, head, monkeypatch):
    """One int8 per-row table read by the embedding Gather and, transposed, by the LM head."""
    path, _, _, calibration = decoder
    monkeypatch.chdir(path.parent.parent)
    out = optimize(gp.load(path), [spec], calibration=calibration).graph
    (table,) = [v for n, v in out.graph.initializers.items()
                if n.startswith(TIED) and v.const_value.size == VOCAB * HIDDEN]
    assert table.dtype == ir.DataType.INT8
    users = sorted(u.op_type for u, _ in table.uses())
    assert users == ["Gather", "Transpose"]
    (transpose,) = [u for u, _ in table.uses() if u.op_type == "Transpose"]
    assert [u.op_type for u, _ in transpose.outputs[0].uses()] == [head]
