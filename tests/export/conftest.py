"""Shared, expensive fixtures for the export tests: real BERT and a LLaMA-style decoder.

Each is captured and exported once per session; tests only read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch


@dataclass(frozen=True)
class Exported:
    eager: torch.nn.Module
    inputs: dict[str, Any]
    gm: torch.fx.GraphModule
    onnx: Any  # onnx_ir.Model
    tokenizer: Any = None


def _export(model: torch.nn.Module, inputs: dict[str, Any], **kw: Any) -> Exported:
    from graphpress.export import to_onnx
    from graphpress.graph import capture

    dynamic = kw.pop("dynamic_shapes", None)
    gm = capture(model, (), inputs, dynamic_shapes=dynamic)
    return Exported(model, inputs, gm, to_onnx(gm, (), inputs, dynamic_shapes=dynamic), **kw)


@pytest.fixture(scope="session")
def bert(minilm, minilm_tokenizer) -> Exported:
    """all-MiniLM-L6-v2 (real weights) captured and exported with dynamic batch and length."""
    model, inputs = minilm
    batch, seq = torch.export.Dim("batch", max=64), torch.export.Dim("seq", max=512)
    dynamic = {name: {0: batch, 1: seq} for name in inputs}
    return _export(model, inputs, dynamic_shapes=dynamic, tokenizer=minilm_tokenizer[1])


@pytest.fixture(scope="session")
def llama(llama_model) -> Exported:
    """The LLaMA-style decoder captured and exported."""
    model, inputs = llama_model
    return _export(model, inputs)
