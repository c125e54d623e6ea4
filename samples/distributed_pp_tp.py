"""Pipeline × tensor parallel (2 × 2) on 4 ranks: a LLaMA-style decoder on torch.distributed.

    torchrun --standalone --nproc-per-node 4 samples/distributed_pp_tp.py

Every rank builds the same seeded model (transformers config, no download), captures it with
a dynamic batch, annotates 2 pipeline stages (partition-pipeline) and a Megatron split over 2
ranks (shard-tensor-parallel), takes its tensor-parallel shard and its pipeline stage, and runs
1F1B with 2 microbatches on torch.distributed.pipelining; the tensor-parallel all-reduces run
inside each stage on the "tp" group. The same is then done with ONNX Runtime sessions (one per
segment, all-reduces between them). The last stage's ranks print the difference from the
single-process model.
"""

from __future__ import annotations

import warnings

import torch
import transformers

import graphpress as gp
from graphpress.export.distributed import init_from_env, pp_tp_groups, run_pp_tp, run_pp_tp_ort


class Logits(torch.nn.Module):
    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits


def decoder() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=256, max_position_embeddings=64)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    return Logits(transformers.LlamaForCausalLM(config)).eval(), ids


def main() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch/transformers churn
    rank, world = init_from_env()
    torch.set_num_threads(1)
    groups = pp_tp_groups(pp=2, tp=2)
    model, ids = decoder()
    batch = {0: torch.export.Dim("batch", min=1, max=64)}
    with torch.no_grad():
        expected = model(ids)

    # torch.distributed: FX shard of this tp rank, cut into pipeline stages, 1F1B.
    gm = gp.graph.capture(model, (ids,), dynamic_shapes=(batch,))
    symbol = str(next(n for n in gm.graph.nodes if n.op == "placeholder").meta["val"].shape[0])
    gm = gp.optimize(gm, [f"partition-pipeline:stages=2,dims={symbol}={len(ids)}",
                          "shard-tensor-parallel:world_size=2"]).graph
    part = gp.shard(gm, groups.tp_rank, group_name=groups.tp_group_name)
    stages = gp.export.split_stages(part.graph)
    out = run_pp_tp(stages, (ids,), groups, schedule="1f1b", microbatches=2)
    if out is not None:
        print(f"rank {rank} (pp {groups.pp_rank}, tp {groups.tp_rank}) torch 1F1B: "
              f"max |diff| {(out[0] - expected).abs().max().item():.2e}")

    # ONNX Runtime: the same split, one session per segment of this rank's shard.
    onnx = gp.export.to_onnx(model, (ids,), dynamic_shapes=(batch,))
    onnx = gp.optimize(onnx, [f"partition-pipeline:stages=2,dims=batch={len(ids)}",
                              "shard-tensor-parallel:world_size=2"]).graph
    feed = {onnx.graph.inputs[0].name: ids.numpy()}
    got = run_pp_tp_ort(gp.shard(onnx, groups.tp_rank), feed, groups, microbatches=2,
                        intra_op_threads=1)
    if got is not None:
        print(f"rank {rank} (pp {groups.pp_rank}, tp {groups.tp_rank}) ONNX Runtime: "
              f"max |diff| {abs(got[0] - expected.numpy()).max():.2e}")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
