"""FX adapter of the channel view: aten ops of a ``torch.export`` graph as normalised ops.

Only reads: op names, argument positions, ``node.meta["val"]`` shapes and ``get_attr`` tensor
shapes. A ``t``/``permute``/``transpose`` of a ``get_attr`` is looked through (its consumers
see a :class:`Const` with a permutation and the transpose node as reader); quantized weights
and activation fake-quantization are normalised by :mod:`._channel_fx_quant`.
"""

from __future__ import annotations

import torch
from torch import fx
from torch.utils._pytree import tree_leaves

from ._channel_fx_quant import DEQUANTIZE, fx_dequantized, fx_quant_op, nbits_chain
from ._channel_view import Const, Entry, Op, View
from .analysis import op_name
from .fx import get_tensor

__all__ = ["fx_view"]

_UNARY = {f"aten.{n}" for n in (
    "relu", "relu_", "gelu", "silu", "sigmoid", "tanh", "neg", "abs", "exp", "log", "sqrt",
    "rsqrt", "erf", "dropout", "clone", "alias", "detach", "contiguous", "_to_copy", "to",
    "type_as", "hardtanh", "clamp", "leaky_relu", "elu", "softplus", "hardswish", "hardsigmoid",
    "mish", "relu6", "reciprocal", "square", "sin", "cos", "lift_fresh_copy", "celu", "selu",
    "logical_not", "bitwise_not", "sign", "floor", "ceil", "round", "trunc", "isnan", "isinf",
    "clamp_min", "clamp_max", "gelu_", "silu_", "native_dropout", "zeros_like", "ones_like",
    "empty_like", "full_like", "rand_like", "randn_like")}  # *_like follow their input's shape
_BINARY = {f"aten.{n}" for n in (
    "add", "sub", "mul", "div", "pow", "maximum", "minimum", "where", "eq", "ne", "lt", "le", "gt",
    "ge", "__and__", "__or__", "logical_and", "logical_or", "masked_fill", "rsub", "bitwise_and",
    "bitwise_or", "fmod", "remainder")}
_SHAPE_ONLY = {"aten.sym_size", "aten.size", "aten.sym_numel", "aten.dim"}
_IGNORE = {"aten._assert_tensor_metadata", "aten._assert_scalar", "aten.sym_constrain_range_for_size",
           "aten._assert_async", "aten.sym_constrain_range"}
_TRANSPOSES = {"aten.t", "aten.permute", "aten.transpose"}
_REDUCE = {"aten.mean": True, "aten.sum": False, "aten.amax": False, "aten.amin": False,
           "aten.var": True, "aten.std": True, "aten.prod": False}  # True: a norm statistic


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _shape(value) -> tuple | None:
    if not isinstance(value, torch.Tensor):
        return None
    return tuple(d if isinstance(d, int) else str(d) for d in value.shape)


def _perm(node: fx.Node) -> tuple[int, ...] | None:
    """The permutation of a transpose-like node (output axis j = input axis perm[j])."""
    shape = _shape(node.meta.get("val"))
    if shape is None:
        return None
    rank, name = len(shape), op_name(node)
    if name == "aten.t":
        return (1, 0) if rank == 2 else tuple(range(rank))
    if name == "aten.permute":
        return tuple(int(d) % rank for d in node.args[1])
    d0, d1 = (int(d) % rank for d in node.args[1:3])
    perm = list(range(rank))
    perm[d0], perm[d1] = d1, d0
    return tuple(perm)


class _Builder:
    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.shapes: dict[str, tuple | None] = {}

    def const(self, node: fx.Node, reader: str) -> Const | None:
        """The constant ``node`` reads, if it is a ``get_attr`` or a transpose of one."""
        perm: tuple[int, ...] | None = None
        if node.op == "call_function" and op_name(node) in DEQUANTIZE:
            return fx_dequantized(self.gm, node, op_name(node))
        chain = nbits_chain(self.gm, node) if node.op == "call_function" else None
        if chain is not None:
            return Const(chain.codes.target, reader, (chain.n, chain.k), (0, 1), (), "nbits")
        if node.op == "call_function" and op_name(node) in _TRANSPOSES and isinstance(
                node.args[0], fx.Node) and node.args[0].op == "get_attr":
            perm, reader, node = _perm(node), node.name, node.args[0]
        tensor = get_tensor(self.gm, node) if node.op == "get_attr" else None
        if tensor is None:
            return None
        perm = perm or tuple(range(tensor.dim()))
        return Const(node.target, reader, tuple(tensor.shape[p] for p in perm), perm)

    def inp(self, arg, reader: str):
        if not isinstance(arg, fx.Node):
            return None
        return self.const(arg, reader) or arg.name

    def entries(self, node: fx.Node, sizes) -> list[Entry]:
        found = []
        for i, v in enumerate(sizes):
            follow = None
            if isinstance(v, fx.Node) and op_name(v) == "aten.sym_size" and isinstance(
                    v.args[0], fx.Node):  # the size of another value's axis, read at run time
                follow = (v.args[0].name, int(v.args[1]))
            found.append(Entry(int(v) if isinstance(v, int) else None, node.name, "", i, follow))
        return found


