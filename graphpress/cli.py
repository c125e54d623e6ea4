"""Command line: ``graphpress inspect|optimize|diff|passes|demo|run-distributed``.

Every failure the user can fix (a missing or broken model, an unknown pass or option, a graph a
pass does not support) prints one line ``graphpress: error: ...`` to stderr and exits with
code 2, writing no output and leaving the input untouched. Outputs are written atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from graphpress.graph.errors import GraphpressError

__all__ = ["main", "build_parser"]

logger = logging.getLogger(__name__)

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one readable line, exit 2
        self.exit(EXIT_USAGE, f"graphpress: error: {message} (see 'graphpress --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="graphpress", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each pass does")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    inspect = sub.add_parser("inspect", help="summarise an ONNX model")
    inspect.add_argument("model", help="path to an .onnx file")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    inspect.add_argument("--graph", action="store_true", help="also print every node")
    inspect.add_argument("--groups", action="store_true",
                         help="also print the coupled channel groups (one line each: name, "
                         "kind, size/unit, uses, prunable or why not)")
    inspect.add_argument("--memory", action="store_true",
                         help="also estimate memory (weights, peak activations, KV cache) and "
                         "list the costliest nodes by FLOPs")
    inspect.add_argument("--batch", type=int, metavar="N", help="batch size for --memory "
                         "(default: the model's static input shape)")
    inspect.add_argument("--seq", type=int, metavar="N", help="sequence length for --memory")
    inspect.add_argument("--dim", action="append", default=[], metavar="NAME=N",
                         help="bind a symbolic input dim for --memory; repeatable")
    inspect.add_argument("--kv-cache", choices=("auto", "yes", "no"), default="auto",
                         help="count a KV cache with --memory (auto: when attention is causal)")
    inspect.add_argument("--top", type=int, default=10, metavar="N",
                         help="nodes listed by --memory (default 10)")

    opt = sub.add_parser("optimize", help="run passes over an ONNX model and write ONNX")
    opt.add_argument("model", help="path to an .onnx file (never modified)")
    opt.add_argument("-p", "--pass", dest="passes", action="append", required=True,
                     metavar="SPEC", help="pass spec, e.g. dce or 'name:key=value'; repeatable")
    opt.add_argument("-o", "--output", required=True, help="where to write the optimised .onnx")
    opt.add_argument("--report", help="also write a single-file HTML report here (with "
                     "per-layer tables and plots of the passes that report layers)")
    opt.add_argument("--plots", metavar="DIR",
                     help="also write each per-layer plot as a PNG file in DIR, named "
                     "<pass-index>-<pass-name>-<plot>.png (pass index from 1)")
    opt.add_argument("--json-report", help="also write the report as JSON here")
    opt.add_argument("--calibration", metavar="NPZ",
                     help="calibration inputs for passes that need them: an .npz with one "
                     "array per model input (rows = samples)")
    opt.add_argument("--calibration-batch", type=int, default=8, metavar="N",
                     help="rows per calibration batch (default 8)")
    opt.add_argument("--verify", choices=("each", "end", "off"), default="each")
    opt.add_argument("--external-data", choices=("auto", "yes", "no"), default="auto",
                     help="store large weights in OUTPUT.data (auto: above 1 GiB)")

    diff = sub.add_parser("diff", help="show what changed between two ONNX models")
    diff.add_argument("before")
    diff.add_argument("after")
    diff.add_argument("--json", action="store_true")

    passes = sub.add_parser("passes", help="list the passes and their options")
    passes.add_argument("--json", action="store_true")

    demo = sub.add_parser("demo", help="compress all-MiniLM-L6-v2 end to end and report")
    demo.add_argument("--out", default="graphpress-demo", help="folder for the ONNX files")
    demo.add_argument("--sentences", type=int, default=64, help="real sentences for parity")
    demo.add_argument("-p", "--pass", dest="passes", action="append", metavar="SPEC",
                      help="compression pass for the ONNX model (default: quantize-dynamic); "
                      "repeatable, e.g. -p insert-qdq")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")

    from graphpress._run_distributed import HELP as RUN_DISTRIBUTED_HELP
    from graphpress._run_distributed import add_arguments as run_distributed_arguments

    run_distributed_arguments(sub.add_parser("run-distributed", help=RUN_DISTRIBUTED_HELP))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return _COMMANDS[args.command](args)
    except GraphpressError as exc:
        message = " ".join(str(exc).split())
        print(f"graphpress: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("graphpress: interrupted", file=sys.stderr)
        return 130


def _configure_logging(verbose: bool) -> None:
    """The CLI owns the console: our log level, and quieter torch/ORT unless --verbose."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not verbose:
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)  # ORT's own console: errors only
        for name in ("torch.onnx", "torch._export", "torch.export", "onnxscript"):
            logging.getLogger(name).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning)  # torch/transformers churn
        warnings.filterwarnings("ignore", category=DeprecationWarning)


def _inspect(args: argparse.Namespace) -> int:
    from graphpress import graph

    memory_options = _memory_options(args)
    model = graph.load(args.model)
    summary = graph.summary(model)
    groups = graph.channel_groups(model) if args.groups else None
    memory = None
    if args.memory:
        from graphpress.graph.memory_report import memory_report

        memory = memory_report(model, top=args.top, **memory_options)
    if args.json:
        data = summary.to_dict()
        if groups is not None:
            data["channel_groups"] = [dataclasses.asdict(g) for g in groups]
        if memory is not None:
            data["memory"] = memory.as_dict()
        print(json.dumps(data, indent=2, default=str))
    else:
        print(summary)
        if args.graph:
            print(graph.format(model))
        if groups is not None:
            print(_group_lines(groups))
        if memory is not None:
            print(memory)
    return 0


