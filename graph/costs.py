"""Per-node cost model of a graph: FLOPs, activation bytes, constant bytes, and liveness.

:func:`node_costs` reads shapes the graph already carries (FX ``node.meta["val"]``; ONNX
``value.shape``/``value.type``, completed by ONNX shape inference on a copy when missing) and
returns a :class:`CostTable`: one :class:`NodeCost` per operator node in graph order.

FLOPs (a multiply-add counts 2; rules in ``_flops.py``):

1. matrix products (``aten.linear/addmm/mm/bmm/matmul``; ONNX ``MatMul``, ``Gemm``,
   ``MatMulInteger``, ``QLinearMatMul``, ``MatMulNBits``, ``DynamicQuantizeMatMul``,
   ``MatMulIntegerToFloat``): ``2·numel(out)·K`` (= 2·M·N·K); a bias add is not counted;
2. convolution: ``2·numel(out)·(Cin/groups)·prod(kernel)`` (transposed: ``numel(in)`` and
   ``Cout/groups``);
3. attention (``aten.scaled_dot_product_attention``; ``com.microsoft`` ``MultiHeadAttention``,
   ``GroupQueryAttention``, ``Attention``): ``2·B·H·Sq·Sk·(D + Dv)`` (= 4·B·H·Sq·Sk·D) plus
   ``B·H·Sq·Sk`` for the softmax; contrib ``Attention`` adds its QKV projection;
4. normalisations (layer/batch/group/instance/RMS norm, ``SkipLayerNormalization``...): 4 FLOPs
   per output element (mean, variance, normalise, scale-shift);
5. reductions: ``numel(input)``; pooling: ``numel(out)·prod(kernel)``;
6. views, shape arithmetic, copies, casts, gathers (embeddings included), concatenation and
   tensor creation: 0;
7. everything else (elementwise, activations, softmax, ``QuantizeLinear``/``DequantizeLinear``):
   ``numel(out)``.

Bytes: a tensor value holds ``numel·itemsize`` (packed 4-bit: half a byte per element).
Constants are counted at their real storage size (int8 1 B, packed int4 0.5 B, the uint8
codes, scales and zero points of ``MatMulNBits`` as the separate initializers they are), each
tensor once: an FX tensor bound to several attributes (tied weights) is named by the first
``get_attr`` target that reads it. :attr:`CostTable.aliases` records outputs that share their
input's storage (FX: the fake tensors share storage, e.g. ``view``, ``transpose``, ``expand``,
a no-op ``to``; ONNX: ``Reshape``/``Squeeze``/``Unsqueeze``/``Flatten``/``Identity``, which ONNX
Runtime runs in place) so that :func:`peak_live_bytes` counts one storage once.

Liveness (:func:`peak_live_bytes`) sweeps ``nodes[start:stop]``: a value produced in the range
is live from its node to its last reader in the range, or to the end of the range when a later
node or the graph output needs it; a value entering the range (graph input or an earlier
node's output) that is read in the range or needed after it is live for the whole range: its
owner (the caller of the graph, or the pipeline runtime that received a stage's inputs) holds
it until the range has run, so reading it early does not free it. While a node runs its
inputs and outputs are live together, with the temporaries its kernel allocates beyond them
(:attr:`CostTable.workspace`: FX decomposed quantize/dequantize ops). Constants are not
activations; outputs of nodes that read only constants (an ONNX ``Transpose`` of a weight, an
FX dequantisation chain) are, as the graph computes them (ONNX Runtime folds such ONNX nodes
into weights at session start).

Constant-only nodes (:func:`constant_only`): a node that reads at least one value and only
constants or outputs of constant-only nodes (an FX dequantisation chain after a quantize
pass, an ONNX ``Transpose`` of a weight) computes the same value on every call and can be
recomputed wherever it is needed, so pipeline stages re-create such chains instead of sending
their results; ops that must not run twice (collectives, random numbers) never qualify.

A dim that stays unknown (an anonymous ONNX dim, a
data-dependent size) makes that value count 0 bytes and its node 0 FLOPs.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .errors import UnsupportedGraphError
from .kind import Graph, kind

__all__ = ["ValueInfo", "NodeCost", "CostTable", "node_costs", "peak_live_bytes",
           "constant_only", "constant_only_nodes", "repeatable"]

logger = logging.getLogger(__name__)

#: ops that must run exactly once: random numbers (dropout too) and collectives (lower case,
#: without namespace/domain; any op of a ``c10d`` namespace is a collective as well)
_RUN_ONCE = frozenset("""
rand rand_like randn randn_like randint randint_like randperm normal uniform bernoulli
multinomial exponential poisson geometric cauchy log_normal random dropout native_dropout
_fused_dropout feature_dropout alpha_dropout feature_alpha_dropout rrelu rrelu_with_noise
randomnormal randomnormallike randomuniform randomuniformlike
allreduce allgather alltoall reducescatter all_reduce all_gather all_gather_into_tensor
all_to_all all_to_all_single reduce_scatter reduce_scatter_tensor wait_tensor broadcast
""".split())


@dataclass(frozen=True)
class ValueInfo:
    """One value of the graph: shape with symbolic dims bound, dtype name and bytes."""

    name: str
    shape: tuple[int, ...] | None
    dtype: str | None
    bytes: int
    is_tensor: bool


@dataclass(frozen=True)
class NodeCost:
    """Cost facts of one operator node."""

    name: str
    op: str
    flops: int
    inputs: tuple[str, ...]
    outputs: tuple[ValueInfo, ...]
    constants: tuple[str, ...]


@dataclass(frozen=True)
class CostTable:
    """Node costs in graph order, the graph's inputs and outputs, and its constants' bytes.

    ``aliases`` maps a value name to the value (or constant) whose storage it shares;
    ``workspace`` maps a node name to the bytes it allocates beyond its outputs while it runs
    (FX: the eager temporaries of the decomposed quantization ops, ``_flops.fx_workspace``).
    """

    nodes: tuple[NodeCost, ...]
    inputs: tuple[ValueInfo, ...]
    outputs: tuple[str, ...]
    constant_bytes: Mapping[str, int]
    aliases: Mapping[str, str] = field(default_factory=dict)
    workspace: Mapping[str, int] = field(default_factory=dict)

    @property
    def flops(self) -> int:
        return sum(n.flops for n in self.nodes)

    @property
    def param_bytes(self) -> int:
        return sum(self.constant_bytes.values())


def node_costs(graph: Graph, *, dims: Mapping[str, int] | None = None) -> CostTable:
    """The :class:`CostTable` of an FX GraphModule or an onnx_ir Model.

    ``dims`` binds symbolic dims (ONNX ``dim_param`` names such as ``"batch"``; FX symbols
    such as ``"s0"``, i.e. ``str(symint)``). An unbound symbol of an input shape raises
    :class:`UnsupportedGraphError` naming it. The graph is not modified.
    """
    if kind(graph) == "fx":
        from ._costs_fx import fx_costs

        return fx_costs(graph, dims)
    from ._costs_onnx import onnx_costs

    return onnx_costs(graph, dims)


def repeatable(op: str) -> bool:
    """Whether an op (``op_name`` spelling) may run again on the same inputs: no collective, no
    random numbers (dropout included), so a copy in another stage computes the same value."""
    space, _, name = op.rpartition("::") if "::" in op else op.rpartition(".")
    return "c10d" not in space and name.lower().rstrip("_") not in _RUN_ONCE


def constant_only(
    nodes: Iterable[tuple[Hashable, str, Sequence[Hashable | None]]],
) -> set[Hashable]:
    """Keys of the constant-only nodes among ``(key, op, reads)`` in topological order, where
    ``reads`` holds, per value the node reads, ``None`` for a constant or the key of the node
    producing it (anything else, e.g. a graph input's name, for other values): a node
    qualifies when it reads something, its op is :func:`repeatable`, and every read is a
    constant or a qualifying node's output (module doc)."""
    found: set[Hashable] = set()
    for key, op, reads in nodes:
        if reads and repeatable(op) and all(r is None or r in found for r in reads):
            found.add(key)
    return found


def constant_only_nodes(table: CostTable) -> frozenset[str]:
    """Names of the constant-only nodes of ``table`` (:func:`constant_only`)."""
    producer = {v.name: node.name for node in table.nodes for v in node.outputs}
    outside = object()
    return frozenset(constant_only(
        (node.name, node.op, [*(None for _ in node.constants),
                              *(producer.get(name, outside) for name in node.inputs)])
        for node in table.nodes))


def unbound_error(names: set[str], where: str) -> UnsupportedGraphError:
    """The error for symbolic input dims that ``dims`` leaves unbound."""
    listed = ", ".join(sorted(names))
    example = ", ".join(f"{n!r}: ..." for n in sorted(names))
    return UnsupportedGraphError(
        f"the {where} has symbolic dims {listed} that are not bound; pass "
        f"dims={{{example}}} (the sizes to cost the graph at)"
    )


def peak_live_bytes(table: CostTable, start: int = 0, stop: int | None = None) -> int:
    """Peak bytes of live activations while ``table.nodes[start:stop]`` run (module doc)."""
    count = len(table.nodes)
    stop = count if stop is None else stop
    if not 0 <= start <= stop <= count:
        raise ValueError(f"need 0 <= start <= stop <= {count}, got start={start}, stop={stop}")
    if start == stop:
        return 0
    made, size, last, outputs = _liveness_index(table)

    def root(name: str) -> str | None:
        """The storage a value lives in: follow aliases made inside the range."""
        for _ in range(count + 1):
            if name not in table.aliases or made.get(name, -1) < start:
                break
            name = table.aliases[name]
        return None if name in table.constant_bytes or name not in made else name

    storage: dict[str, list[int]] = {}
    for name, born in made.items():
        if born >= stop:
            continue
        used = last.get(name, -1)
        end = stop - 1 if (name in outputs or used >= stop) else used
        if born >= start:
            span = (born, max(born, end))
        elif end >= start:  # entering: read here or needed later; its owner holds it throughout
            span = (start, stop - 1)
        else:
            continue
        base = root(name)
        if base is None:
            continue
        lo, hi = storage.get(base, span)
        storage[base] = [min(lo, span[0]), max(hi, span[1])]
    delta = [0] * (stop - start + 1)
    for base, (lo, hi) in storage.items():
        delta[lo - start] += size[base]
        delta[hi - start + 1] -= size[base]
    for step, node in enumerate(table.nodes[start:stop]):  # temporaries while a node runs
        extra = table.workspace.get(node.name, 0)
        delta[step] += extra
        delta[step + 1] -= extra
    peak = live = 0
    for change in delta[:-1]:
        live += change
        peak = max(peak, live)
    return peak


def _liveness_index(table: CostTable) -> tuple[dict, dict, dict, frozenset]:
    """Where each value is made (-1: graph input), its bytes and its last reader; cached on
    the (immutable) table so per-stage calls cost one pass over the values."""
    cached = table.__dict__.get("_liveness")
    if cached is not None:
        return cached
    made: dict[str, int] = {v.name: -1 for v in table.inputs}
    size: dict[str, int] = {v.name: v.bytes for v in table.inputs}
    last: dict[str, int] = {}
    for index, node in enumerate(table.nodes):
        for name in node.inputs:
            last[name] = index
        for value in node.outputs:
            made[value.name], size[value.name] = index, value.bytes
    cached = (made, size, last, frozenset(table.outputs))
    object.__setattr__(table, "_liveness", cached)
    return cached
