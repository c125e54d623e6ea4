"""Pipeline parallel on torch.distributed.pipelining: 2 gloo ranks, GPipe and 1F1B, FX stages
from partition-pipeline + split_stages, equal to the single-process FX graph.

The rank side runs in the 2-rank launch shared with the other distributed tests
(``_distributed_checks``); the error cases are also checked up front, in this process, with
``validate_pipeline`` (no ranks needed).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from graphpress.export.distributed import DistributedError, validate_pipeline

sys.path.insert(0, str(Path(__file__).parent))
from _distributed_checks import two_rank_results  # noqa: E402
from _distributed_models import TOLERANCE, staged, static_staged  # noqa: E402

NOT_SPLIT = "cannot be split into 3 equal microbatches"
STATIC = "cannot run on a microbatch .*dynamic batch"


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    """Per rank: the pipeline checks of ``_distributed_checks._pipeline_checks``."""
    return [result["pipeline"] for result in two_rank_results()]


@pytest.mark.parametrize("name", ["mlp", "llama"])
def test_gpipe_and_1f1b_equal_the_single_process_graph(ranks, name):
    errors = ranks[1][name]["errors"]
    assert ranks[0][name]["errors"] == {}  # rank 0 holds stage 0 and gets no outputs
    assert set(errors) == {"gpipe", "1f1b"}
    assert max(errors.values()) <= TOLERANCE, errors


def test_a_batch_that_does_not_split_is_a_readable_error(ranks):
    text = ranks[0]["not_split"]
    assert text is not None and NOT_SPLIT in text  # raised by run_pipeline on its rank
    gm, stages, inputs = staged("mlp", 2)  # and found up front, without ranks
    with pytest.raises(DistributedError, match=NOT_SPLIT):
        validate_pipeline(stages, inputs, microbatches=3)
    validate_pipeline(stages, inputs, microbatches=2)  # the same stages are fine in halves


def test_stage_ranks_put_stage_0_on_rank_1(ranks):
    assert ranks[1]["swapped"] is None  # rank 1 holds stage 0 now; the outputs land on rank 0
    assert ranks[0]["swapped"] is not None and ranks[0]["swapped"] <= TOLERANCE


def test_a_static_batch_graph_cannot_be_microbatched(ranks):
    for result in ranks:  # run_pipeline refuses on every rank
        assert result["static"] is not None and re.search(STATIC, result["static"])
    static, inputs = static_staged(2)  # and validate_pipeline refuses in this process
    with pytest.raises(DistributedError, match=STATIC):
        validate_pipeline(static, inputs, microbatches=2)
    validate_pipeline(static, inputs, microbatches=1)  # the whole batch still runs


def test_validate_pipeline_refuses_what_run_pipeline_refuses():
    gm, stages, inputs = staged("mlp", 2)
    with pytest.raises(DistributedError, match="unknown schedule"):
        validate_pipeline(stages, inputs, schedule="zero-bubble")
    with pytest.raises(DistributedError, match="need a pipeline group of exactly 2 ranks"):
        validate_pipeline(stages, inputs, world_size=3)
    with pytest.raises(DistributedError, match="takes 1 inputs"):
        validate_pipeline(stages, (*inputs, *inputs))
