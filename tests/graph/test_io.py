"""graph.load / graph.save: sources, round trips, atomic writes and every kind of bad input."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphpress.graph import ModelLoadError, UnsafeExternalDataError, load, save

WEIGHT = np.arange(64 * 32, dtype=np.float32).reshape(64, 32) / 100  # 8 KiB: goes external
BIAS = np.linspace(-1, 1, 32, dtype=np.float32)  # 128 B: stays inline


def _proto() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32])],
        initializer=[numpy_helper.from_array(WEIGHT, "w"), numpy_helper.from_array(BIAS, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _initializers(model: ir.Model) -> dict[str, bytes]:
    return {name: v.const_value.tobytes() for name, v in model.graph.initializers.items()}


def _check(model: ir.Model) -> None:
    assert [n.op_type for n in model.graph] == ["MatMul", "Add"]
    assert _initializers(model) == {"w": WEIGHT.tobytes(), "b": BIAS.tobytes()}


def test_load_from_path_bytes_and_proto(tmp_path):
    path = tmp_path / "tiny.onnx"
    path.write_bytes(_proto().SerializeToString())
    for source in (path, str(path), path.read_bytes(), _proto()):
        model = load(source)
        assert isinstance(model, ir.Model)
        _check(model)


def test_round_trip_inline(tmp_path):
    path = save(load(_proto()), tmp_path / "out" / "m.onnx")  # creates the folder
    assert path == tmp_path / "out" / "m.onnx"
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.onnx"]  # no temp files left
    _check(load(path))


def test_round_trip_external_keeps_caller_model_and_is_lazy(tmp_path):
    model = load(_proto())
    path = save(model, tmp_path / "m.onnx", external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert not any(
        isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values()
    )
    loaded = load(path)
    assert isinstance(loaded.graph.initializers["w"].const_value, ir.ExternalTensor)
    assert not isinstance(loaded.graph.initializers["b"].const_value, ir.ExternalTensor)
    _check(loaded)
    # Saving a lazily loaded model over its own files streams the data and stays correct.
    save(loaded, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    _check(load(path))
    # Forcing inline data materialises the external tensors.
    inline = save(load(path), tmp_path / "inline.onnx", external_data=False)
    assert not (tmp_path / "inline.onnx.data").exists()
    _check(load(inline))


def test_failed_save_leaves_existing_file_untouched(tmp_path, monkeypatch):
    path = save(load(_proto()), tmp_path / "m.onnx")
    before = _digest(path)

    def broken_save(*args, **kwargs):
        Path(args[1]).write_bytes(b"half a model")  # something was written before failing
        raise OSError("disk full")

    monkeypatch.setattr(ir, "save", broken_save)
    for external in (False, True):
        with pytest.raises(OSError, match="disk full"):
            save(load(_proto()), path, external_data=external)
        assert _digest(path) == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def _saved_external(folder: Path) -> Path:
    return save(load(_proto()), folder / "m.onnx", external_data=True)


def _set_location(path: Path, location: str) -> None:
    proto = onnx.load(str(path), load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    path.write_bytes(proto.SerializeToString())


def _bad_missing(tmp: Path) -> Path:
    return tmp / "nope.onnx"


def _bad_folder(tmp: Path) -> Path:
    (tmp / "model.onnx").mkdir()
    return tmp / "model.onnx"


def _bad_text(tmp: Path) -> Path:
    (tmp / "notes.onnx").write_text("This is a text file, not an ONNX model.\n" * 20)
    return tmp / "notes.onnx"


def _bad_truncated(tmp: Path) -> Path:
    data = _proto().SerializeToString()
    (tmp / "half.onnx").write_bytes(data[: len(data) // 2])
    return tmp / "half.onnx"


def _bad_traversal(tmp: Path) -> Path:
    (tmp / "secret.bin").write_bytes(b"\0" * 65536)
    path = _saved_external(tmp / "model")
    _set_location(path, "../secret.bin")
    return path


def _bad_absolute(tmp: Path) -> Path:
    path = _saved_external(tmp / "model")
    _set_location(path, str((tmp / "model" / "m.onnx.data").resolve()))
    return path


def _bad_missing_data(tmp: Path) -> Path:
    path = _saved_external(tmp)
    (tmp / "m.onnx.data").unlink()
    return path


def _bad_truncated_data(tmp: Path) -> Path:
    path = _saved_external(tmp)
    data = tmp / "m.onnx.data"
    data.write_bytes(data.read_bytes()[: WEIGHT.nbytes // 2])
    return path


BAD = {
    "missing-file": (_bad_missing, ModelLoadError, "no such file"),
    "folder": (_bad_folder, ModelLoadError, "is a folder"),
    "text-file": (_bad_text, ModelLoadError, "not a valid ONNX model"),
    "truncated-model": (_bad_truncated, ModelLoadError, "not a valid ONNX model"),
    "data-outside-folder": (_bad_traversal, UnsafeExternalDataError, "outside the model's folder"),
    "data-absolute-path": (_bad_absolute, UnsafeExternalDataError, "outside the model's folder"),
    "missing-data-file": (_bad_missing_data, ModelLoadError, "is missing"),
    "truncated-data-file": (_bad_truncated_data, ModelLoadError, "is truncated"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_gives_typed_readable_error_and_changes_nothing(case, tmp_path):
    make, error, phrase = BAD[case]
    path = make(tmp_path)
    files = {p: _digest(p) for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(error) as info:
        load(path)
    message = str(info.value)
    assert phrase in message and "\n" not in message
    assert path.name in message  # says which file
    assert any(w in message for w in ("check", "pass", "re-export", "copy", "keep", "refusing"))
    assert {p: _digest(p) for p in tmp_path.rglob("*") if p.is_file()} == files
    if case == "truncated-data-file":
        assert f"needs {WEIGHT.nbytes} bytes" in message


def test_external_data_needs_a_path():
    proto = onnx.load_from_string(_proto().SerializeToString())
    onnx.external_data_helper.convert_model_to_external_data(proto, location="m.onnx.data")
    for source in (proto, proto.SerializeToString()):
        with pytest.raises(ModelLoadError, match="load it from its path"):
            load(source)


def test_unloadable_types_and_invalid_models(tmp_path):
    with pytest.raises(ModelLoadError, match="pass a path, bytes or an onnx.ModelProto"):
        load(42)
    broken = _proto()
    broken.graph.node[0].input[1] = "undefined"  # uses a value nothing defines
    path = tmp_path / "broken.onnx"
    path.write_bytes(broken.SerializeToString())
    with pytest.raises(ModelLoadError, match="invalid ONNX model"):
        load(path)
    assert os.path.getsize(path) == len(broken.SerializeToString())
