"""Single-process simulation of tensor-parallel shards, and the small models the TP/SP tests
share (a BERT and a LLaMA-style decoder with GQA from transformers configs, random weights).

FX: every rank's module is interpreted node by node in lock step; at a functional collective
all ranks stop, the collective is computed over their values (``all_reduce``: the sum, or the
min/max when the op names one;
``all_gather_into_tensor``: concatenation along dim 0; ``reduce_scatter_tensor``: chunk ``r``
of the sum for rank ``r``) and each rank continues with its result (``wait_tensor`` is the
identity). ONNX: segment ``k`` of every rank runs in ONNX Runtime, then
``collectives[k]`` is applied over the ranks' values, then segment ``k + 1`` runs.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch
from torch import fx
from torch.utils import _pytree as pytree

_c10d = torch.ops._c10d_functional
_COLLECTIVES = (_c10d.all_reduce.default, _c10d.all_gather_into_tensor.default,
                _c10d.reduce_scatter_tensor.default)


def bert(layers: int = 2):
    """``(model, args, kwargs)``: BERT, hidden 64, 4 heads, FFN 128, random biases/norms."""
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=layers,
                                     num_attention_heads=4, intermediate_size=128,
                                     vocab_size=100, max_position_embeddings=32)
    model = transformers.BertModel(config).eval()
    with torch.no_grad():  # non-trivial biases and norms (zeros/ones would hide slicing bugs)
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.uniform_(-0.5, 0.5)
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    return model, (ids,), {"attention_mask": torch.ones(2, 8, dtype=torch.long)}


def llama(layers: int = 2):
    """``(model, args, kwargs)``: LLaMA, hidden 64, 4 query / 2 kv heads, tied embeddings."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=layers, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=256,
                                      max_position_embeddings=64, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    return model, (ids,), {"use_cache": False}


class Positional(torch.nn.Module):
    """A transformers model called with positional inputs only, returning its first output
    (FX calibration feeds batches as positional tuples)."""

    def __init__(self, model, **fixed) -> None:
        super().__init__()
        self.model, self.fixed = model, fixed

    def forward(self, *args):
        return self.model(*args, **self.fixed)[0]


def positional(make, layers: int = 2):
    """``(module, args)`` of ``bert``/``llama`` with every input positional."""
    model, args, kwargs = make(layers)
    if "attention_mask" in kwargs:
        return Positional(model), (*args, kwargs["attention_mask"])
    return Positional(model, **kwargs), tuple(args)


def flat_inputs(args, kwargs) -> list:
    return pytree.tree_leaves((args, kwargs))


def reference(gm: fx.GraphModule, args, kwargs) -> list[torch.Tensor]:
    with torch.no_grad():
        return [t.detach() for t in pytree.tree_leaves(gm(*args, **kwargs))]


def _steps(gm: fx.GraphModule, flat):
    interp = fx.Interpreter(gm)
    interp.env, interp.args_iter = {}, iter(flat)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _COLLECTIVES:
            op = node.args[1] if node.target is _c10d.all_reduce.default else "sum"
            interp.env[node] = yield node.target, interp.env[node.args[0]], op
        elif node.op == "call_function" and node.target is _c10d.wait_tensor.default:
            interp.env[node] = interp.env[node.args[0]]
        elif node.op == "output":
            return pytree.tree_leaves(interp.fetch_args_kwargs_from_env(node)[0])
        else:
            interp.env[node] = interp.run_node(node)


def run_fx_ranks(modules, flat, *, per_rank: bool = False) -> tuple[list[list], int]:
    """Every rank's outputs, and how many collectives ran (per rank). ``flat``: the inputs
    of every rank, or (``per_rank``) one input list per rank."""
    gens = [_steps(gm, flat[r] if per_rank else flat) for r, gm in enumerate(modules)]
    count = 0
    with torch.no_grad():
        messages = [next(g) for g in gens]
        while True:
            targets = {(m[0], m[2]) for m in messages}
            assert len(targets) == 1, f"ranks disagree on the collective: {targets}"
            (target, op), values = targets.pop(), [m[1] for m in messages]
            if target is _c10d.all_gather_into_tensor.default:
                results = [torch.cat(values)] * len(gens)
            elif target is _c10d.all_reduce.default and op in ("min", "max"):
                stacked = torch.stack(values)
                results = [stacked.amin(0) if op == "min" else stacked.amax(0)] * len(gens)
            elif target is _c10d.all_reduce.default:
                results = [sum(values)] * len(gens)
            else:  # reduce-scatter: rank r keeps chunk r of the sum along dim 0
                results = list(sum(values).chunk(len(gens)))
            count += 1
            outputs, messages = [], []
            for g, result in zip(gens, results):
                try:
                    messages.append(g.send(result.clone()))
                except StopIteration as stop:
                    outputs.append(stop.value)
            if outputs:
                assert len(outputs) == len(gens)
                return outputs, count


def session(model: ir.Model) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def run_onnx_ranks(shards, feeds: dict[str, np.ndarray]) -> list[list[np.ndarray]]:
    """Run every rank's segments in ORT with the collectives computed over the ranks."""
    tables = [dict(feeds) for _ in shards]
    segments = len(shards[0].segments)
    for k in range(segments):
        for shard, table in zip(shards, tables):
            stage = shard.segments[k]
            names = [o.name for o in stage.outputs]
            values = session(stage.graph).run(names, {i.name: table[i.name] for i in stage.inputs})
            table.update(zip(names, values))
        if k < segments - 1:
            collective = shards[0].collectives[k]
            assert all(s.collectives[k] == collective for s in shards)
            for name in collective.values:
                parts = [t[name] for t in tables]
                result = (sum(parts) if collective.kind == "all_reduce"
                          else np.concatenate(parts, axis=collective.dim))
                for table in tables:
                    table[name] = result
    return [[t[o.name] for o in s.segments[-1].outputs] for s, t in zip(shards, tables)]


def onnx_feeds(model: ir.Model, flat) -> dict[str, np.ndarray]:
    tensors = [x for x in flat if isinstance(x, torch.Tensor)]
    return {i.name: t.numpy() for i, t in zip(model.graph.inputs, tensors)}
