"""Tiny models (seeded, no download) and partitioning helpers shared by the distributed tests.

Imported by path from the test modules (``sys.path`` gets this folder), so the spawned ranks,
which re-import a test module to find its rank function, import it the same way.
"""

from __future__ import annotations

import os

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOLERANCE = 1e-5


class Logits(nn.Module):
    """A causal LM called without a KV cache, returning its logits."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits


def mlp() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.GELU(),
                          nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
    return model.eval(), (torch.randn(4, 8),)


def bert() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=32)
    ids = torch.randint(0, 100, (4, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # a padded row: the mask is read in every layer, so it crosses stages
    return transformers.BertModel(config).eval(), (ids, mask)


def llama() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """LLaMA-style decoder: GQA attention (4 query, 2 KV heads), RoPE, SwiGLU, tied LM head."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=100, max_position_embeddings=32)
    ids = torch.randint(0, 100, (4, 10), generator=torch.Generator().manual_seed(1))
    return Logits(transformers.LlamaForCausalLM(config)).eval(), (ids,)


MODELS = {"mlp": mlp, "bert": bert, "llama": llama}


def leaves(value) -> list[torch.Tensor]:
    """The tensors of a (possibly nested / ModelOutput) result, flattened in order."""
    return [v for v in torch.utils._pytree.tree_leaves(value) if isinstance(v, torch.Tensor)]


def capture_dynamic(name: str):
    """``(model, inputs, gm, batch symbol)``: the model captured with a dynamic batch dim."""
    from graphpress.graph import capture

    model, inputs = MODELS[name]()
    batch = torch.export.Dim("batch", min=1, max=64)
    gm = capture(model, inputs, dynamic_shapes=tuple({0: batch} for _ in inputs))
    symbol = str(next(n for n in gm.graph.nodes if n.op == "placeholder").meta["val"].shape[0])
    return model, inputs, gm, symbol


def staged(name: str, stages: int):
    """``(gm, stages, inputs)``: a dynamic-batch capture partitioned by FLOPs, and its stages.

    The pass only annotates, so ``gm`` still computes the single-process reference.
    """
    from graphpress.export.stages import split_stages
    from graphpress.passes.partition import PartitionPipeline

    _, inputs, gm, symbol = capture_dynamic(name)
    result = PartitionPipeline(stages=stages, dims=(f"{symbol}={inputs[0].shape[0]}",))(gm)
    assert result.modified
    return gm, split_stages(gm), inputs


def static_staged(stages: int):
    """``(stages, inputs)``: the MLP captured with its batch of 4 baked in, then split."""
    from graphpress.export.stages import split_stages
    from graphpress.graph import capture
    from graphpress.passes.partition import PartitionPipeline

    model, inputs = mlp()
    gm = capture(model, inputs)
    PartitionPipeline(stages=stages)(gm)
    return split_stages(gm), inputs


def onnx_bytes(name: str) -> tuple[bytes, dict]:
    """The model exported to ONNX with a dynamic ``batch`` dim, serialized; and its feed."""
    import onnx_ir as ir

    from graphpress.export import to_onnx

    model, inputs = MODELS[name]()
    exported = to_onnx(model, inputs,
                       dynamic_shapes=tuple({0: torch.export.Dim("batch")} for _ in inputs))
    feed = {v.name: x.numpy() for v, x in zip(exported.graph.inputs, inputs)}
    return ir.serde.serialize_model(exported).SerializeToString(), feed


def load_onnx(data: bytes):
    import onnx
    import onnx_ir as ir

    return ir.serde.deserialize_model(onnx.ModelProto.FromString(data))
