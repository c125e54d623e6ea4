"""ONNX Runtime sessions that report what they actually got.

``onnxruntime.InferenceSession`` silently drops an execution provider it cannot create (for
example the CUDA provider of ``onnxruntime-gpu`` on a machine without CUDA libraries) and runs
on the CPU. :func:`session` asks for CUDA first ("auto"), then compares
``get_providers()`` with the request and records the difference in :class:`Session`
(``providers`` got, ``requested``, ``fell_back``), logging a warning once per process and
combination. A provider that failed to be created is not asked for again in this process (ORT
would print its load error to the console on every session); it still counts as requested.

Small models go to ORT as serialized bytes. Models that keep tensors on disk (lazy external
tensors) or whose weights pass ~1.8 GB (protobuf's 2 GB limit) are saved with external data to
a temporary folder and loaded by path; ORT reads the data while building the session, after
which the folder is removed.

Parity checks live in :mod:`graphpress.export.parity`, the ORT legality check
(:func:`ort_legal`) in :mod:`graphpress.export.legality`.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from graphpress.graph.errors import ExportError, ModelLoadError
from graphpress.graph.io import save

__all__ = ["Session", "session", "resolve_providers", "CPU", "CUDA"]

logger = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
_ALIASES = {"cpu": (CPU,), "cuda": (CUDA, CPU), "auto": (CUDA, CPU)}
#: Above this many weight bytes an in-memory model is passed to ORT by path, not as bytes.
BYTES_LIMIT = 1_800_000_000

_unavailable: set[str] = set()  # providers ORT failed to create in this process
_warned: set[tuple[tuple[str, ...], tuple[str, ...]]] = set()


@dataclass(frozen=True)
class Session:
    """An ``InferenceSession`` plus what was asked for and what was got."""

    inference_session: ort.InferenceSession
    providers: tuple[str, ...]
    requested: tuple[str, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    @property
    def fell_back(self) -> bool:
        """True if the preferred (first requested) provider is not among those got."""
        return self.requested[0] not in self.providers

    def run(self, inputs: Mapping[str, Any] | Sequence[Any]) -> list[np.ndarray]:
        """Run on ``inputs`` (name → array, or arrays in input order); return all outputs."""
        feed = self.feed(inputs)
        try:
            return list(self.inference_session.run(None, feed))
        except Exception as exc:  # ORT raises its own pybind types
            raise ExportError(
                f"ONNX Runtime failed to run the model: {_first_line(exc)}; check input "
                f"names, dtypes and shapes (inputs: {', '.join(self.input_names)})"
            ) from None

    def feed(self, inputs: Mapping[str, Any] | Sequence[Any]) -> dict[str, np.ndarray]:
        """Turn ``inputs`` into ORT's feed dict; names the model does not take are ignored."""
        if isinstance(inputs, Mapping):
            missing = [n for n in self.input_names if n not in inputs]
            if missing:
                raise ExportError(
                    f"missing model inputs {missing}; the model takes {list(self.input_names)}"
                )
            ignored = sorted(set(inputs) - set(self.input_names))
            if ignored:
                logger.debug("inputs not taken by the ONNX model, ignored: %s", ignored)
            return {n: _to_numpy(inputs[n]) for n in self.input_names}
        values = list(inputs) if isinstance(inputs, (tuple, list)) else [inputs]
        if len(values) != len(self.input_names):
            raise ExportError(
                f"got {len(values)} positional inputs but the model takes "
                f"{len(self.input_names)} ({', '.join(self.input_names)}); pass a dict by name"
            )
        return {n: _to_numpy(v) for n, v in zip(self.input_names, values)}


