"""distill's graph side: automatic teacher ↔ student feature pairs from pass provenance after
factor-low-rank, prune-channels (projections of the right shapes, linear and convolution
channel axes), fold-batchnorm (paired with the norm's output) and quantize-weights; tapped
copies returning intermediates equal to an FX interpreter's values; which constants a
trainable copy trains (Rules 1-6); a tiny BERT student (dict batches, ModelOutput, relation
loss, a pooling output= that reads the attention mask) healed against its teacher."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphpress as gp
from graphpress.passes.distill import auto_pairs, distill, trainable_copy
from graphpress.passes.distill._taps import tap
from graphpress.passes.distill.features import Projections, explicit_pairs


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models lose 10x or more to thread contention on the shared 2-core test machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(32, 64), nn.Linear(64, 48), nn.Linear(48, 16)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.fc = nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 4)
        self.register_buffer("scale", torch.tensor(2.0))
        self.register_buffer("order", torch.tensor([3, 2, 1, 0]))

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.bn(self.conv1(x)))))
        return self.fc(h.mean((2, 3)))[:, self.order] * self.scale


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    x = torch.randn(16, 32)
    return gp.capture(MLP().eval(), (x,)), x


@pytest.fixture(scope="module")
def cnn(h):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    return gp.capture(h.randomize_bn(CNN()), (x,)), x


def _features(teacher, student, pairs, x):
    with torch.no_grad():
        _, t = tap(teacher, [p.teacher for p in pairs])(x)
        _, s = tap(student, [p.student for p in pairs])(x)
    return s, t


def test_low_rank_pairs_the_second_thin_product_with_the_original_linear(mlp):
    teacher, x = mlp
    student = gp.optimize(teacher, ["factor-low-rank:rank=8"]).graph
    pairs = auto_pairs(teacher, student)
    assert [p.layer for p in pairs] == ["fc1", "fc2"]  # fc3 is the graph output (Rule 4)
    nodes = {n.name: n for n in student.graph.nodes}
    for pair in pairs:
        weight = nodes[pair.student].args[1]
        assert weight.target.endswith("lowrank_a")  # the second product of the pair (Rule 3)
    s, t = _features(teacher, student, pairs, x)
    assert [v.shape for v in s] == [v.shape for v in t] == [(16, 64), (16, 48)]
    # the tapped values are the nodes' values: an FX interpreter run of the same graphs agrees
    seen = {}

    class Record(torch.fx.Interpreter):
        def run_node(self, n):
            seen[n.name] = super().run_node(n)
            return seen[n.name]

    Record(teacher).run(x)
    torch.testing.assert_close(t[0], seen[pairs[0].teacher])
    projections = Projections(pairs, s, t, strict=True)
    assert all(isinstance(m, nn.Identity) for m in projections.maps)


def test_pruned_widths_get_projections_of_the_right_shapes(mlp):
    teacher, x = mlp
    student = gp.optimize(teacher, ["prune-channels:ratio=0.5"]).graph
    pairs = auto_pairs(teacher, student)
    assert [p.layer for p in pairs] == ["fc1", "fc2"]
    s, t = _features(teacher, student, pairs, x)
    assert [tuple(v.shape) for v in s] == [(16, 32), (16, 24)]
    projections = Projections(pairs, s, t, strict=True)
    assert [tuple(m.weight.shape) for m in projections.maps] == [(64, 32), (48, 24)]
    for index, (sv, tv) in enumerate(zip(s, t)):  # ridge-initialised: better than nothing
        with torch.no_grad():
            mapped = projections(index, sv)
        assert mapped.shape == tv.shape
        assert float((mapped - tv).pow(2).sum() / tv.pow(2).sum()) < 0.9
    result = distill(teacher, student, [(x,)] * 4, loss="mse", lr=1e-3)
    assert len(result.pairs) == 2
    assert {n for n, _ in result.student.named_parameters()} == {
        n for n, _ in student.named_parameters()}  # projections are dropped after training


def test_convolutions_pair_along_the_channel_axis(cnn):
    teacher, x = cnn
    student = gp.optimize(teacher, ["prune-channels:ratio=0.5,scope=conv,round_to=1"]).graph
    pairs = auto_pairs(teacher, student)
    # fc reads the pruned channels (its input is sliced) and is no graph output
    assert [(p.layer, p.axis) for p in pairs] == [("conv1", 1), ("conv2", 1), ("fc", -1)]
    s, t = _features(teacher, student, pairs, x)
    projections = Projections(pairs, s, t, strict=True)
    assert [tuple(m.weight.shape) for m in projections.maps[:2]] == [(8, 4), (8, 4)]
    assert isinstance(projections.maps[2], nn.Identity)  # same width: compared directly
    with torch.no_grad():
        assert projections(0, s[0]).shape == t[0].shape == (4, 8, 8, 8)


def test_folded_batch_norm_pairs_with_the_teacher_norm_output(cnn):
    teacher, x = cnn
    student = gp.optimize(teacher, ["fold-batchnorm"]).graph
    pairs = auto_pairs(teacher, student)
    nodes = {n.name: n for n in teacher.graph.nodes}
    assert [p.layer for p in pairs] == ["conv1"]
    assert "batch_norm" in str(nodes[pairs[0].teacher].target)  # not the teacher's conv
    s, t = _features(teacher, student, pairs, x)
    torch.testing.assert_close(s[0], t[0], atol=1e-5, rtol=1e-5)  # folding is exact


def test_quantized_layers_pair_and_their_constants_stay_frozen(mlp):
    teacher, x = mlp
    student = gp.optimize(teacher, ["quantize-weights:bits=4,block_size=16"]).graph
    assert [p.layer for p in auto_pairs(teacher, student)] == ["fc1", "fc2"]
    trainable = trainable_copy(student)
    assert sorted(trainable.params) == ["fc1.bias", "fc2.bias", "fc3.bias"]
    assert {why for name, why in trainable.frozen.items() if "weights" in name} <= {
        "created by quantize-weights", "not floating point"}
    result = distill(teacher, student, [(x,)] * 3, loss="mse", lr=1e-2, features=None)
    before, after = dict(student.named_buffers()), dict(result.student.named_buffers())
    assert all(torch.equal(before[k], after[k]) for k in before)  # codes, scales untouched
    assert not torch.equal(dict(student.named_parameters())["fc1.bias"],
                           dict(result.student.named_parameters())["fc1.bias"])


def test_trainable_copy_rules(cnn):
    teacher, _ = cnn
    trainable = trainable_copy(teacher, freeze=["fc.*"])
    assert sorted(trainable.params) == ["bn.bias", "bn.weight", "conv1.bias", "conv1.weight",
                                        "conv2.bias", "conv2.weight"]
    assert trainable.frozen == {"bn.running_mean": "batch-norm statistic",
                                "bn.running_var": "batch-norm statistic",
                                "fc.weight": "freeze pattern", "fc.bias": "freeze pattern",
                                "scale": "buffer", "order": "not floating point",
                                "bn.num_batches_tracked": "not floating point"}
    assert all(p.requires_grad for p in trainable.params.values())
    assert trainable.params["conv1.weight"] is not dict(teacher.named_parameters())[
        "conv1.weight"]
    pruned = gp.optimize(teacher, ["prune-channels:ratio=0.5,scope=conv,round_to=1"]).graph
    rules = trainable_copy(pruned).frozen
    stats = [n for n, why in rules.items() if why == "batch-norm statistic"]
    assert len(stats) == 2 and all(n.startswith("bn_running") for n in stats)  # pass-made
    finished = trainable_copy(pruned).finish()  # stored as before: buffers stay buffers
    assert set(dict(finished.named_buffers())) == set(dict(pruned.named_buffers()))


def test_explicit_pairs_by_node_or_name(mlp):
    teacher, x = mlp
    student = gp.optimize(teacher, ["factor-low-rank:rank=8"]).graph
    relu = next(n for n in teacher.graph.nodes if n.name == "relu")
    pairs = explicit_pairs(teacher, student, [(relu, "relu"), ("relu_1", "relu_1")])
    assert [(p.teacher, p.student) for p in pairs] == [("relu", "relu"), ("relu_1", "relu_1")]
    result = distill(teacher, student, [(x,)] * 2, features=[(relu, "relu")], loss="mse",
                     lr=1e-3)
    assert [(p.teacher, p.student) for p in result.pairs] == [("relu", "relu")]
    assert "feature" in result.history[0]


def test_tiny_bert_pruned_ffn_heals_with_projections_and_relation():
    import transformers

    torch.manual_seed(0)
    # initializer_range 0.2 (not 0.02): with the default, the random layers barely move the
    # residual stream and any compression keeps cosine ≈ 0.9998, leaving nothing to heal
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=32, initializer_range=0.2)
    model = transformers.BertModel(config).eval()
    gen = torch.Generator().manual_seed(1)

    def batch():
        return {"input_ids": torch.randint(0, 100, (4, 8), generator=gen),
                "attention_mask": torch.ones(4, 8, dtype=torch.long)}

    teacher = gp.capture(model, (), batch())
    student = gp.optimize(teacher, ["prune-channels:ratio=0.75,scope=ffn",
                                    "factor-low-rank:rank=4"]).graph
    pairs = {p.layer: p for p in auto_pairs(teacher, student)}
    assert len(pairs) == 13  # q, k, v, attention output, FFN in and out (x2), the pooler
    evals = [batch() for _ in range(2)]
    result = distill(teacher, student, [batch() for _ in range(6)], loss="cosine",
                     relation=True, steps=30, lr=3e-3, eval_batches=evals)
    used = {p.layer for p in result.pairs}
    assert "encoder.layer.0.intermediate.dense" in used  # FFN hidden 64 -> 16: projected
    assert all("relation" in r and "feature" in r
               for r in result.history if r["kind"] == "train")
    first, last = result.evaluations[0], result.evaluations[-1]
    assert last["cosine_mean"] > first["cosine_mean"] + 0.3  # measured 0.346 -> 0.878

    def pooled_cosine(graph):
        with torch.no_grad():
            out = graph(**evals[0])
            assert out.last_hidden_state.shape == (4, 8, 32)  # the model's own ModelOutput
            return float(torch.nn.functional.cosine_similarity(
                out.pooler_output, teacher(**evals[0]).pooler_output).mean())

    # the pooler output was not distilled, yet it heals too: measured 0.068 -> 0.708
    assert pooled_cosine(result.student) > pooled_cosine(student) + 0.3

    def sentence(out, inputs):  # a two-parameter output= also gets the batch: mask pooling
        mask = inputs["attention_mask"].unsqueeze(-1).float()
        return (out.last_hidden_state * mask).sum(1) / mask.sum(1)

    evals[0]["attention_mask"][:, 5:] = 0  # padding must not count
    pooled = distill(teacher, student, evals, loss="cosine", output=sentence, steps=1,
                     eval_batches=evals[:1], features=None).evaluations[0]
    with torch.no_grad():
        want = torch.nn.functional.cosine_similarity(
            sentence(student(**evals[0]), evals[0]), sentence(teacher(**evals[0]), evals[0]))
    assert pooled["cosine_mean"] == pytest.approx(float(want.mean()), abs=1e-6)
