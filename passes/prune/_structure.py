"""What ``fold-pruned`` needs to know about a graph beyond its channel groups.

* :func:`zero_units`: which units of a tensor's channel window are all zero (IR-free).
* :func:`attention_role`: whether a projection feeds attention as the value (``"v"``) or as
  query/key (``"qk"``): the attention output of a head whose value projection is zero is the
  value bias (softmax rows sum to 1), while a zero query or key only makes the attention
  uniform, which still mixes the values, so such a head is NOT removable.
* :func:`example_values`: a synthetic input (floats from a fixed seed, integers 1, booleans
  true; symbolic sizes 2 or the recorded hint) run through the graph to read the constant
  channels at the consumers' inputs. Constants do not depend on the input; the reading is
  checked to be constant over every position before it is used.
* :func:`materialize_fx`: constant weight expressions (``torch.nn.utils.prune`` makes
  ``weight = weight_orig * weight_mask``, which ``torch.export`` records as ``mul``/``to`` of two
  ``get_attr``) become one ``get_attr`` so the channel analysis sees a weight.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import fx

from graphpress.graph.analysis import op_name
from graphpress.graph.fx import add_tensor, get_tensor, mark

from .._collect import collect
from .._rewrite import remove_dead_fx

__all__ = ["zero_units", "attention_role", "example_values", "materialize_fx", "CROSS_CHANNEL"]

logger = logging.getLogger(__name__)

#: Norms that mix channels: a zero channel still counts in their statistics.
CROSS_CHANNEL = {"aten.layer_norm", "aten.native_layer_norm", "aten.rms_norm", "aten.group_norm",
                 "aten.native_group_norm", "LayerNormalization", "GroupNormalization",
                 "RMSNormalization", "com.microsoft::SkipLayerNormalization",
                 "com.microsoft::SimplifiedLayerNormalization", "SimplifiedLayerNormalization",
                 "aten.mean", "aten.var", "aten.var_mean", "ReduceMean"}  # keep-dim statistics
_PASS = {"aten.view", "aten.reshape", "aten._unsafe_view", "aten.transpose", "aten.permute",
         "aten.contiguous", "aten.clone", "aten.add", "aten.mul", "aten.div", "aten.expand",
         "aten.to", "aten._to_copy", "aten.unsqueeze", "aten.squeeze", "aten.dropout",
         "Reshape", "Transpose", "Add", "Mul", "Div", "Cast", "Identity", "Squeeze", "Unsqueeze",
         "Dropout"}
_SOFTMAX_PATH = _PASS | {"aten.where", "aten.masked_fill", "Where", "IsNaN", "aten.isnan"}
_SDPA = {"aten.scaled_dot_product_attention", "com.microsoft::MultiHeadAttention",
         "com.microsoft::Attention", "Attention"}
_MATMUL = {"aten.matmul", "aten.bmm", "MatMul"}


def zero_units(array: np.ndarray, axis: int, offset: int, units: int, unit: int) -> np.ndarray:
    """``[units]`` booleans: every element of unit ``u``'s slice along ``axis`` is zero."""
    x = np.moveaxis(np.asarray(array), axis, 0)[offset: offset + units * unit]
    return ~np.any(x.reshape(units, unit, -1) != 0, axis=(1, 2))


def _position(user, node) -> int:
    if isinstance(user, fx.Node):
        return next((i for i, a in enumerate(user.args) if a is node), -1)
    return next((i for i, v in enumerate(user.inputs) if v is not None and v.producer() is node),
                -1)


def _inputs(node) -> list:
    if isinstance(node, fx.Node):
        return node.all_input_nodes
    return [v.producer() for v in node.inputs if v is not None and v.producer() is not None]


def _from_softmax(node, depth: int = 12) -> bool:
    if node is None or depth == 0:
        return False
    name = op_name(node)
    if "softmax" in name.lower():
        return True
    return name in _SOFTMAX_PATH and any(_from_softmax(n, depth - 1) for n in _inputs(node))


def attention_role(node) -> str | None:
    """``"v"``, ``"qk"`` or ``None`` (no attention reached, or both) for a projection node."""
    roles, stack, seen = set(), [node], set()
    while stack and len(seen) < 64:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        users = current.users if isinstance(current, fx.Node) else [
            use.node for out in current.outputs for use in out.uses()]
        for user in users:
            name, index = op_name(user), _position(user, current)
            if name in _SDPA:
                roles.add("v" if index == 2 else "qk")
            elif name in _MATMUL:
                other = _inputs(user)
                first = user.args[0] if isinstance(user, fx.Node) else (
                    user.inputs[0].producer() if user.inputs[0] is not None else None)
                roles.add("v" if index == 1 and first in other and _from_softmax(first) else "qk")
            elif name in _PASS:
                stack.append(user)
    return roles.pop() if len(roles) == 1 else None


