"""Honest byte accounting of a sparse weight ``Ŵ = M ⊙ W`` ``[N, K]`` (``b`` bytes per value).

ONNX Runtime has no sparse kernel for a ``MatMul``/``Gemm`` weight: the exported model stores
and runs the **dense** tensor, ``N·K·b`` bytes, and that is the number the report's byte column
shows. What a sparse storage form *would* take is computed here, for the kept count
``nnz = Σ M`` (``G = ⌈K/M⌉`` groups per row for an N:M pattern):

* ``dense``: ``N·K·b``;
* ``csr`` (compressed sparse row): values ``nnz·b`` + column indices ``nnz·c`` (``c = 2``,
  int16, when ``K ≤ 32768``, else ``c = 4``, int32) + row pointers ``(N + 1)·4`` (int32);
* ``bitmask``: values ``nnz·b`` + one bit per element, ``⌈N·K/8⌉``;
* N:M only (the mask must keep at most ``n`` of every ``m``; a group stores exactly ``n``
  values, zeros where fewer are kept, as the K-padded tail group does):

  - ``nm-index``: values ``N·G·n·b`` + a ``⌈log₂ m⌉``-bit position per stored value, i.e.
    ``⌈N·G·n·⌈log₂ m⌉/8⌉`` bytes — how NVIDIA's sparse tensor cores store 2:4 (two 2-bit
    indices per group of four);
  - ``nm-combinatorial``: values ``N·G·n·b`` + the rank of the group's kept set among the
    ``C(m, n)`` possible ones, ``⌈log₂ C(m, n)⌉`` bits per group, ``⌈N·G·⌈log₂ C(m,n)⌉/8⌉``
    bytes (3 bits per group for 2:4, 7 for 4:8; the smallest index-free form).

:func:`smallest` names the cheapest form; ``dense`` is always a candidate, so a compressed
size never exceeds the dense one.
"""

from __future__ import annotations

import logging
import math

import numpy as np

__all__ = ["FORMATS", "storage_bytes", "smallest", "nm_valid"]

logger = logging.getLogger(__name__)

#: Every storage form, in the order ties are broken.
FORMATS = ("dense", "nm-combinatorial", "nm-index", "bitmask", "csr")


def _ceil_bytes(bits: int) -> int:
    return -(-bits // 8)


def nm_valid(mask: np.ndarray, n: int, m: int) -> bool:
    """Whether every group of ``m`` consecutive entries of a row (zero-padded) keeps ≤ ``n``."""
    rows, k = mask.shape
    groups = -(-k // m)
    padded = np.zeros((rows, groups * m), bool)
    padded[:, :k] = mask
    return bool((padded.reshape(rows, groups, m).sum(axis=-1) <= n).all())


def storage_bytes(mask: np.ndarray, itemsize: int,
                  nm: tuple[int, int] | None = None) -> dict[str, int]:
    """Bytes of every storage form of a weight with keep-mask ``mask`` ``[N, K]``."""
    rows, k = mask.shape
    nnz = int(np.count_nonzero(mask))
    index_bytes = 2 if k <= 32768 else 4
    sizes = {
        "dense": rows * k * itemsize,
        "csr": nnz * (itemsize + index_bytes) + (rows + 1) * 4,
        "bitmask": nnz * itemsize + _ceil_bytes(rows * k),
    }
    if nm is not None:
        n, m = nm
        if not nm_valid(mask, n, m):
            raise ValueError(f"the mask is not {n}:{m}: some group of {m} keeps more than {n}")
        slots = rows * (-(-k // m)) * n
        values = slots * itemsize
        sizes["nm-index"] = values + _ceil_bytes(slots * max(1, math.ceil(math.log2(m))))
        per_group = math.ceil(math.log2(math.comb(m, n)))  # ≥ 1 since 0 < n < m
        sizes["nm-combinatorial"] = values + _ceil_bytes(rows * (-(-k // m)) * per_group)
    return sizes


def smallest(sizes: dict[str, int]) -> tuple[str, int]:
    """``(format, bytes)`` of the cheapest form in ``sizes`` (ties: the order of FORMATS)."""
    name = min((f for f in FORMATS if f in sizes), key=lambda f: (sizes[f], FORMATS.index(f)))
    return name, sizes[name]
