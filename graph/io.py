"""Load and save ONNX models safely.

:func:`load` accepts a path, raw bytes or an ``onnx.ModelProto`` and returns an
``onnx_ir.Model`` whose external tensors stay on disk (memory-mapped on first use). Before
anything is read it checks that the file exists, parses as ONNX, is not truncated, and that
every external-data location stays inside the model's folder and lies within its file.

:func:`save` writes atomically: everything goes to a temporary folder next to the target and
is then renamed into place, so a failed save never leaves half a model behind and never
touches an existing file until the new one is complete.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from .errors import ModelLoadError, UnsafeExternalDataError

__all__ = ["load", "save", "EXTERNAL_DATA_THRESHOLD"]

logger = logging.getLogger(__name__)

#: Initializers larger than this many bytes are written to the external-data file.
EXTERNAL_DATA_THRESHOLD = 1024


def load(source: str | os.PathLike | bytes | onnx.ModelProto) -> ir.Model:
    """Load ``source`` into an ``onnx_ir.Model`` (external data loaded lazily)."""
    path, raw = None, None
    if isinstance(source, onnx.ModelProto):
        proto, base_dir, origin = source, None, "<ModelProto>"
        _check_fields(proto, origin)
    elif isinstance(source, (bytes, bytearray)):
        raw = bytes(source)
        proto, base_dir, origin = _parse(raw, "<bytes>"), None, "<bytes>"
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise ModelLoadError(f"{path}: no such file; check the path to the .onnx model")
        if path.is_dir():
            raise ModelLoadError(f"{path}: is a folder; pass the path of the .onnx file inside it")
        origin, raw = str(path), path.read_bytes()
        proto, base_dir = _parse(raw, origin), path.resolve().parent
    else:
        raise ModelLoadError(
            f"cannot load a {type(source).__name__}; pass a path, bytes or an onnx.ModelProto"
        )
    _check_external_data(proto, base_dir, origin)
    external = any(True for _ in _external_tensors(proto))
    # the checker resolves external data against the model's folder only when given the path;
    # otherwise the bytes already read spare it re-serialising the proto
    _check_model(str(path) if external else (raw if raw is not None else proto), origin)
    model = ir.serde.deserialize_model(proto)
    if base_dir is not None:
        ir.external_data.set_base_dir(model.graph, base_dir)
    return model


def _parse(data: bytes, origin: str) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(
            f"{origin}: not a valid ONNX model ({type(exc).__name__}); the file is not ONNX "
            "or is truncated: re-export or re-download it"
        ) from None
    _check_fields(proto, origin)
    return proto


def _check_fields(proto: onnx.ModelProto, origin: str) -> None:
    if not proto.HasField("graph") or len(proto.opset_import) == 0:
        raise ModelLoadError(
            f"{origin}: not a valid ONNX model (no graph or no opset import); the file is not "
            "ONNX or is truncated: re-export or re-download it"
        )


def _check_model(model: onnx.ModelProto | bytes | str, origin: str) -> None:
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "checker failed"
        raise ModelLoadError(f"{origin}: invalid ONNX model: {first}") from None


def _external_tensors(proto: onnx.ModelProto):
    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        yield from (t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR and (
                    attr.t.data_location == onnx.TensorProto.EXTERNAL
                ):
                    yield attr.t
                graphs.extend([attr.g] if attr.HasField("g") else [])
                graphs.extend(attr.graphs)


def _check_external_data(proto: onnx.ModelProto, base_dir: Path | None, origin: str) -> None:
    """Refuse locations that escape ``base_dir`` and data that lies past the end of its file."""
    for tensor in _external_tensors(proto):
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        if base_dir is None:
            raise ModelLoadError(
                f"{origin}: tensor {tensor.name!r} keeps its data in external file {location!r}, but the "
                f"model was given as {origin}; load it from its path so the data file can be found"
            )
        target = (base_dir / location).resolve()
        if os.path.isabs(location) or not target.is_relative_to(base_dir):
            raise UnsafeExternalDataError(
                f"{origin}: tensor {tensor.name!r}: external-data location {location!r} points outside the "
                f"model's folder {base_dir}; refusing to read it (path traversal). Keep data "
                "files next to the model and use relative names"
            )
        if not target.is_file():
            raise ModelLoadError(
                f"{origin}: tensor {tensor.name!r}: external-data file {location!r} is missing next to the "
                "model; copy it into the model's folder"
            )
        try:
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else _nbytes(tensor)
        except ValueError:
            raise ModelLoadError(
                f"{origin}: tensor {tensor.name!r}: external-data offset/length {info} are invalid; "
                "re-export the model"
            ) from None
        end = offset + length
        if offset < 0 or length < 0 or end > target.stat().st_size:
            raise ModelLoadError(
                f"{origin}: tensor {tensor.name!r}: external-data file {location!r} is truncated (needs "
                f"{end} bytes, has {target.stat().st_size}); re-export the model"
            )


def _nbytes(tensor: onnx.TensorProto) -> int:
    """Bytes a fixed-size tensor occupies (0 for strings, whose size is not known up front)."""
    if tensor.data_type == onnx.TensorProto.STRING:
        return 0
    count = 1
    for dim in tensor.dims:
        count *= dim
    bits = ir.DataType(tensor.data_type).bitwidth
    return (count * bits + 7) // 8


def save(model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None) -> Path:
    """Write ``model`` to ``path`` atomically; return the path.

    With ``external_data`` true, initializers larger than :data:`EXTERNAL_DATA_THRESHOLD`
    bytes go to ``<name>.data`` next to the model. ``None`` (default) decides: external data
    once the weights pass 1 GiB (protobuf cannot hold 2 GiB) or when the model already keeps
    tensors on disk (they are streamed, never all in memory).
    """
    path = Path(path)
    folder = path.resolve().parent
    folder.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = _weight_bytes(model) > (1 << 30) or _has_external(model)
    data_name = path.name + ".data"
    with tempfile.TemporaryDirectory(dir=folder, prefix=f".{path.name}.tmp-") as tmp:
        tmp_model = Path(tmp) / path.name
        if external_data:
            ir.save(
                model, tmp_model, external_data=data_name, size_threshold_bytes=EXTERNAL_DATA_THRESHOLD
            )
            if (Path(tmp) / data_name).exists():
                os.replace(Path(tmp) / data_name, folder / data_name)
        else:
            inline = ir.external_data.load_to_model(model.clone()) if _has_external(model) else model
            ir.save(inline, tmp_model)
        os.replace(tmp_model, folder / path.name)
    logger.debug("saved %s (external data: %s)", path, external_data)
    return path


def _all_initializers(model: ir.Model):
    for graph in model.graphs():
        yield from graph.initializers.values()


def _has_external(model: ir.Model) -> bool:
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in _all_initializers(model))


def _weight_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in _all_initializers(model) if v.const_value is not None)
