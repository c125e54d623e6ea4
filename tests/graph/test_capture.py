"""graph.capture: real models, symbolic_trace re-capture, readable failures, caller untouched."""

from __future__ import annotations

import pytest
import torch
from torch import fx
from torch.utils._pytree import tree_leaves

from graphpress.graph import CaptureError, capture, clone, is_canonical_fx, kind
from graphpress.graph.analysis import fx_tensor_attrs


def _max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(tree_leaves(a), tree_leaves(b)))


def test_capture_minilm_matches_eager(minilm):
    model, inputs = minilm
    gm = capture(model, (), inputs)
    assert kind(gm) == "fx" and is_canonical_fx(gm)
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert "aten.linear.default" in targets
    with torch.inference_mode():
        assert _max_diff(gm(**inputs), model(**inputs)) < 1e-5


def test_capture_llama_decoder_matches_eager(llama_model):
    model, inputs = llama_model
    gm = capture(model, (), inputs)
    assert is_canonical_fx(gm)
    with torch.inference_mode():
        assert _max_diff(gm(**inputs).logits, model(**inputs).logits) < 1e-5


def test_capture_restores_training_mode():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5)).train()
    capture(model, (torch.randn(2, 4),))
    assert model.training


class _Branchy(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


def test_capture_failure_names_the_op_and_line():
    with pytest.raises(CaptureError) as info:
        capture(_Branchy(), (torch.randn(3),))
    message = str(info.value)
    assert "x.sum()" in message and "test_capture.py" in message
    assert "dynamic_shapes" in message  # says what to do


def test_capture_rejects_non_module():
    with pytest.raises(CaptureError, match="nn.Module"):
        capture(lambda x: x, (torch.randn(2),))


def test_symbolic_trace_graph_module_is_recaptured():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    traced = fx.symbolic_trace(model)
    assert not is_canonical_fx(traced)
    gm = capture(traced, (torch.randn(3, 4),))
    assert is_canonical_fx(gm)
    assert all(n.op != "call_module" or n.target == "_guards_fn" for n in gm.graph.nodes)
    x = torch.randn(3, 4)
    torch.testing.assert_close(gm(x), model(x))


def test_clone_shares_tensors_but_not_structure():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    gm = capture(model, (torch.randn(2, 4),))
    copy = clone(gm)
    assert copy.graph is not gm.graph
    original_tensors, copied_tensors = fx_tensor_attrs(gm), fx_tensor_attrs(copy)
    assert original_tensors.keys() == copied_tensors.keys() and original_tensors
    for name, tensor in original_tensors.items():
        assert copied_tensors[name] is tensor
    relu = next(n for n in copy.graph.nodes if "relu" in str(n.target))
    relu.replace_all_uses_with(relu.args[0])
    copy.graph.erase_node(relu)
    copy.recompile()
    x = -torch.ones(2, 4)
    assert (gm(x) >= 0).all()  # the original still has its ReLU
    assert len(gm.graph.nodes) == len(copy.graph.nodes) + 1


def test_exported_program_module_is_recaptured():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    x = torch.randn(2, 4)
    raw = torch.export.export(model, (x,)).module()  # refuses eval()/train()
    gm = capture(raw, (x,))
    assert is_canonical_fx(gm)
    torch.testing.assert_close(gm(x), model(x))
