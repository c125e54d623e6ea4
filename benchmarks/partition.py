"""Partitioning: pipeline stage balance, boundary traffic, tensor-parallel collectives, memory.

Two models, captured to FX: all-MiniLM-L6-v2 (real weights, batch 8 × 128 tokens) and a
30-layer LLaMA-style decoder built from a ``transformers.LlamaConfig`` (random weights, GQA
with 4 KV heads of 8 query heads, batch 2 × 128). For each:

* ``partition-pipeline`` with 2, 4 and 8 stages and ``cost=flops|memory|mixed``: imbalance
  (largest stage / mean stage), the optimiser's proven optimum against the lower bound
  ``max(total / S, largest node)``, total and largest boundary bytes, planning time;
* ``shard-tensor-parallel`` with 2 and 4 ranks: all-reduces per transformer layer, parameters
  per rank against the total;
* memory per stage of the 4-stage FLOPs split: the estimate (the stage's weight bytes plus its
  peak live activation bytes, from ``graph/costs.py``) against the measured bytes (the stage
  module's own tensor storage plus the CPU allocator's peak while it runs, read from
  ``torch.profiler``); ratio = estimate / measured;
* on compressed graphs (MiniLM ONNX after ``quantize-dynamic`` and after 4-bit
  ``quantize-weights``): the weight bytes the cost model sees and the memory-balanced split.

    python benchmarks/partition.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, markdown_table, start_run, write  # noqa: E402

logger = logging.getLogger("benchmarks.partition")


def minilm_graph():
    import torch

    import graphpress as gp
    from graphpress.data import load_minilm, stdlib_sentences

    model, tokenizer = load_minilm()
    batch = tokenizer(stdlib_sentences()[:8], padding="max_length", truncation=True,
                      max_length=128, return_tensors="pt")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        gm = gp.graph.capture(model, (), inputs)
    return gm, inputs, model


def llama_graph(layers: int = 30):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import graphpress as gp

    config = LlamaConfig(vocab_size=8000, hidden_size=256, intermediate_size=688,
                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    inputs = {"input_ids": torch.randint(0, config.vocab_size, (2, 128)), "use_cache": False}
    gm = gp.graph.capture(model, (), inputs)
    return gm, inputs, model


def pipeline_rows(name: str, gm, stage_counts) -> list[dict]:
    import graphpress as gp

    rows = []
    for cost in ("flops", "memory", "mixed"):
        for stages in stage_counts:
            start = time.perf_counter()
            result = gp.optimize(gm, [f"partition-pipeline:stages={stages},cost={cost}"])
            seconds = time.perf_counter() - start
            stats = result.report.records[0].stats
            layers = result.report.records[0].layers
            boundaries = [row["boundary_bytes_out"] for row in layers[:-1]]
            rows.append({
                "model": name, "cost": cost, "stages": stages,
                "imbalance": stats["imbalance"],
                "optimum_over_bound": stats["optimum"] / stats["lower_bound"],
                "boundary_MB_total": sum(boundaries) / 1e6,
                "boundary_MB_max": max(boundaries, default=0) / 1e6,
                "seconds": seconds,
            })
            logger.info("%s %s×%d: imbalance %.4f, optimum/bound %.4f, boundary %.2f MB",
                        name, cost, stages, rows[-1]["imbalance"],
                        rows[-1]["optimum_over_bound"], rows[-1]["boundary_MB_total"])
    return rows


def tensor_parallel_rows(name: str, gm) -> list[dict]:
    import graphpress as gp

    rows = []
    for world in (2, 4):
        result = gp.optimize(gm, [f"shard-tensor-parallel:world_size={world}"])
        stats = result.report.records[0].stats
        rows.append({
            "model": name, "world_size": world,
            "groups_sharded": stats["groups_sharded"],
            "groups_replicated": stats["groups_replicated"],
            "all_reduces": stats["all_reduces"],
            "all_reduces_per_layer": stats["all_reduces_per_layer"],
            "params_per_rank_fraction": stats["params_per_rank"] / stats["params_total"],
        })
        logger.info("%s TP×%d: %s", name, world, rows[-1])
    return rows


def memory_rows(name: str, gm, inputs: dict) -> list[dict]:
    """Estimate vs measured per stage of the 4-stage FLOPs split (stages run in sequence)."""
    import torch

    import graphpress as gp
    from graphpress.graph.measured import module_storage_bytes, run_peak_bytes

    result = gp.optimize(gm, ["partition-pipeline:stages=4,cost=flops"])
    estimates = result.report.records[0].layers
    stages = gp.export.split_stages(result.graph)
    values = dict(inputs)
    rows = []
    for stage, estimate in zip(stages, estimates):
        args = tuple(values[v.name] for v in stage.inputs)
        activations = run_peak_bytes(stage.graph, args)
        weights = module_storage_bytes(stage.graph)
        estimated = estimate["weight_bytes"] + estimate["activation_peak"]
        measured = weights + activations
        rows.append({
            "model": name, "stage": stage.index,
            "weights_MB_est": estimate["weight_bytes"] / 1e6, "weights_MB_meas": weights / 1e6,
            "activations_MB_est": estimate["activation_peak"] / 1e6,
            "activations_MB_meas": activations / 1e6,
            "estimate_over_measured": estimated / measured,
        })
        with torch.no_grad():
            values.update(zip((v.name for v in stage.outputs), stage.graph(*args)))
    return rows


def compressed_rows(gm, inputs) -> list[dict]:
    """Cost model on compressed ONNX MiniLM: weights at their real size; memory-balanced split."""
    import graphpress as gp

    base = gp.export.to_onnx(gm, (), inputs)
    variants = {"fp32": base,
                "quantize-dynamic": gp.optimize(base, ["quantize-dynamic"]).graph,
                "quantize-weights 4-bit": gp.optimize(base, ["quantize-weights"]).graph}
    rows = []
    for label, model in variants.items():
        estimate = gp.graph.estimate_memory(model)
        split = gp.optimize(model, ["partition-pipeline:stages=4,cost=memory"])
        stats = split.report.records[0].stats
        rows.append({"model": f"MiniLM ONNX {label}", "weights_MB": estimate.weights / 1e6,
                     "activations_MB": estimate.activations_peak / 1e6,
                     "memory_split_imbalance": stats["imbalance"],
                     "largest_stage_MB": stats["max_stage_cost"] / 1e6})
        logger.info("%s", rows[-1])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6-layer decoder, 2 and 4 stages")
    args = parser.parse_args()
    start_run(logger)
    import torch

    torch.set_num_threads(2)
    stage_counts = (2, 4) if args.quick else (2, 4, 8)
    data: dict = {"machine": machine(), "pipeline": [], "tensor_parallel": [], "memory": []}
    models = {"MiniLM": minilm_graph(), "LLaMA-30L": llama_graph(6 if args.quick else 30)}
    for name, (gm, inputs, _) in models.items():
        data["pipeline"] += pipeline_rows(name, gm, stage_counts)
        data["tensor_parallel"] += tensor_parallel_rows(name, gm)
        data["memory"] += memory_rows(name, gm, inputs)
    data["compressed"] = compressed_rows(*models["MiniLM"][:2])
    markdown = "\n\n".join([
        "# Partitioning benchmark",
        f"Machine: {json.dumps(data['machine'])}",
        "## Pipeline stages (imbalance = largest stage / mean; optimum_over_bound = the "
        "optimiser's best largest stage / max(total/S, largest node))",
        markdown_table(data["pipeline"], ["model", "cost", "stages", "imbalance",
                                          "optimum_over_bound", "boundary_MB_total",
                                          "boundary_MB_max", "seconds"]),
        "## Tensor parallel",
        markdown_table(data["tensor_parallel"], ["model", "world_size", "groups_sharded",
                                                 "groups_replicated", "all_reduces",
                                                 "all_reduces_per_layer",
                                                 "params_per_rank_fraction"]),
        "## Memory per stage, 4-stage FLOPs split (estimate vs measured)",
        markdown_table(data["memory"], ["model", "stage", "weights_MB_est", "weights_MB_meas",
                                        "activations_MB_est", "activations_MB_meas",
                                        "estimate_over_measured"]),
        "## Compressed graphs (cost model sees real weight sizes)",
        markdown_table(data["compressed"], ["model", "weights_MB", "activations_MB",
                                            "memory_split_imbalance", "largest_stage_MB"]),
    ])
    paths = write("partition_quick" if args.quick else "partition", data, markdown)
    logger.info("wrote %s", ", ".join(map(str, paths)))


if __name__ == "__main__":
    main()
