"""distill on FX graphs: the loss formulas against hand computation (T² scaling, α mixing,
cosine, MSE, relation, feature), healing a low-rank-factored MLP (output cosine to the teacher
before/after), hard labels, sparsified students keeping their zeros, checkpoint/resume equal
to an uninterrupted run (with a cosine learning-rate schedule), the schedules' learning rates,
the caller's graphs unchanged, and typed errors for bad arguments."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

import graphpress as gp
from graphpress.graph.errors import PassSpecError, PreconditionError, UnsupportedGraphError
from graphpress.passes.distill import distill
from graphpress.passes.distill import losses as L


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny training loops lose 10x or more to thread contention on the shared 2-core test
    machine (a [32, 16] log_softmax took 15 ms on 2 threads, 2 µs on 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class MLP(nn.Module):
    def __init__(self, out: int = 16) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, out)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _data(count: int, seed: int, classes: int | None = None) -> list[tuple]:
    gen = torch.Generator().manual_seed(seed)
    if classes is None:
        return [(torch.randn(32, 32, generator=gen),) for _ in range(count)]
    return [(torch.randn(32, 32, generator=gen), torch.randint(0, classes, (32,), generator=gen))
            for _ in range(count)]


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return gp.capture(MLP().eval(), (torch.randn(32, 32),))


@pytest.fixture(scope="module")
def lowrank(teacher):
    return gp.optimize(teacher, ["factor-low-rank:rank=8"]).graph


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# --- loss numerics -------------------------------------------------------------------------

def test_kd_loss_matches_hand_computation_with_t2_scaling_and_alpha_mixing():
    gen = torch.Generator().manual_seed(3)
    zs, zt = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    y = torch.tensor([0, 4, 2, 1, 3, 0])
    s, t = zs.double().numpy(), zt.double().numpy()
    for temperature in (1.0, 2.0, 4.0):
        p_t, p_s = _softmax(t / temperature), _softmax(s / temperature)
        kl = (p_t * (np.log(p_t) - np.log(p_s))).sum(-1).mean()
        soft = temperature**2 * kl
        got = float(L.kd_loss(zs, zt, temperature=temperature))
        assert got == pytest.approx(soft, rel=1e-5)
        ce = -np.log(_softmax(s)[np.arange(6), y.numpy()]).mean()
        for alpha in (0.0, 0.3, 1.0):
            mixed = float(L.kd_loss(zs, zt, y, temperature=temperature, alpha=alpha))
            assert mixed == pytest.approx(alpha * ce + (1 - alpha) * soft, rel=1e-5)
    assert float(L.kd_loss(zs, zs, temperature=4.0)) == pytest.approx(0.0, abs=1e-6)
    # a [B, S, C] input averages over every position, like the flattened [B·S, C] one
    z3s, z3t = zs.reshape(2, 3, 5), zt.reshape(2, 3, 5)
    assert float(L.soft_kd(z3s, z3t, 2.0)) == pytest.approx(float(L.soft_kd(zs, zt, 2.0)))


def test_cosine_mse_relation_and_feature_losses_match_hand_computation():
    gen = torch.Generator().manual_seed(4)
    s, t = torch.randn(4, 3, 8, generator=gen), torch.randn(4, 3, 8, generator=gen)
    a, b = s.double().numpy(), t.double().numpy()
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    assert float(L.cosine_loss(s, t)) == pytest.approx((1 - cos).mean(), rel=1e-5)
    assert float(L.mse_loss(s, t)) == pytest.approx(((a - b) ** 2).mean(), rel=1e-5)

    def gram(x):  # per-sample mean over tokens, then pairwise cosine
        e = x.mean(1)
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        return e @ e.T

    assert float(L.relation_loss(s, t)) == pytest.approx(((gram(a) - gram(b)) ** 2).mean(),
                                                         rel=1e-5)
    assert float(L.relation_loss(s, s * 3.0)) == pytest.approx(0.0, abs=1e-9)  # scale-free
    f1, g1 = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen)
    want = np.mean([((a - b) ** 2).sum() / (b**2).sum(),
                    ((f1.numpy() - g1.numpy()) ** 2).sum() / (g1.numpy() ** 2).sum()])
    assert float(L.feature_loss([s, f1], [t, g1])) == pytest.approx(want, rel=1e-5)


# --- training ------------------------------------------------------------------------------

def test_healing_a_low_rank_mlp_raises_output_cosine(teacher, lowrank):
    evals = _data(4, seed=9)
    result = distill(teacher, lowrank, _data(10, seed=1), loss="cosine", features=None,
                     steps=50, lr=1e-2, eval_batches=evals, eval_every=25)
    first, last = result.evaluations[0], result.evaluations[-1]
    assert [r["step"] for r in result.evaluations] == [0, 25, 50]
    assert result.steps == 50 and sum(r["kind"] == "train" for r in result.history) == 50
    # measured: cosine 0.705 -> 0.878 (min 0.363 -> 0.703)
    assert last["cosine_mean"] > first["cosine_mean"] + 0.1
    assert last["cosine_min"] > first["cosine_min"]
    # the trained student's own output agrees with the recorded evaluation
    with torch.no_grad():
        cos = torch.cat([L.per_vector_cosine(result.student(x), teacher(x)) for (x,) in evals])
    assert float(cos.mean()) == pytest.approx(last["cosine_mean"], abs=1e-5)
    # and it still has the low-rank structure (same code, trained factors)
    assert result.student.code == lowrank.code


def test_auto_features_train_jointly_and_still_heal(teacher, lowrank):
    result = distill(teacher, lowrank, _data(10, seed=1), loss="mse", steps=40, lr=1e-2,
                     feature_weight=0.5, eval_batches=_data(4, seed=9))
    assert [p.layer for p in result.pairs] == ["fc1", "fc2"]  # fc3 feeds the output
    train = [r for r in result.history if r["kind"] == "train"]
    assert all("feature" in r and r["loss"] == pytest.approx(r["response"] + 0.5 * r["feature"])
               for r in train)
    assert np.mean([r["feature"] for r in train[-5:]]) < train[0]["feature"]
    first, last = result.evaluations[0], result.evaluations[-1]
    assert last["cosine_mean"] > first["cosine_mean"] + 0.05  # measured 0.705 -> 0.835


def test_labels_add_alpha_weighted_cross_entropy(teacher, lowrank):
    batches = _data(6, seed=2, classes=16)
    result = distill(teacher, lowrank, batches, loss="kd", temperature=2.0, alpha=0.25,
                     labels=1, features=None, steps=6, lr=1e-3, eval_batches=batches[:2])
    x, y = batches[0]
    with torch.no_grad():  # the first step's loss is computed with the untrained student
        zs, zt = lowrank(x).double().numpy(), teacher(x).double().numpy()
    soft = 4.0 * (_softmax(zt / 2) * (np.log(_softmax(zt / 2)) - np.log(_softmax(zs / 2)))
                  ).sum(-1).mean()
    ce = -np.log(_softmax(zs)[np.arange(32), y.numpy()]).mean()
    row = result.history[1]
    assert row["kind"] == "train" and row["step"] == 1
    assert row["hard"] == pytest.approx(ce, rel=1e-4)
    assert row["soft"] == pytest.approx(soft, rel=1e-4)
    assert row["loss"] == pytest.approx(0.25 * ce + 0.75 * soft, rel=1e-4)
    evaluation = result.evaluations[-1]
    assert 0.0 <= evaluation["accuracy"] <= 1.0 and 0.0 <= evaluation["agreement"] <= 1.0


@pytest.mark.parametrize("specs", [["sparsify:sparsity=0.5"],
                                   ["sparsify:sparsity=0.5", "prune-channels:ratio=0.25"]])
def test_sparsified_student_keeps_its_zeros(teacher, specs):
    sparse = gp.optimize(teacher, specs).graph  # pruned after: <weight>_sparse_prune
    before = {k: v.clone() for k, v in sparse.named_buffers() if "sparse" in k}
    assert len(before) == 3
    result = distill(teacher, sparse, _data(4, seed=1), loss="mse", steps=8, lr=1e-2)
    after = dict(result.student.named_buffers())
    for name, weight in before.items():
        zeros = weight == 0
        assert 0.4 < float(zeros.float().mean()) <= 0.5  # pruning removes some zeros too
        assert torch.equal(after[name] == 0, zeros), name  # exactly the same zeros
        assert not torch.equal(after[name], weight), name  # and the rest trained


def test_trained_student_exports_to_onnx_with_parity(h, teacher, lowrank):
    from graphpress.export import to_onnx

    result = distill(teacher, lowrank, _data(4, seed=1), loss="mse", steps=4, lr=1e-2)
    x = _data(1, seed=5)[0][0]
    model = to_onnx(result.student, (x,))
    assert h.onnx_ops(model).count("Gemm") == 6  # still three factored pairs
    with torch.no_grad():
        want, untrained = result.student(x).numpy(), lowrank(x).numpy()
    got = h.ort_outputs(model, {model.graph.inputs[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(got - untrained).max() > 1e-3  # the trained values are what was exported


def test_caller_graphs_are_never_modified(h, teacher, lowrank):
    snapshots = h.fx_snapshot(teacher), h.fx_snapshot(lowrank)
    result = distill(teacher, lowrank, _data(3, seed=1), steps=3, lr=1e-2)
    h.assert_fx_unchanged(teacher, snapshots[0])
    h.assert_fx_unchanged(lowrank, snapshots[1])
    assert result.student is not lowrank
    trained, original = dict(result.student.named_buffers()), dict(lowrank.named_buffers())
    assert all(trained[k] is not original[k] for k in original)


def test_one_shot_iterator_is_read_once_with_every_batch():
    torch.manual_seed(0)
    t = gp.capture(MLP().eval(), (torch.randn(32, 32),))
    s = gp.optimize(t, ["factor-low-rank:rank=4"]).graph
    result = distill(t, s, iter(_data(5, seed=1)), features=None, lr=1e-3, progress=True)
    assert result.steps == 5


def test_checkpoint_resume_equals_an_uninterrupted_run(tmp_path, teacher, lowrank):
    options = dict(loss="cosine", steps=20, lr=5e-3, checkpoint_every=5, schedule="cosine",
                   warmup=3, eval_batches=_data(2, seed=9), eval_every=10)
    batches = _data(8, seed=1)  # 20 steps cross two epoch boundaries
    straight = distill(teacher, lowrank, batches, **options)

    class Crash:
        """Re-iterable batches whose first reading stops with an error at the 13th batch."""

        def __init__(self) -> None:
            self.served = 0

        def __iter__(self):
            for batch in batches:
                self.served += 1
                if self.served == 13:
                    raise RuntimeError("simulated crash")
                yield batch

    path = tmp_path / "run.ckpt"
    with pytest.raises(RuntimeError, match="simulated crash"):
        distill(teacher, lowrank, Crash(), checkpoint=path, **options)
    assert path.exists() and os.listdir(tmp_path) == ["run.ckpt"]  # no temporary left over
    assert torch.load(path, weights_only=True)["step"] == 10
    resumed = distill(teacher, lowrank, batches, checkpoint=path, **options)
    assert resumed.steps == 20
    a, b = dict(straight.student.named_buffers()), dict(resumed.student.named_buffers())
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)
    assert [r["step"] for r in resumed.history] == [r["step"] for r in straight.history]
    for x, y in zip(straight.history, resumed.history):
        assert x.keys() == y.keys() and x["loss"] == pytest.approx(y["loss"], abs=1e-6)
    again = distill(teacher, lowrank, batches, checkpoint=path, **options)  # already done
    assert again.steps == 20 and len(again.history) == len(resumed.history)
    with pytest.raises(PreconditionError, match="another run.*lr"):
        distill(teacher, lowrank, batches, checkpoint=path, **{**options, "lr": 1e-3})


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_learning_rate_schedules_with_warmup(teacher, lowrank, schedule):
    result = distill(teacher, lowrank, _data(4, seed=1), loss="mse", features=None, epochs=3,
                     lr=2e-3, schedule=schedule, warmup=2)
    rates = [r["lr"] for r in result.history if r["kind"] == "train"]
    assert len(rates) == 12 and rates[:2] == pytest.approx([1e-3, 2e-3])
    t = np.arange(10) / 10  # the 10 steps after the warm-up, of a 12-step run
    expected = {"constant": np.full(10, 2e-3), "linear": 2e-3 * (1 - t),
                "cosine": 1e-3 * (1 + np.cos(np.pi * t))}[schedule]
    np.testing.assert_allclose(rates[2:], expected, rtol=1e-12)


def test_bad_arguments_raise_typed_errors(teacher, lowrank):
    batches = _data(2, seed=1)
    for options, match in [({"loss": "kl"}, "unknown loss"), ({"alpha": 1.5}, "alpha"),
                           ({"alpha": -0.1}, "alpha"), ({"optimizer": "lion"}, "optimizer"),
                           ({"temperature": 0}, "temperature"), ({"epochs": 0}, "epochs"),
                           ({"features": "all"}, "features"), ({"steps": 2.5}, "steps"),
                           ({"schedule": "step"}, "schedule"), ({"warmup": -1}, "warmup")]:
        with pytest.raises(PassSpecError, match=match):
            distill(teacher, lowrank, batches, **options)
    with pytest.raises(PreconditionError, match="empty"):
        distill(teacher, lowrank, [])
    with pytest.raises(PreconditionError, match="one-shot"):
        distill(teacher, lowrank, iter(batches), epochs=2)
    with pytest.raises(PreconditionError, match="schedule='cosine' needs the run's length"):
        distill(teacher, lowrank, iter(batches), schedule="cosine")
    other = gp.capture(MLP(out=8).eval(), (torch.randn(32, 32),))
    with pytest.raises(PreconditionError, match="output.*differ"):
        distill(teacher, other, batches)
    with pytest.raises(PreconditionError, match="captured"):  # a batch of another shape
        distill(teacher, lowrank, [(torch.randn(5, 32),)])
    with pytest.raises(PreconditionError, match="no node"):
        distill(teacher, lowrank, batches, features=[("linear", "nope")])
    with pytest.raises(UnsupportedGraphError, match="capture"):
        distill(MLP(), lowrank, batches)
    with pytest.raises(PreconditionError, match="labels"):
        distill(teacher, lowrank, batches, labels="labels")