def _swap(c: Const) -> Const:
    return c.reversed()


def _convert(b: _Builder, node: fx.Node, name: str) -> tuple[str, list, dict]:  # noqa: C901
    n, i = node.name, b.inp
    quantized = fx_quant_op(node, name, [i(a, n) for a in node.args[:1]])
    if quantized is not None:
        return quantized
    if name in _UNARY:
        return "unary", [i(node.args[0], n)], {}
    if name in _BINARY:
        ins = [i(a, n) for a in node.args if isinstance(a, fx.Node)]
        return ("binary" if len(ins) > 1 else "unary"), ins, {"add": name in ("aten.add", "aten.sub")}
    if name == "aten.linear":
        return "linear", [i(node.args[0], n), i(node.args[1], n), i(_arg(node, 2, "bias"), n)], {}
    if name in ("aten.addmm", "aten.mm", "aten.matmul", "aten.bmm"):
        xi = 1 if name == "aten.addmm" else 0
        x, w = i(node.args[xi], n), i(node.args[xi + 1], n)
        bias = i(node.args[0], n) if name == "aten.addmm" else None
        if isinstance(w, Const) and len(w.shape) == 2 and isinstance(x, str) and (
                node.kwargs.get("beta", 1) == 1 and node.kwargs.get("alpha", 1) == 1):
            return "linear", [x, _swap(w), bias], {}
        if name == "aten.addmm" or not isinstance(x, str) or not isinstance(w, str):
            return "other", [x, w], {}
        return "matmul", [x, w], {}
    if name == "aten.scaled_dot_product_attention":
        return "sdpa", [i(a, n) for a in (node.args[:3])] + [i(_arg(node, 3, "attn_mask"), n)], {}
    if name in ("aten.view", "aten.reshape", "aten._unsafe_view"):
        return "reshape", [i(node.args[0], n)], {"target": b.entries(node, node.args[1])}
    if name in ("aten.flatten", "aten.unsqueeze", "aten.squeeze", "aten.unflatten"):
        return "reshape", [i(node.args[0], n)], {"target": None}
    if name in _TRANSPOSES:
        return "transpose", [i(node.args[0], n)], {"perm": _perm(node)}
    if name == "aten.expand":
        return "expand", [i(node.args[0], n)], {"target": b.entries(node, node.args[1])}
    if name == "aten.cat":
        return "concat", [i(a, n) for a in node.args[0]], {"axis": int(_arg(node, 1, "dim", 0))}
    if name in ("aten.split", "aten.split_with_sizes", "aten.chunk"):
        sizes = b.entries(node, node.args[1]) if name == "aten.split_with_sizes" else None
        return "split", [i(node.args[0], n)], {"axis": int(_arg(node, 2, "dim", 0)), "sizes": sizes}
    if name == "aten.slice":
        args = [_arg(node, k, key, d) for k, key, d in
                ((1, "dim", 0), (2, "start", None), (3, "end", None), (4, "step", 1))]
        ok = all(a is None or isinstance(a, int) for a in args)
        return "slice", [i(node.args[0], n)], dict(zip(("axis", "start", "end", "step"), args)) \
            if ok else {"axis": args[0], "start": None, "end": None, "step": None}
    if name in ("aten.select", "aten.unbind"):
        return "select", [i(node.args[0], n)], {"axis": int(_arg(node, 1, "dim", 0))}
    if name == "aten.index_select":
        return "gather", [i(node.args[0], n), i(node.args[2], n)], {"axis": int(node.args[1])}
    if name == "aten.embedding":
        return "embedding", [i(node.args[0], n), i(node.args[1], n)], {}
    if name in ("aten.layer_norm", "aten.native_layer_norm"):
        axes = list(range(-len(node.args[1]), 0))
        return "layernorm", [i(node.args[0], n)] + [i(_arg(node, k, key), n) for k, key in
                                                   ((2, "weight"), (3, "bias"))], {
            "axes": axes, "shape": b.entries(node, node.args[1])}  # normalized_shape scales
    if name in ("aten._native_batch_norm_legit_no_training", "aten.batch_norm",
                "aten._native_batch_norm_legit", "aten.instance_norm"):
        return "batchnorm", [i(a, n) for a in node.args[:5]], {}
    if name == "aten.group_norm":
        return "groupnorm", [i(node.args[0], n), i(_arg(node, 2, "weight"), n),
                             i(_arg(node, 3, "bias"), n)], {}
    if name in ("aten.conv1d", "aten.conv2d", "aten.conv3d", "aten.convolution",
                "aten.conv_transpose1d", "aten.conv_transpose2d", "aten.conv_transpose3d"):
        transposed = "transpose" in name or (name == "aten.convolution" and bool(node.args[6]))
        gi = {"aten.convolution": 8}.get(name, 6 if "transpose" in name else 6)
        return "conv", [i(a, n) for a in node.args[:3]], {
            "groups": int(_arg(node, gi, "groups", 1)), "transposed": transposed}
    if name.startswith(("aten.max_pool", "aten.avg_pool", "aten.adaptive_avg_pool",
                        "aten.adaptive_max_pool", "aten._adaptive_avg_pool")):
        return "pool", [i(node.args[0], n)], {}
    if name in _REDUCE:
        dims = _arg(node, 1, "dim", None)
        keep = bool(_arg(node, 2, "keepdim", False)) if name not in ("aten.var", "aten.std") \
            else bool(node.kwargs.get("keepdim", False))
        axes = None if dims is None or dims == [] else (
            [int(dims)] if isinstance(dims, int) else [int(d) for d in dims])
        return "reduce", [i(node.args[0], n)], {"axes": axes, "keepdim": keep,
                                                "mean": _REDUCE[name], "what": name}
    if name in ("aten.softmax", "aten._softmax", "aten.log_softmax", "aten._log_softmax"):
        return "softmax", [i(node.args[0], n)], {"axis": int(node.args[1])}
    if name in _SHAPE_ONLY:
        return "shape", [], {}
    if name in _IGNORE:
        return "ignore", [], {}
    return "other", [i(a, n) for a in tree_leaves((node.args, node.kwargs))], {}


