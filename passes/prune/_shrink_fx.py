"""FX side of structured pruning: physically slice every use of a channel group.

Same contract as ``_shrink_onnx``: every constant of a use (a ``get_attr`` tensor among the
node's arguments, maybe behind ``t``/``permute``/``transpose``) is replaced by a NEW buffer
``<target>_<tag>`` (``tag`` = ``"prune"`` unless the caller names another) holding
``index_select`` of the kept index along the use's axis (channels outside the group's window
stay); the old attribute goes when nothing reads it. Shape uses
scale the integer they encode by ``kept / size`` in ``view``/``reshape``/``_unsafe_view``/
``expand`` targets and ``split_with_sizes`` sizes (``-1`` and symbolic sizes stay). The
``meta["val"]`` example values are recomputed at the end with ``FakeTensorProp`` (dropped,
with a debug log, where that fails), so later passes see the new shapes. The decode chain of
a block-quantized weight is sliced as a whole (:mod:`._shrink_nbits_fx`).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import fx

from graphpress.graph.errors import UnsupportedGraphError
from graphpress.graph.fx import add_tensor, get_tensor, mark

from .._rewrite import remove_dead_fx
from ._importance import IndexLedger
from ._shrink_nbits_fx import find_chain, shrink_nbits_fx
from ._shrink_onnx import TAG, removed_channels, scale_count

__all__ = ["FxShrinker"]

logger = logging.getLogger(__name__)

_aten = torch.ops.aten
_VIEWS = {_aten.t.default, _aten.permute.default, _aten.transpose.int, _aten.clone.default,
          _aten.contiguous.default, _aten.to.dtype, _aten._to_copy.default}
_SHAPE_OPS = {_aten.view.default, _aten.reshape.default, _aten._unsafe_view.default,
              _aten.expand.default, _aten.split_with_sizes.default, _aten.split.sizes,
              _aten.layer_norm.default, _aten.native_layer_norm.default}  # normalized_shape
_CONSUMERS = {_aten.linear.default: (0, -1), _aten.matmul.default: (0, -1),
              _aten.mm.default: (0, -1), _aten.addmm.default: (1, -1),
              _aten.conv1d.default: (0, 1), _aten.conv2d.default: (0, 1),
              _aten.conv3d.default: (0, 1), _aten.convolution.default: (0, 1),
              _aten.conv1d.padding: (0, 1), _aten.conv2d.padding: (0, 1)}


class FxShrinker:
    """Shrinks groups of one GraphModule in place; call :meth:`finish` at the end."""

    def __init__(self, gm: fx.GraphModule, pass_name: str, tag: str = TAG) -> None:
        self.gm, self.pass_name, self.tag = gm, pass_name, tag
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.stale: dict[fx.Node, None] = {}
        self.origin: dict[fx.Node, str] = {}  # new get_attr -> the tensor name it replaces
        self.ledger = IndexLedger()

    def node(self, name: str) -> fx.Node:
        found = self.nodes.get(name)
        if found is None:
            raise UnsupportedGraphError(f"no FX node named {name!r}: the channel groups were "
                                        "computed on another graph")
        return found

    def _matches(self, arg: fx.Node, tensor: str) -> bool:
        return tensor in (arg.name, arg.target, self.origin.get(arg))

    def _constant(self, node: fx.Node, tensor: str) -> tuple[fx.Node, fx.Node] | None:
        """(user, get_attr) for the constant named ``tensor`` read by ``node`` (or via a
        transpose/copy in between)."""
        if node.op == "get_attr" and self._matches(node, tensor):
            return None  # the use names the constant itself: its users are the owners
        for arg in node.all_input_nodes:
            if arg.op == "get_attr" and self._matches(arg, tensor):
                return node, arg
        for arg in node.all_input_nodes:
            if arg.op == "call_function" and arg.target in _VIEWS:
                found = self._constant(arg, tensor)
                if found is not None:
                    return found
        return None

    def array(self, use) -> np.ndarray | None:
        """The constant a use names, as numpy (``None`` for computed values)."""
        found = self._constant(self.node(use.node), use.tensor) if use.tensor else None
        return None if found is None else as_array(get_tensor(self.gm, found[1]))

    def consumer_input(self, use) -> tuple[str, int] | None:
        """(node name, channel axis) of the data input of an ``"in"`` use's node."""
        node = self.node(use.node)
        index, axis = _CONSUMERS.get(node.target, (None, None))
        if index is None or len(node.args) <= index or not isinstance(node.args[index], fx.Node):
            return None
        return node.args[index].name, axis

    def removed(self, use, axis: int) -> np.ndarray:
        """Original indices removed so far along ``axis`` of the constant ``use`` reads."""
        found = self._constant(self.node(use.node), use.tensor) if use.tensor else None
        return self.ledger.removed(found[1].target, axis) if found else np.zeros(0, np.int64)

    def sole_reader(self, use) -> bool:
        """Whether the constant of ``use`` is read by the use's node alone (not tied)."""
        node = self.node(use.node)
        found = self._constant(node, use.tensor) if use.tensor else None
        if found is None:
            return False
        owner, attr = found
        aliases = [n for n in self.gm.graph.nodes if n.op == "get_attr" and n.target == attr.target]
        return (len(aliases) == 1 and list(attr.users) == [owner]
                and (owner is node or list(owner.users) == [node]))

    def replace(self, use, array: np.ndarray) -> None:
        """Make the use's node read a NEW constant ``<origin>.refit`` holding ``array`` (same
        shape as the old one) instead of its constant; later shrinking finds it by origin."""
        owner, attr = self._constant(self.node(use.node), use.tensor)
        origin = self.origin.get(attr, attr.target)
        value = torch.from_numpy(np.ascontiguousarray(array)).to(get_tensor(self.gm, attr).dtype)
        with self.gm.graph.inserting_before(attr):
            new = mark(self.gm.graph.get_attr(add_tensor(self.gm, f"{origin}.refit", value)),
                       self.pass_name)
        self.origin[new] = origin
        owner.replace_input_with(attr, new)
        self.stale[attr] = None

    def shrink(self, group, keep_units) -> None:
        """Remove every unit of ``group`` not in ``keep_units`` from all its uses."""
        made: dict[tuple[fx.Node, int, int], fx.Node] = {}
        kept_count = len(keep_units) * group.unit
        for use in group.uses:
            node = self.node(use.node)
            if use.role == "shape":
                self._shape(node, use, kept_count, group.size)
                continue
            found = self._constant(node, use.tensor) if use.tensor else None
            chain = find_chain(self, node, use.tensor) if found is None and use.tensor else None
            if chain is not None:
                removed = removed_channels(group, keep_units, use.offset)
                shrink_nbits_fx(self, node, chain, use, removed)
                continue
            if found is None:
                continue  # a computed value: its shape follows
            owner, attr = found
            tensor = get_tensor(self.gm, attr)
            if tensor is None or tensor.dim() == 0:
                continue
            axis = use.axis % tensor.dim()
            if tensor.shape[axis] == 1:
                continue
            key = (attr, axis, use.offset)
            if key not in made:
                origin = self.origin.get(attr, attr.target)
                index, history = self.ledger.keep(attr.target, axis, tensor.shape[axis],
                                                  removed_channels(group, keep_units, use.offset))
                new = torch.index_select(tensor.detach(), axis,
                                         torch.from_numpy(index).to(tensor.device)).contiguous()
                with self.gm.graph.inserting_before(attr):
                    made[key] = mark(self.gm.graph.get_attr(
                        add_tensor(self.gm, f"{origin}.{self.tag}", new)), self.pass_name)
                self.ledger.adopt(made[key].target, history)
                self.origin[made[key]] = origin
            owner.replace_input_with(attr, made[key])
            self.stale[attr] = None

    def _shape(self, node: fx.Node, use, kept: int, size: int) -> None:
        if node.target not in _SHAPE_OPS or len(node.args) < 2:
            raise UnsupportedGraphError(f"cannot rewrite the shape argument of {node.name!r} "
                                        f"({node.target}); exclude this group")
        shape = list(node.args[1]) if isinstance(node.args[1], (list, tuple)) else None
        if shape is None or not -len(shape) <= use.axis < len(shape):
            raise UnsupportedGraphError(f"{node.name!r} has no shape entry {use.axis}")
        if isinstance(shape[use.axis], int):
            shape[use.axis] = scale_count(shape[use.axis], kept, size)
            node.args = (node.args[0], shape, *node.args[2:])

    def finish(self) -> None:
        """Remove the replaced constants and recompute the example values."""
        remove_dead_fx(self.gm, list(self.stale))
        self.gm.recompile()
        refresh_meta(self.gm)


def refresh_meta(gm: fx.GraphModule) -> None:
    """Recompute ``meta["val"]`` of every node from the placeholders' fake values."""
    from torch._guards import detect_fake_mode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    placeholders = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode(placeholders)
    try:
        if mode is None or any(v is None for v in placeholders):
            raise ValueError("placeholders carry no fake values")
        with mode:  # constants become fake inside the mode; no real compute happens
            FakeTensorProp(gm, mode=mode).propagate_dont_convert_inputs(*placeholders)
    except Exception as exc:  # stale example values would mislead later passes: drop them
        logger.debug("FakeTensorProp after pruning failed (%s); dropping meta['val']", exc)
        for node in gm.graph.nodes:
            if node.op != "placeholder":
                node.meta.pop("val", None)


def as_array(tensor: torch.Tensor) -> np.ndarray:
    """A float numpy copy of a (maybe bfloat16) tensor."""
    return tensor.detach().float().cpu().numpy()
