"""Clean up an existing ONNX file and write an HTML report of what changed.

    python samples/clean_onnx_file.py model.onnx cleaned.onnx report.html

The same as: graphpress optimize model.onnx -p eliminate-identity -p fold-constants -p dce
             -o cleaned.onnx --report report.html
"""

from __future__ import annotations

import sys

import onnx_ir.passes.common

import graphpress as gp


def main(source: str, target: str, report_path: str) -> None:
    original = gp.load(source)  # external data stays on disk until used
    passes = [
        "eliminate-identity",
        "fold-constants",
        onnx_ir.passes.common.CommonSubexpressionEliminationPass(),  # onnx_ir passes mix in
        "dce",
    ]
    result = gp.optimize(original, passes)
    gp.save(result.graph, target)  # atomic: temp file, then rename
    result.report.save_html(report_path, before=original, after=result.graph)
    print(result.report)
    print(gp.diff(original, result.graph))


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
