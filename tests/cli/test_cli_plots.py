"""CLI report options: --report embeds per-layer plots, --plots DIR writes them as PNG files."""

from __future__ import annotations

import base64
import io
import re
from dataclasses import dataclass
from typing import ClassVar

import matplotlib.image
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphpress.cli import main
from graphpress.passes import Pass, PassResult, registry

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class SpectrumProbe(Pass):
    """Test pass: changes nothing, reports each constant MatMul weight's singular values."""

    name: ClassVar[str] = "spectrum-probe"
    supports: ClassVar[frozenset[str]] = frozenset({"onnx"})
    rank: int = 2

    def run_onnx(self, model):
        rows = []
        for node in model.graph:
            weight = node.inputs[1].const_value if node.op_type == "MatMul" else None
            if weight is not None:
                s = np.linalg.svd(weight.numpy(), compute_uv=False)
                kept = np.sum(s[: self.rank] ** 2) / np.sum(s**2)
                rows.append({"layer": node.name, "rank": self.rank, "max_rank": s.size,
                             "energy_kept": float(kept), "spectrum": s.tolist(),
                             "output_error": float(np.sqrt(1 - kept))})
        return PassResult(model, False, {"layers": len(rows)}, layers=rows)


@pytest.fixture()
def probe(monkeypatch):
    monkeypatch.setitem(registry._PASSES, SpectrumProbe.name, SpectrumProbe)
    return SpectrumProbe.name


@pytest.fixture()
def model_path(tmp_path):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), f"w{i}")
             for i in range(2)]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"], name="fc1"),
             helper.make_node("MatMul", ["h", "w1"], ["y"], name="fc2")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], inits,
    )
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("graphpress: error: ")
    return err[0]


def test_report_embeds_plots_and_plots_dir_gets_files(model_path, tmp_path, probe, capsys):
    out, report, plots = tmp_path / "out.onnx", tmp_path / "r.html", tmp_path / "figs"
    code = main(["optimize", str(model_path), "-p", "dce", "-p", f"{probe}:rank=3",
                 "-o", str(out), "--report", str(report), "--plots", str(plots)])
    assert code == 0, capsys.readouterr().err
    stdout = capsys.readouterr().out
    assert "layers of pass 2 spectrum-probe:rank=3 (2):" in stdout
    assert f"wrote 3 plots to {plots}" in stdout
    names = sorted(p.name for p in plots.iterdir())
    assert names == ["2-spectrum-probe-output-error.png", "2-spectrum-probe-rank.png",
                     "2-spectrum-probe-spectra.png"]
    for name in names:
        data = (plots / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        image = matplotlib.image.imread(io.BytesIO(data), format="png")
        assert min(image.shape[:2]) > 100 and image[..., :3].std() > 0.05
    page = report.read_text(encoding="utf-8")
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert sorted(base64.b64decode(e) for e in embedded) == sorted(
        (plots / n).read_bytes() for n in names
    )
    assert "<script" not in page and 'class="layers"' in page and ">fc2</td>" in page


def test_plots_dir_without_layer_rows_writes_nothing(model_path, tmp_path, capsys):
    plots = tmp_path / "figs"
    assert main(["optimize", str(model_path), "-p", "dce", "-o", str(tmp_path / "o.onnx"),
                 "--plots", str(plots)]) == 0
    assert "no plots: no pass reported per-layer rows" in capsys.readouterr().out
    assert not plots.exists()


@pytest.mark.parametrize("option", ["--plots", "--report", "--json-report"])
def test_unusable_report_path_is_one_line_exit_2_before_any_output(
    model_path, tmp_path, probe, capsys, option
):
    target = tmp_path / "taken"
    if option == "--plots":
        target.write_text("a file, not a folder")
    else:
        target.mkdir()
    out = tmp_path / "out.onnx"
    code = main(["optimize", str(model_path), "-p", probe, "-o", str(out), option, str(target)])
    assert code == 2
    assert option in _error_line(capsys)
    assert not out.exists()


def test_plots_folder_that_cannot_be_made_is_one_line_exit_2(model_path, tmp_path, probe, capsys):
    (tmp_path / "file").write_text("x")
    plots = tmp_path / "file" / "figs"  # its parent is a file: mkdir fails
    code = main(["optimize", str(model_path), "-p", probe, "-o", str(tmp_path / "o.onnx"),
                 "--plots", str(plots)])
    assert code == 2
    assert f"cannot write {plots}: Not a directory" in _error_line(capsys)