def _memory_options(args: argparse.Namespace) -> dict:
    """estimate_memory keywords from --batch/--seq/--dim/--kv-cache (checked before loading)."""
    given = [name for name, value in (("--batch", args.batch), ("--seq", args.seq),
                                      ("--dim", args.dim)) if value]
    if args.kv_cache != "auto":
        given.append("--kv-cache")
    if given and not args.memory:
        raise GraphpressError(f"{', '.join(given)}: only used by --memory; add --memory")
    if args.top < 0:
        raise GraphpressError(f"--top must be at least 0, got {args.top}")
    dims = {}
    for item in args.dim:
        name, _, value = item.partition("=")
        if not name or not value.strip().isdigit():
            raise GraphpressError(f"--dim {item!r}: expected NAME=N with N a whole number, "
                                  "e.g. --dim batch=4")
        dims[name.strip()] = int(value)
    for flag, value in (("--batch", args.batch), ("--seq", args.seq)):
        if value is not None and value < 1:
            raise GraphpressError(f"{flag} must be at least 1, got {value}")
    return {"batch": args.batch, "seq": args.seq, "dims": dims,
            "kv_cache": {"auto": None, "yes": True, "no": False}[args.kv_cache]}


def _group_lines(groups) -> str:
    lines = [f"channel groups: {len(groups)} ({sum(g.prunable for g in groups)} prunable)"]
    width = max((len(g.name) for g in groups), default=0)
    for g in groups:
        status = "prunable" if g.prunable else f"not prunable: {g.reason}"
        lines.append(f"  {g.name:<{width}}  {g.kind:<8}  {g.size}/{g.unit}  "
                     f"{len(g.uses)} uses  {status}")
    return "\n".join(lines)


def _optimize(args: argparse.Namespace) -> int:
    from graphpress import graph
    from graphpress.passes import optimize

    source, output = Path(args.model), Path(args.output)
    if source.exists() and output.exists() and source.resolve() == output.resolve():
        raise GraphpressError(
            f"output {output} is the input model; choose another -o path (inputs are never "
            "overwritten)"
        )
    _check_report_paths(args)
    original = graph.load(source)
    calibration = (
        _load_calibration(Path(args.calibration), args.calibration_batch)
        if args.calibration
        else None
    )
    result = optimize(original, args.passes, verify=args.verify, calibration=calibration)
    external = {"auto": None, "yes": True, "no": False}[args.external_data]
    graph.save(result.graph, output, external_data=external)
    print(result.report)
    try:
        if args.report:
            result.report.save_html(args.report, before=original, after=result.graph)
        if args.plots:
            written = result.report.save_plots(args.plots)
            print(f"wrote {len(written)} plots to {args.plots}" if written else
                  "no plots: no pass reported per-layer rows")
        if args.json_report:
            _write_text_atomic(Path(args.json_report), result.report.to_json())
    except OSError as exc:
        raise GraphpressError(
            f"cannot write {exc.filename or 'the report'}: {exc.strerror or exc}; choose a "
            "writable path for --report, --plots and --json-report"
        ) from None
    print(f"wrote {output}")
    return 0


def _check_report_paths(args: argparse.Namespace) -> None:
    """Refuse report paths that cannot work before any pass runs (nothing is written then)."""
    for option, value in (("--report", args.report), ("--json-report", args.json_report)):
        if value and Path(value).is_dir():
            raise GraphpressError(f"{option} {value} is a folder; give a file path")
    if args.plots and Path(args.plots).exists() and not Path(args.plots).is_dir():
        raise GraphpressError(f"--plots {args.plots} is a file; give a folder for the PNG plots")


def _load_calibration(path: Path, batch: int) -> list[dict]:
    """Split the arrays of an .npz (one per model input, rows = samples) into batches."""
    import zipfile

    import numpy as np

    if batch < 1:
        raise GraphpressError(f"--calibration-batch must be at least 1, got {batch}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise GraphpressError(
            f"{path}: cannot read calibration data ({exc}); pass an .npz written by "
            "numpy.savez with one array per model input"
        ) from None
    rows = {len(a) for a in arrays.values()}
    if not arrays or len(rows) != 1:
        raise GraphpressError(
            f"{path}: calibration arrays must be non-empty and have the same number of rows "
            f"(got {sorted(rows) or 'no arrays'})"
        )
    total = rows.pop()
    return [{k: v[i : i + batch] for k, v in arrays.items()} for i in range(0, total, batch)]


def _diff(args: argparse.Namespace) -> int:
    from graphpress import graph

    difference = graph.diff(graph.load(args.before), graph.load(args.after))
    print(json.dumps(difference.to_dict(), indent=2) if args.json else difference)
    return 0


def _passes(args: argparse.Namespace) -> int:
    from graphpress.passes import describe

    rows = describe()
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    for row in rows:
        print(f"{row['name']:<22} [{','.join(row['supports'])}] {row['summary']}")
        for option in row["options"]:
            print(f"    {option['name']}={option['default']!r}  ({option['type']})")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from graphpress.demo import COMPRESS_PASSES, run_demo

    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

    result = run_demo(
        Path(args.out),
        sentences=args.sentences,
        compress=args.passes or COMPRESS_PASSES,
        progress=not args.no_progress,
    )
    print(result.text())
    return 0


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _run_distributed(args: argparse.Namespace) -> int:
    from graphpress._run_distributed import run

    return run(args)


_COMMANDS = {
    "inspect": _inspect,
    "optimize": _optimize,
    "diff": _diff,
    "passes": _passes,
    "demo": _demo,
    "run-distributed": _run_distributed,
}
