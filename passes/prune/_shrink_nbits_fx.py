"""FX side of slicing a block-quantized weight: the decode chain of ``quantize-weights``.

A channel use of such a weight names the layer node and the packed codes buffer, with axis 0
(``N``) or 1 (``K``). The chain (:func:`graphpress.graph._channel_fx_quant.nbits_chain`) gets
new codes, scales and zero-point buffers (:mod:`._shrink_nbits`) and its two reshape targets
``[N, blocks, B]`` and ``[N, blocks·B]`` the new sizes; the old buffers go once nothing reads
them. A chain read by more than this layer (a tied table) is not sliced.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import fx

from graphpress.graph.channels import NBitsChain, nbits_chain
from graphpress.graph.errors import UnsupportedGraphError
from graphpress.graph.fx import add_tensor, get_tensor, mark

from ._shrink_nbits import NBitsArrays, slice_nbits

__all__ = ["find_chain", "shrink_nbits_fx"]

logger = logging.getLogger(__name__)


def find_chain(shrinker, node: fx.Node, tensor: str) -> NBitsChain | None:
    """The decode chain feeding ``node`` whose codes buffer is ``tensor`` (or was)."""
    for arg in node.all_input_nodes:
        if arg.op != "call_function":
            continue
        chain = nbits_chain(shrinker.gm, arg)
        if chain is not None and tensor in (chain.codes.target, shrinker.origin.get(chain.codes)):
            return chain
    return None


def shrink_nbits_fx(shrinker, node: fx.Node, chain: NBitsChain, use, removed: np.ndarray) -> None:
    """Remove the original channels ``removed`` along ``use.axis`` of the chain's weight."""
    end = chain.cut or chain.flat_view
    if set(end.users) - {node} and not _only_casts_to(end, node):
        raise UnsupportedGraphError(f"the block-quantized weight {chain.codes.target!r} is read "
                                    f"by more than {node.name!r} (tied); exclude this group")
    gm, axis = shrinker.gm, use.axis
    kept, history = shrinker.ledger.keep(chain.codes.target, axis,
                                         chain.n if axis == 0 else chain.k, removed)
    zero = get_tensor(gm, chain.zero_points) if chain.zero_points is not None else None
    arrays = NBitsArrays(_numpy(get_tensor(gm, chain.codes)),
                         _numpy(get_tensor(gm, chain.scales)),
                         None if zero is None else _numpy(zero), chain.n, chain.k, chain.bits,
                         chain.block, False)
    new = slice_nbits(arrays, axis, kept)
    codes = _rebind(shrinker, chain.codes, new.codes)
    shrinker.ledger.adopt(codes.target, history)
    _rebind(shrinker, chain.scales, new.scales)
    if chain.zero_points is not None:
        _rebind(shrinker, chain.zero_points, new.zero_points)
    blocks = -(-new.k // new.block)
    view, flat = chain.blocks_view, chain.flat_view
    view.args = (view.args[0], [new.n, blocks, new.block], *view.args[2:])
    flat.args = (flat.args[0], [new.n, blocks * new.block], *flat.args[2:])
    if chain.cut is not None and axis == 1:  # a sliced K is whole blocks: nothing to cut
        chain.cut.replace_all_uses_with(flat)
        shrinker.gm.graph.erase_node(chain.cut)


def _only_casts_to(end: fx.Node, node: fx.Node) -> bool:
    """Whether ``end``'s only users are casts read only by ``node``."""
    return all(set(u.users) == {node} for u in end.users if u is not node)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy()


def _rebind(shrinker, attr: fx.Node, array: np.ndarray) -> fx.Node:
    """A new buffer holding ``array`` replaces ``attr`` for all its readers in the chain."""
    gm = shrinker.gm
    origin = shrinker.origin.get(attr, attr.target)
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    with gm.graph.inserting_before(attr):
        new = mark(gm.graph.get_attr(add_tensor(gm, f"{origin}.{shrinker.tag}", tensor)),
                   shrinker.pass_name)
    shrinker.origin[new] = origin
    attr.replace_all_uses_with(new)
    shrinker.stale[attr] = None
    return new