def resolve_providers(providers: str | Sequence[str] = "auto") -> tuple[str, ...]:
    """Turn ``"auto"``, ``"cpu"``, ``"cuda"`` or a list into ORT provider names (CPU last).

    ``"auto"`` asks for CUDA only if this onnxruntime build lists it; ``"cuda"`` always does,
    so on a CPU-only machine it reports ``fell_back``.
    """
    if isinstance(providers, str):
        key = providers.lower()
        if key == "auto":  # CUDA when this onnxruntime build has it (it may still fail to load)
            return tuple(p for p in _ALIASES[key] if p == CPU or p in ort.get_available_providers())
        if key in _ALIASES:
            return _ALIASES[key]
        providers = [providers]
    names = tuple(dict.fromkeys(providers))
    if not names:
        raise ExportError('providers is empty; pass "auto", "cpu", "cuda" or a list of names')
    available = ort.get_available_providers()
    unknown = [p for p in names if p not in available]
    if unknown:
        raise ExportError(
            f"unknown execution provider(s) {unknown}; this onnxruntime offers {available}"
        )
    return names if CPU in names else (*names, CPU)


def session(
    model_or_path: ir.Model | onnx.ModelProto | bytes | str | os.PathLike,
    providers: str | Sequence[str] = "auto",
    *,
    intra_op_threads: int | None = None,
) -> Session:
    """Build an ORT session, CUDA first by default; see :class:`Session` for what it reports."""
    requested = resolve_providers(providers)
    if CUDA in requested and CUDA not in _unavailable and not _cuda_loadable():
        _unavailable.add(CUDA)  # skip ORT's own console error; reported as fell_back below
    asked = [p for p in requested if p not in _unavailable] or [CPU]
    options = ort.SessionOptions()
    if intra_op_threads is not None:
        options.intra_op_num_threads = int(intra_op_threads)
    with tempfile.TemporaryDirectory(prefix="graphpress-ort-") as tmp:
        source = _source(model_or_path, Path(tmp))
        try:
            sess = ort.InferenceSession(source, sess_options=options, providers=asked)
        except Exception as exc:  # ORT raises its own pybind types
            raise ExportError(
                f"ONNX Runtime could not load the model: {_first_line(exc)}; run "
                "graphpress.graph.verify on it, and export with an opset this onnxruntime "
                f"({ort.__version__}) supports"
            ) from None
    got = tuple(sess.get_providers())
    _unavailable.update(p for p in asked if p not in got)
    result = Session(
        inference_session=sess,
        providers=got,
        requested=requested,
        input_names=tuple(i.name for i in sess.get_inputs()),
        output_names=tuple(o.name for o in sess.get_outputs()),
    )
    if result.fell_back and (requested, got) not in _warned:
        _warned.add((requested, got))
        logger.warning(
            "ONNX Runtime could not use %s and fell back to %s; install the CUDA and cuDNN "
            "libraries onnxruntime-gpu needs to run on the GPU",
            ", ".join(p for p in requested if p not in got),
            ", ".join(got),
        )
    return result


@functools.lru_cache(maxsize=1)
def _cuda_loadable() -> bool:
    """Whether ORT's CUDA provider library and the CUDA/cuDNN libraries it needs can load.

    Asking ORT for a provider whose libraries are missing makes it print an error to the
    console on every session; ``dlopen``-ing the provider library ourselves finds the same
    answer quietly (the reason is logged at debug level).
    """
    library = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    if not library.exists():
        return CUDA in ort.get_available_providers()  # other platforms: let ORT decide
    try:
        ctypes.CDLL(str(library))
    except OSError as exc:
        logger.debug("CUDA provider cannot load: %s", exc)
        return False
    return True


def _source(model: Any, tmp: Path) -> str | bytes:
    """Bytes for small in-memory models; a path (saved under ``tmp`` if need be) otherwise."""
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise ModelLoadError(f"{path}: no such ONNX file; check the path")
        return str(path)
    if isinstance(model, (bytes, bytearray)):
        return bytes(model)
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    if not isinstance(model, ir.Model):
        raise ExportError(
            f"session needs an onnx_ir.Model, ModelProto, bytes or a path, got "
            f"{type(model).__name__}; export an FX graph with graphpress.export.to_onnx first"
        )
    initializers = [v.const_value for g in model.graphs() for v in g.initializers.values()]
    lazy = any(isinstance(t, ir.ExternalTensor) for t in initializers)
    size = sum(t.nbytes for t in initializers if t is not None)
    if lazy or size > BYTES_LIMIT:
        return str(save(model, tmp / "model.onnx", external_data=True))
    return ir.serde.serialize_model(model).SerializeToString()


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:400]
