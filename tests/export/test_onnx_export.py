"""to_onnx and save: small modules, real BERT and LLaMA, provenance, errors, a >2 GB save."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch
from torch import nn

from graphpress import export
from graphpress.graph import ExportError, capture, load
from graphpress.graph import io as graph_io

COSINE = 0.99999

SMALL = {
    "linear": (lambda: nn.Linear(16, 8), (2, 16), "Gemm"),
    "conv": (
        lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()),
        (2, 3, 10, 10),
        "Conv",
    ),
    "layernorm": (lambda: nn.LayerNorm(32), (4, 32), "LayerNormalization"),
    "mlp": (
        lambda: nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)),
        (3, 16),
        "Gelu",
    ),
}


def _mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)).eval()
    return model, torch.randn(3, 16)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_module_matches_eager(name):
    make, shape, op = SMALL[name]
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(shape)
    onnx_model = export.to_onnx(capture(model, (x,)), (x,))
    assert isinstance(onnx_model, ir.Model)
    assert op in [node.op_type for node in onnx_model.graph]
    for sample in (x, torch.randn(shape)):  # the example input and a fresh one
        parity = export.check_parity(model, onnx_model, (sample,))
        assert parity.cosine >= COSINE and parity.max_abs < 1e-5, str(parity)


def test_exports_eager_module_and_leaves_it_unchanged(capsys):
    model, x = _mlp()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    onnx_model = export.to_onnx(model, x)  # a bare tensor is one positional argument
    assert model.training  # mode restored
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert capsys.readouterr().out == ""  # the exporter's progress lines are not printed
    assert export.check_parity(model.eval(), onnx_model, (x,)).cosine >= COSINE


def test_dynamic_batch_and_opset():
    model, x = _mlp()
    batch = torch.export.Dim("batch")
    onnx_model = export.to_onnx(model, (x,), dynamic_shapes=({0: batch},), opset=18)
    assert onnx_model.opset_imports[""] == 18
    assert not isinstance(onnx_model.graph.inputs[0].shape[0], int)
    parity = export.check_parity(model, onnx_model, (torch.randn(7, 16),))
    assert parity.per_output[0].shape == (7, 16) and parity.cosine >= COSINE


def _tag_a_new_node(gm: torch.fx.GraphModule) -> str:
    """Act like a pass: insert x * 2 after the GELU and record the pass name on it."""
    gelu = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.gelu.default)
    with gm.graph.inserting_after(gelu):
        scaled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (gelu, 2.0))
    gelu.replace_all_uses_with(scaled, delete_user_cb=lambda user: user is not scaled)
    scaled.meta[export.PASS_KEY] = "scale-test"
    gm.recompile()
    return scaled.name


def test_provenance_reaches_onnx_nodes():
    model, x = _mlp()
    gm = capture(model, (x,))
    _tag_a_new_node(gm)
    onnx_model = export.to_onnx(gm, (x,))
    tagged = [n for n in onnx_model.graph if export.PASS_KEY in n.metadata_props]
    assert [(n.op_type, n.metadata_props[export.PASS_KEY]) for n in tagged] == [
        ("Mul", "scale-test")
    ]
    # The export computes the modified graph, which is 2x the eager model's GELU.
    assert export.check_parity(gm, onnx_model, (x,)).cosine >= COSINE
    assert export.check_parity(model, onnx_model, (x,)).max_abs > 1e-3


def test_no_tags_without_passes():
    model, x = _mlp()
    onnx_model = export.to_onnx(capture(model, (x,)), (x,))
    assert not any(export.PASS_KEY in n.metadata_props for n in onnx_model.graph)


@torch.library.custom_op("graphpress_export_test::mystery", mutates_args=())
def _mystery(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@_mystery.register_fake
def _(x):
    return torch.empty_like(x)


class _UsesMystery(nn.Module):
    def forward(self, x):
        return _mystery(x) + 1


@pytest.mark.parametrize(
    ("model", "args", "expected"),
    [
        (_UsesMystery(), (torch.randn(2, 3),), "graphpress_export_test.mystery"),
        (nn.Linear(8, 4), (torch.randn(2, 3),), "torch.export"),
        ("not a module", (), "nn.Module"),
    ],
    ids=["op-without-onnx-translation", "wrong-input-shape", "not-a-module"],
)
def test_export_failures_are_one_readable_line(model, args, expected):
    with pytest.raises(ExportError) as info:
        export.to_onnx(model, args)
    message = str(info.value)
    assert expected in message and "\n" not in message and "\x1b" not in message
    assert len(message) < 900


def test_bert_matches_eager(bert):
    assert [v.name for v in bert.onnx.graph.inputs] == ["input_ids", "attention_mask"]
    other = bert.tokenizer(
        [
            "Return a new list containing all items from the iterable in ascending order.",
            "Remove and return an arbitrary element.",
            "Compile a regular expression pattern, returning a Pattern object.",
        ],
        padding=True,
        return_tensors="pt",
    )
    other = {"input_ids": other["input_ids"], "attention_mask": other["attention_mask"]}
    assert other["input_ids"].shape != bert.inputs["input_ids"].shape  # dynamic batch and length
    for inputs in (bert.inputs, other):
        parity = export.check_parity(bert.eager, bert.onnx, inputs)
        assert len(parity.per_output) == 2  # last_hidden_state, pooler_output
        assert parity.cosine >= COSINE and parity.max_rel < 1e-4, str(parity)
    # The largest differences sit on padding positions (masked out, float32 summation order);
    # on real tokens ORT and eager agree to float32 rounding.
    got = export.session(bert.onnx).run(other)[0]
    with torch.no_grad():
        ref = bert.eager(**other).last_hidden_state.numpy()
    real = other["attention_mask"].numpy().astype(bool)
    assert np.abs(got - ref)[real].max() < 2e-5


def test_llama_matches_eager(llama):
    parity = export.check_parity(llama.eager, llama.onnx, llama.inputs)
    assert [o.shape for o in parity.per_output] == [(2, 12, 256)]  # logits only
    assert parity.cosine >= COSINE and parity.max_abs < 1e-4, str(parity)


def test_save_is_graph_save():
    assert export.save is graph_io.save


def test_bert_saved_with_external_data_runs_from_disk(bert, tmp_path):
    path = export.save(bert.onnx, tmp_path / "bert.onnx", external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert.onnx", "bert.onnx.data"]
    assert path.stat().st_size < 1 << 20 < (tmp_path / "bert.onnx.data").stat().st_size
    loaded = load(path)
    lazy = [v.const_value for v in loaded.graph.initializers.values()]
    assert any(isinstance(t, ir.ExternalTensor) for t in lazy)
    for runnable in (path, loaded):  # by path, and an in-memory model with lazy tensors
        parity = export.check_parity(bert.eager, runnable, bert.inputs)
        assert parity.cosine >= COSINE and parity.max_abs < 1e-4, str(parity)


def _big_model(count: int) -> ir.Model:
    def initializer(name: str, array: np.ndarray) -> ir.Value:
        return ir.Value(
            name=name,
            const_value=ir.tensor(array, name=name),
            type=ir.TensorType(ir.DataType.FLOAT),
            shape=ir.Shape([count]),
        )

    a = initializer("zeros", np.zeros(count, np.float32))
    b = initializer("ones", np.ones(count, np.float32))
    node = ir.Node("", "Add", [a, b], num_outputs=1)
    out = node.outputs[0]
    out.name, out.type, out.shape = "y", ir.TensorType(ir.DataType.FLOAT), ir.Shape([count])
    graph = ir.Graph(
        [], [out], nodes=[node], initializers=[a, b], opset_imports={"": 18}, name="big"
    )
    return ir.Model(graph, ir_version=10)


@pytest.mark.slow
def test_model_over_2gb_saves_with_external_data_and_loads_lazily():
    count = 275_000_000  # 1.1 GB of float32 each, 2.2 GB in all
    folder = Path(tempfile.mkdtemp(prefix="graphpress-big-"))
    try:
        model = _big_model(count)
        path = export.save(model, folder / "big.onnx")  # default: external data past 1 GiB
        del model
        assert sorted(p.name for p in folder.iterdir()) == ["big.onnx", "big.onnx.data"]
        assert path.stat().st_size < 4096
        assert (folder / "big.onnx.data").stat().st_size == 2 * 4 * count
        loaded = load(path)
        zeros = loaded.graph.initializers["zeros"].const_value
        ones = loaded.graph.initializers["ones"].const_value
        assert isinstance(zeros, ir.ExternalTensor) and isinstance(ones, ir.ExternalTensor)
        z, o = zeros.numpy(), ones.numpy()  # memory-mapped
        assert z.shape == o.shape == (count,)
        assert z.min() == z.max() == 0.0 and o.min() == o.max() == 1.0
        del z, o, zeros, ones, loaded
    finally:
        shutil.rmtree(folder)


def test_debug_metadata_is_dropped_unless_asked_for():
    from graphpress.export.onnx import DEBUG_METADATA_KEYS

    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    x = torch.randn(2, 4)

    def keys(model):
        return {k for node in model.graph for k in node.metadata_props}

    lean, debug = export.to_onnx(module, (x,)), export.to_onnx(module, (x,), debug_metadata=True)
    assert not keys(lean) & set(DEBUG_METADATA_KEYS)
    assert "pkg.torch.onnx.stack_trace" in keys(debug)
    assert "namespace" in keys(lean)  # kept: readable names and provenance
