"""Periodic evaluation: student vs teacher on held-out batches, one history row."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch

from graphpress.graph.errors import PreconditionError

from ._config import DistillConfig
from ._data import call, select_output, split_batch, to_device
from ._objective import metrics

__all__ = ["evaluate"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def evaluate(teacher: Callable[..., Any], student: Callable[..., Any],
             batches: Iterable[Any], config: DistillConfig, device: torch.device,
             step: int, epoch: int) -> dict[str, Any]:
    """``{"kind": "eval", "step", "epoch", "loss", "cosine_mean", "cosine_min"[, "agreement"]
    [, "accuracy"], "batches"}`` over every batch of ``batches``."""
    totals: dict[str, float] = {}
    cosine_min, count = float("inf"), 0
    for batch in batches:
        args, kwargs, labels = to_device(split_batch(batch, config.labels), device)
        teacher_out = select_output(call(teacher, args, kwargs), config.output,
                                    kwargs or args)
        student_out = select_output(call(student, args, kwargs), config.output,
                                    kwargs or args)
        if student_out.shape != teacher_out.shape:
            raise PreconditionError(
                f"distill: on eval_batches the student's output {tuple(student_out.shape)} and "
                f"the teacher's {tuple(teacher_out.shape)} differ; pass output= selecting "
                "comparable tensors")
        row = metrics(student_out, teacher_out, labels, config)
        cosine_min = min(cosine_min, row.pop("cosine_min"))
        for key, value in row.items():
            totals[key] = totals.get(key, 0.0) + value
        count += 1
    if count == 0:
        raise PreconditionError("distill: eval_batches is empty; pass at least one batch or "
                                "eval_batches=None")
    vectors = totals["vectors"]
    result: dict[str, Any] = {"kind": "eval", "step": step, "epoch": epoch,
                              "loss": totals["loss"] / vectors,
                              "cosine_mean": totals["cosine_sum"] / vectors,
                              "cosine_min": cosine_min}
    if "agree" in totals:
        result["agreement"] = totals["agree"] / vectors
    if totals.get("labelled"):
        result["accuracy"] = totals["correct"] / totals["labelled"]
    result["batches"] = count
    logger.info("distill eval at step %d: cosine %.4f (min %.4f), loss %.4g", step,
                result["cosine_mean"], result["cosine_min"], result["loss"])
    return result
