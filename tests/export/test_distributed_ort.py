"""ONNX Runtime on torch.distributed ranks: a pipeline of per-stage sessions, tensor-parallel
segments with all-reduce / all-gather between sessions, and PP×TP = 2×2 on 4 ranks through
``run-distributed`` under torchrun; all equal to one single-process ORT session.

The 2-rank side runs in the launch shared with the other distributed tests
(``_distributed_checks``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _distributed_checks import exported as exported_models  # noqa: E402
from _distributed_checks import two_rank_results
from _distributed_models import TOLERANCE, load_onnx  # noqa: E402

#: How the tests start the command under torchrun (``graphpress run-distributed`` once the CLI
#: registers it; the module entry runs the same code).
ENTRY = ["-m", "graphpress", "run-distributed"]


@pytest.fixture(scope="module")
def exported() -> dict:
    """name → (serialized ONNX with a dynamic batch, feed, single-process ORT outputs)."""
    return exported_models()


@pytest.fixture(scope="module")
def ort_ranks() -> list[dict]:
    """Per rank: the bert ORT pipeline and the llama ORT tensor-parallel shards (run in the
    2-rank launch shared with the other distributed tests, see ``_distributed_checks``)."""
    return [result["ort"] for result in two_rank_results()]


def test_ort_pipeline_with_microbatches_equals_one_session(exported, ort_ranks):
    reference = exported["bert"][2]
    results = [r["pipeline"] for r in ort_ranks]
    assert results[0]["outputs"] is None  # outputs land on the last stage's rank
    out = results[1]["outputs"]
    assert len(out) == len(reference) == 2  # last hidden state and pooled output
    for o, r in zip(out, reference):
        assert o.shape == r.shape and o.dtype == r.dtype
        assert np.abs(o - r).max() <= TOLERANCE
    assert results[1]["crossing"] == [2]  # hidden states and the attention mask cross
    for result in results:  # the providers the session really got, CUDA first when usable
        assert result["providers"][-1] == "CPUExecutionProvider"
        assert set(result["providers"]) <= set(result["requested"])


def test_ort_tensor_parallel_segments_equal_one_session(exported, ort_ranks):
    reference = exported["llama"][2]
    for result in (r["tensor_parallel"] for r in ort_ranks):  # every rank ends with the logits
        assert len(result["outputs"]) == 1
        assert np.abs(result["outputs"][0] - reference[0]).max() <= TOLERANCE
        # 2 layers × 2 all-reduces + the vocab-parallel embedding, then the LM head's gather
        assert result["collectives"] == ["all_reduce"] * 5 + ["all_gather"]
        assert result["segments"] == len(result["collectives"]) + 1


def test_run_distributed_pp2_tp2_on_four_torchrun_ranks(exported, tmp_path):
    from graphpress.graph import save

    data, feed, reference = exported["llama"]
    save(load_onnx(data), tmp_path / "model.onnx")
    np.savez(tmp_path / "inputs.npz", **feed)
    out = tmp_path / "out" / "outputs.npz"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "4", *ENTRY, str(tmp_path / "model.onnx"), "--pp", "2",
               "--tp", "2", "--microbatches", "2", "--inputs", str(tmp_path / "inputs.npz"),
               "--out", str(out), "--providers", "cpu", "--intra-op-threads", "1"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        text, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:  # torchrun and its ranks are one process group: stop them all
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, text[-3000:]
    line = next(x for x in text.splitlines() if x.startswith("run-distributed:"))
    assert "pp=2 tp=2 microbatches=2 on 4 ranks (CPUExecutionProvider)" in line
    assert "(ok, tolerance" in line
    names = [v.name for v in load_onnx(data).graph.outputs]
    with np.load(out) as written:
        assert written.files == names
        logits = written[names[0]]
    assert np.abs(logits - reference[0]).max() <= TOLERANCE  # checked here too, independently
    assert not list(out.parent.glob(".*tmp*"))  # written atomically: no temporary left