def _example_shape(shape, dynamic: int = 2) -> list[int]:
    dims = []
    for d in shape:
        if isinstance(d, int):
            dims.append(d)
        else:
            hint = getattr(getattr(d, "node", None), "hint", None)
            dims.append(int(hint) if isinstance(hint, int) else dynamic)
    return dims


def _example_array(shape: list[int], dtype: np.dtype, rng: np.random.Generator) -> np.ndarray:
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    if dtype == np.bool_:
        return np.ones(shape, bool)
    return np.ones(shape, dtype)


def example_values(graph, names: list[str]) -> dict[str, np.ndarray]:
    """The values ``names`` (FX node / ONNX value names) on one synthetic input."""
    rng = np.random.default_rng(0)
    found: dict[str, np.ndarray] = {}
    if isinstance(graph, fx.GraphModule):
        args = []
        for node in graph.graph.nodes:
            if node.op == "placeholder":
                val = node.meta.get("val")
                dtype = torch.empty(0, dtype=val.dtype).numpy().dtype
                args.append(torch.from_numpy(_example_array(_example_shape(val.shape), dtype, rng)))
        targets = set(names)

        class _Reader(fx.Interpreter):
            def run_node(self, node):
                value = super().run_node(node)
                if node.name in targets and isinstance(value, torch.Tensor):
                    found[node.name] = value.detach().float().numpy()
                return value

        with torch.no_grad():
            _Reader(graph).run(*args)
        return found
    feed = {v.name: _example_array(_example_shape(v.shape or []), v.dtype.numpy(), rng)
            for v in graph.graph.inputs}
    collect(graph, [feed], names, lambda n, a: found.__setitem__(n, np.asarray(a, np.float64)))
    return found


def materialize_fx(gm: fx.GraphModule, pass_name: str) -> int:
    """Replace weight/bias arguments computed from constants only by one new ``get_attr``."""
    cache: dict[fx.Node, torch.Tensor | None] = {}

    def value(node: fx.Node) -> torch.Tensor | None:
        if node not in cache:
            cache[node] = get_tensor(gm, node)
            target = node.target
            if cache[node] is None and node.op == "call_function" and isinstance(
                    target, torch._ops.OpOverload) and not node.is_impure() and (
                    not target._schema.is_mutable) and node.all_input_nodes:
                inputs = {n: value(n) for n in node.all_input_nodes}
                if all(t is not None for t in inputs.values()):
                    args, kwargs = fx.node.map_arg((node.args, node.kwargs), inputs.__getitem__)
                    with torch.no_grad():
                        out = target(*args, **kwargs)
                    cache[node] = out.detach().clone() if isinstance(out, torch.Tensor) else None
        return cache[node]

    done, stale = 0, []
    for node in list(gm.graph.nodes):
        if node.op in ("get_attr", "output") or value(node) is not None:
            continue  # constant itself: its reader decides
        for arg in list(node.all_input_nodes):
            if arg.op != "call_function" or op_name(node) == "aten._assert_tensor_metadata":
                continue
            tensor = value(arg)
            if tensor is None:
                continue
            origins = [n.target for n in arg.all_input_nodes if n.op == "get_attr"]
            origin = next((t.removesuffix("_orig") for t in origins if t.endswith("_orig")),
                          arg.name)
            with gm.graph.inserting_before(arg):
                const = mark(gm.graph.get_attr(add_tensor(gm, f"{origin}.foldpruned", tensor)),
                             pass_name)
            const.meta["val"] = arg.meta.get("val")
            arg.replace_all_uses_with(const)
            stale.append(arg)
            done += 1
    if not done:
        return 0
    remove_dead_fx(gm, stale)
    masks = []
    for node in list(gm.graph.nodes):  # asserts on the dtype of a mask nobody reads any more
        if op_name(node) == "aten._assert_tensor_metadata" and all(
                n.op == "get_attr" and set(n.users) == {node} for n in node.all_input_nodes):
            masks.extend(node.all_input_nodes)
            gm.graph.erase_node(node)
    remove_dead_fx(gm, masks)
    gm.recompile()
    return done