def fx_view(gm: fx.GraphModule) -> View:
    """The normalised channel view of an aten-level FX graph."""
    b = _Builder(gm)
    ops: list[Op] = []
    inputs: list[str] = []
    outputs: list[str] = []
    multi: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            inputs.append(node.name)
            b.shapes[node.name] = _shape(node.meta.get("val"))
        elif node.op == "output":
            outputs.extend(a.name for a in tree_leaves(node.args) if isinstance(a, fx.Node))
        elif node.op == "call_function":
            name = op_name(node)
            if name in _TRANSPOSES and isinstance(node.args[0], fx.Node) and (
                    node.args[0].op == "get_attr"):
                continue  # looked through by its consumers
            if name in DEQUANTIZE and fx_dequantized(gm, node, name) is not None:
                continue  # so is the dequantization of a constant
            val = node.meta.get("val")
            if name == "getitem" and node.args[0].name in multi:
                key = f"{node.args[0].name}#{node.args[1]}"
                b.shapes[node.name] = _shape(val)
                ops.append(Op(node.name, "unary", [key], [node.name], {}, name))
                continue
            kind, ins, attrs = _convert(b, node, name)
            if isinstance(val, (tuple, list)):
                outs = [f"{node.name}#{k}" for k in range(len(val))]
                multi[node.name] = len(val)
                for key, item in zip(outs, val):
                    b.shapes[key] = _shape(item)
            else:
                # an element-wise op without an example value (quantization passes add
                # fake-quant nodes without one) still has an output: its shape follows
                elementwise = val is None and kind == "unary"
                outs = [node.name] if isinstance(val, torch.Tensor) or elementwise else []
                b.shapes[node.name] = _shape(val)
            if kind not in ("ignore", "shape", "range") and not outs and (
                    not isinstance(val, torch.Tensor)):
                kind = "ignore" if val is None or isinstance(val, (int, float, bool)) else kind
            ops.append(Op(node.name, kind, ins, outs, attrs, name))
        elif node.op in ("call_module", "call_method"):
            if node.target == "_guards_fn":
                continue
            ins = [b.inp(a, node.name) for a in tree_leaves((node.args, node.kwargs))]
            ops.append(Op(node.name, "other", ins, [node.name], {}, op_name(node)))
            b.shapes[node.name] = _shape(node.meta.get("val"))
    order = {node.name: k for k, node in enumerate(gm.graph.nodes)}
    return View(ops, b.shapes, inputs, outputs, order)
