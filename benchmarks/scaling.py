"""How optimize() time grows with graph size: dce + fold-constants on 10k..100k-node ONNX graphs.

The synthetic graph is a chain ``x -> Add -> Mul -> Relu -> ...`` in which every fourth step
adds a constant computed from two initializers (``Add(c_a, c_b)``: foldable) and every fifth
step leaves a dead side branch (``Sigmoid`` whose output nobody reads: removable). Each size is
loaded from bytes and optimised twice: with the defaults (structural copy, verification after
each pass) and with ``copy=False, verify="off"``, and the seconds are reported with the growth relative to the smallest size:
linear scaling means ``seconds / nodes`` stays flat.

    python benchmarks/scaling.py [--sizes 10000,30000,100000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, markdown_table, write  # noqa: E402

import graphpress as gp  # noqa: E402


def chain_model(nodes: int) -> bytes:
    """A valid ONNX model with about ``nodes`` nodes (see module docstring)."""
    graph_nodes, inits = [], []
    current, step = "x", 0
    one = np.ones(8, dtype=np.float32)
    while len(graph_nodes) < nodes:
        out = f"h{step}"
        if step % 4 == 0:
            a, b, c = f"ca{step}", f"cb{step}", f"cc{step}"
            inits += [helper.make_tensor(n, TensorProto.FLOAT, [8], one * 0.5) for n in (a, b)]
            graph_nodes.append(helper.make_node("Add", [a, b], [c], name=f"const{step}"))
            graph_nodes.append(helper.make_node("Mul", [current, c], [out], name=f"mul{step}"))
        elif step % 5 == 0:
            graph_nodes.append(helper.make_node("Sigmoid", [current], [f"dead{step}"], name=f"d{step}"))
            graph_nodes.append(helper.make_node("Relu", [current], [out], name=f"relu{step}"))
        else:
            graph_nodes.append(helper.make_node("Neg", [current], [out], name=f"neg{step}"))
        current, step = out, step + 1
    graph = helper.make_graph(
        graph_nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, [8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    return model.SerializeToString()


def measure_size(nodes: int, verify: str, copy: bool) -> dict:
    data = chain_model(nodes)
    start = time.perf_counter()
    model = gp.load(data)
    loaded = time.perf_counter()
    result = gp.optimize(model, ["dce", "fold-constants", "dce"], copy=copy, verify=verify)
    done = time.perf_counter()
    return {
        "nodes": len(onnx.load_from_string(data).graph.node),
        "verify": verify,
        "copy": copy,
        "nodes_after": result.report.records[-1].after.nodes,
        "load_s": loaded - start,
        "optimize_s": done - loaded,
        "us_per_node": (done - loaded) / nodes * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,30000,100000")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for verify, copy in (("each", True), ("off", False)):  # the defaults, and the leanest
        for size in sizes:
            row = measure_size(size, verify, copy)
            base = next((r for r in rows if r["verify"] == verify), row)
            row["growth_vs_smallest"] = row["optimize_s"] / base["optimize_s"]
            row["size_vs_smallest"] = row["nodes"] / base["nodes"]
            rows.append(row)
            print(row, flush=True)
    columns = ["nodes", "verify", "copy", "nodes_after", "load_s", "optimize_s", "us_per_node",
               "size_vs_smallest", "growth_vs_smallest"]
    markdown = "## optimize() scaling: dce + fold-constants + dce\n\n" + markdown_table(rows, columns)
    paths = write("scaling", {"machine": machine(), "rows": rows}, markdown)
    print(markdown)
    print("wrote", *paths)


if __name__ == "__main__":
    main()
