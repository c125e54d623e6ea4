"""Quantization-aware training on FX graphs (``prepare_qat`` / ``convert_qat``): step 0 equals the
quantized graph for every quantization pass, the straight-through and LSQ gradients against
torch's own fake-quant autograd and the LSQ formula, training lowers the loss, absmean ternary
recomputes its scales, convert rebuilds the original structure and exports with ORT parity,
QAT int4 beats PTQ int4 at equal size on scikit-learn digits, and a tiny BERT end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import graphpress as gp
from graphpress.export import to_onnx
from graphpress.graph import measure, verify
from graphpress.graph.errors import PreconditionError
from graphpress.graph.fx import PROVENANCE
from graphpress.passes.quantize._blockwise import BlockQuant, ternary
from graphpress.passes.quantize.qat import PREPARE_PASS, convert_qat, is_prepared, prepare_qat

SPECS = {
    "qdq": "insert-qdq",
    "dynamic": "quantize-dynamic:min_elements=1",
    "int4": "quantize-weights:bits=4,block_size=32,algorithm=rtn",
    "ternary": "quantize-ternary:block_size=32",
    "ternary_rows": "quantize-ternary:block_size=16,per_channel=true",
    "int2_symmetric": "quantize-weights:bits=2,block_size=16,algorithm=rtn,symmetric=true",
    "gptq": "quantize-weights:bits=4,block_size=32,algorithm=gptq",
    "awq": "quantize-weights:bits=4,block_size=32,algorithm=awq",
}
CALIBRATED = {"qdq", "gptq", "awq"}
BATCH = 16


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small CPU kernels on a shared machine: one thread avoids oversubscription stalls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _mlp() -> nn.Module:
    torch.manual_seed(0)  # K = 48 on the second layer: a padded, sliced last block
    return nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16)).eval()


@pytest.fixture(scope="module")
def mlp():
    model = _mlp()
    gm = gp.capture(model, (torch.randn(BATCH, 64),))
    calibration = [(torch.randn(BATCH, 64, generator=torch.Generator().manual_seed(i)),)
                   for i in range(4)]
    quantized = {kind: gp.optimize(gm, [spec], calibration=calibration if kind in CALIBRATED
                                   else None).graph for kind, spec in SPECS.items()}
    return model, gm, quantized


def _inputs(seed: int, count: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(BATCH, 64, generator=g) for _ in range(count)]


def _train(p, teacher, steps: int, lr: float = 0.1, seed: int = 1) -> None:
    """``steps`` of SGD (momentum 0.9) on the MSE to ``teacher`` on fresh random inputs."""
    opt = torch.optim.SGD(p.parameters(), lr=lr, momentum=0.9)
    for x in _inputs(seed, steps):
        with torch.no_grad():
            target = teacher(x)
        loss = nn.functional.mse_loss(p(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()


@torch.no_grad()
def _mse(graph, teacher) -> float:
    """Mean squared error to ``teacher`` on held-out random inputs."""
    return float(np.mean([nn.functional.mse_loss(graph(x), teacher(x)).item()
                          for x in _inputs(1000, 8)]))


def _ort(h, graph, x: torch.Tensor) -> np.ndarray:
    model = to_onnx(graph, (x,))
    return h.ort_outputs(model, {model.graph.inputs[0].name: x.numpy()})[0], model


@pytest.mark.parametrize("learn", [False, True], ids=["fixed", "lsq"])
@pytest.mark.parametrize("kind", list(SPECS))
def test_step0_equals_quantized_and_convert_rebuilds_it(h, mlp, kind, learn):
    _, _, quantized = mlp
    q = quantized[kind]
    snapshot = h.fx_snapshot(q)
    p = prepare_qat(q, learn_scales=learn)
    verify(p)
    h.assert_fx_unchanged(q, snapshot)
    x = _inputs(7)[0]
    with torch.no_grad():
        torch.testing.assert_close(p(x), q(x), rtol=0, atol=1e-6)
    params = dict(p.named_parameters())
    assert {"0_weight_qat_weight", "2_weight_qat_weight"} <= set(params)
    assert ("0_weight_qat_scale" in params) == learn
    assert not any(n.endswith(("_q", "_codes")) for n, _ in p.named_buffers())  # now masters
    created = [n for n in p.graph.nodes if n.name not in {m.name for m in q.graph.nodes}]
    assert created and all(n.meta.get(PROVENANCE) for n in created)
    # nothing trained yet: convert gives back the quantized graph, op for op and bit for bit
    prepared = h.fx_snapshot(p)
    c = convert_qat(p)
    h.assert_fx_unchanged(p, prepared)
    verify(c)
    assert not is_prepared(c) and h.fx_ops(c) == h.fx_ops(q)
    before, after = dict(q.named_buffers()), dict(c.named_buffers())
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(n.meta.get(PROVENANCE) != PREPARE_PASS for n in c.graph.nodes)


def test_ste_gradient_matches_torch_fake_quant_inside_and_outside_the_range(mlp):
    """One linear layer after insert-qdq: the master weight's and the input's gradients are
    torch's fake-quant STE (the float gradient inside the clip range, zero outside)."""
    torch.manual_seed(3)
    layer = nn.Linear(16, 8).eval()
    gm = gp.capture(layer, (torch.randn(BATCH, 16),))
    q = gp.optimize(gm, ["insert-qdq"], calibration=[(0.5 * torch.randn(BATCH, 16),)]).graph
    p = prepare_qat(q)
    master = p.get_parameter("weight_qat_weight")
    scale, zero = q.get_buffer("weight_qdq_scale"), q.get_buffer("weight_qdq_zero_point")
    a_scale, a_zero = (next(n for n in q.graph.nodes if "quantize_per_tensor" in str(n.target))
                       .args[1:3])
    with torch.no_grad():  # push some weights and inputs far outside their clipping ranges
        master[0, :3] = 300 * scale[0]
        master[5, 7] = -300 * scale[5]
    x = torch.randn(BATCH, 16)
    x[0, :4] = 40.0
    x[3, 2] = -40.0
    grad_out = torch.randn(BATCH, 8)
    xp = x.clone().requires_grad_()
    (p(xp) * grad_out).sum().backward()
    w_ref = master.detach().clone().requires_grad_()
    x_ref = x.clone().requires_grad_()
    y_ref = nn.functional.linear(
        torch.fake_quantize_per_tensor_affine(x_ref, a_scale, a_zero, 0, 255),
        torch.fake_quantize_per_channel_affine(w_ref, scale, zero.int(), 0, -127, 127),
        layer.bias)
    (y_ref * grad_out).sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(p(x), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(master.grad, w_ref.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(xp.grad, x_ref.grad, rtol=1e-6, atol=1e-7)
    assert (master.grad[0, :3] == 0).all() and master.grad[5, 7] == 0  # outside: zero
    assert (xp.grad[0, :4] == 0).all() and xp.grad[3, 2] == 0
    inside = master.grad[1:5]
    assert (inside != 0).all()  # inside: the float gradient dL/dŴ = grad_outᵀ·x̂
    x_hat = torch.fake_quantize_per_tensor_affine(x, a_scale, a_zero, 0, 255)
    torch.testing.assert_close(inside, (grad_out.T @ x_hat)[1:5], rtol=1e-5, atol=1e-6)


def test_lsq_scale_gradient_follows_esser_and_the_scales_train(mlp):
    """4-bit blocks with learned scales: autograd's scale gradient is LSQ's formula, scales
    move under training and convert stores exactly the learned values."""
    model, _, quantized = mlp
    p = prepare_qat(quantized["int4"], learn_scales=True)
    scale, master = p.get_parameter("0_weight_qat_scale"), p.get_parameter("0_weight_qat_weight")
    zero = p.get_buffer("0_weight_qat_zero_points").float()
    with torch.no_grad():  # off the grid (at step 0 round(v) − v is 0), some beyond it
        noise = torch.randn(48, 2, 32, generator=torch.Generator().manual_seed(4))
        master.add_((noise * scale).reshape(48, 64))
        master[:4, :8] *= 4.0
    x = _inputs(11)[0]
    grad_out = torch.randn(BATCH, 16)
    (p(x) * grad_out).sum().backward()
    # dL/dŴ of the first layer, from a float replica of the graph on the dequantized weights
    c = convert_qat(p)
    w_hat = _decoded(c, "0_weight_weights").requires_grad_()
    hidden = torch.relu(nn.functional.linear(x, w_hat, model[0].bias))
    out = nn.functional.linear(hidden, _decoded(c, "2_weight_weights"), model[2].bias)
    (out * grad_out).sum().backward()
    v = master.detach().reshape(48, 2, 32) / scale.detach()
    u = torch.round(v) + zero
    term = torch.where(u < 0, -zero, torch.where(u > 15, 15 - zero, torch.round(v) - v))
    g = 1.0 / (32 * (15 - float(zero.mean()))) ** 0.5
    expected = g * (w_hat.grad.reshape(48, 2, 32) * term).sum(-1, keepdim=True)
    assert bool((u < 0).any()) and bool((u > 15).any())  # both clipping branches occur
    torch.testing.assert_close(scale.grad, expected, rtol=1e-4, atol=1e-6)
    assert bool((scale.grad.abs() > 1e-3).float().mean() > 0.5)
    start = scale.detach().clone()
    _train(p, model, steps=20, lr=0.01)
    assert not torch.equal(scale.detach(), start)
    c = convert_qat(p)
    torch.testing.assert_close(c.get_buffer("0_weight_weights_scales"), scale.detach(),
                               rtol=0, atol=0)


def _decoded(c, prefix: str) -> torch.Tensor:
    """The dequantized ``[N, K]`` weight of a converted block-quantized layer."""
    codes = c.get_buffer(f"{prefix}_codes").numpy()
    scales = c.get_buffer(f"{prefix}_scales").numpy()[..., 0]
    zeros = c.get_buffer(f"{prefix}_zero_points").numpy()[..., 0]
    k = 64 if prefix.startswith("0") else 48
    bq = BlockQuant(None, scales, zeros, 4, 32, k, packed=codes.reshape(codes.shape[0], -1, 16))
    return torch.from_numpy(bq.dequantize())


def test_int4_training_lowers_loss_converts_in_range_and_exports(h, mlp):
    model, _, quantized = mlp
    q = quantized["int4"]
    snapshot = h.fx_snapshot(q)
    p = prepare_qat(q)
    _train(p, model, steps=100)
    h.assert_fx_unchanged(q, snapshot)  # training the prepared graph never touches q
    c = convert_qat(p)
    assert _mse(c, model) < 0.85 * _mse(q, model)  # measured 3.3e-4 vs 4.5e-4
    verify(c)
    packed = c.get_buffer("0_weight_weights_codes")
    assert packed.dtype == torch.uint8 and not torch.equal(packed, q.get_buffer(
        "0_weight_weights_codes"))  # the codes moved
    assert measure(c).bytes == measure(q).bytes
    x = _inputs(99)[0]
    with torch.no_grad():
        expected = p(x)
        torch.testing.assert_close(c(x), expected, rtol=0, atol=1e-6)
    got, _ = _ort(h, c, x)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("kind", "block", "rows"), [("ternary", 32, False),
                                                    ("ternary_rows", 16, True)])
def test_ternary_absmean_recomputes_gamma_from_the_master_weight(h, mlp, kind, block, rows):
    model, _, quantized = mlp
    q = quantized[kind]
    p = prepare_qat(q)
    _train(p, model, steps=60)
    c = convert_qat(p)
    assert _mse(c, model) < 0.7 * _mse(q, model)
    for layer, k in (("0", 64), ("2", 48)):  # = quantize-ternary of the trained master
        master = p.get_parameter(f"{layer}_weight_qat_weight").detach().numpy()
        reference = ternary(master, block, per_channel=rows)
        scales = c.get_buffer(f"{layer}_weight_ternary_scales").numpy()[..., 0]
        assert bool((scales == scales[:, :1]).all()) == rows  # one scale per row, or per block
        np.testing.assert_allclose(scales, reference.scales, rtol=1e-3)
        assert np.mean(scales == reference.scales) > 0.99
        codes = BlockQuant(None, scales, None, 2, block, k, packed=c.get_buffer(
            f"{layer}_weight_ternary_codes").numpy().reshape(scales.shape[0], -1, block // 4)).q
        assert set(np.unique(codes[:, :k])) <= {1, 2, 3}  # ternary: code 0 never appears
        assert np.mean(codes == reference.q) > 0.99
    x = _inputs(5)[0]
    with torch.no_grad():
        expected = p(x)
    got, _ = _ort(h, c, x)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["qdq", "dynamic"])
def test_int8_lsq_training_exports_the_same_qdq_structure(h, mlp, kind):
    model, _, quantized = mlp
    q = quantized[kind]
    p = prepare_qat(q, learn_scales=True)
    _train(p, model, steps=10, lr=0.01)
    c = convert_qat(p)
    codes = c.get_buffer("0_weight_qdq_q" if kind == "qdq" else "0_weight_qdyn_q")
    assert codes.dtype == torch.int8 and int(codes.min()) >= -127  # symmetric restricted range
    x = _inputs(3)[0]
    with torch.no_grad():
        expected = p(x).numpy()
    got, onnx_model = _ort(h, c, x)
    _, original = _ort(h, q, x)
    assert sorted(h.onnx_ops(onnx_model)) == sorted(h.onnx_ops(original))
    assert "QuantizeLinear" in h.onnx_ops(onnx_model)
    # ORT computes x/s, torch x·(1/s): an activation on a rounding tie moves one step (as for
    # any insert-qdq graph, tests/passes/test_quantize_static.py); FX convert is exact
    close = np.isclose(got, expected, rtol=1e-5, atol=1e-5)
    assert close.mean() >= 0.9 and np.abs(got - expected).max() < 5e-3
    with torch.no_grad():
        torch.testing.assert_close(c(x), p(x), rtol=0, atol=1e-6)


def test_qat_int4_beats_ptq_int4_at_equal_size_on_digits():
    from sklearn.datasets import load_digits

    features, labels = load_digits(return_X_y=True)
    x = torch.tensor(features / 16.0, dtype=torch.float32)
    y = torch.tensor(labels)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = order[:1200], order[1200:]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(200):
        loss = nn.functional.cross_entropy(model(x[train]), y[train])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    teacher = gp.capture(model, (x[:8],), dynamic_shapes=({0: torch.export.Dim("batch")},))
    ptq = gp.optimize(teacher, ["quantize-weights:bits=4,block_size=32,algorithm=rtn,"
                                "symmetric=true"]).graph
    p = prepare_qat(ptq)
    opt = torch.optim.Adam(p.parameters(), 1e-3)
    with torch.no_grad():
        targets = model(x[train])
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        batch = torch.randint(0, len(train), (128,), generator=g)
        loss = nn.functional.mse_loss(p(x[train][batch]), targets[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    qat = convert_qat(p)
    with torch.no_grad():
        reference = model(x[test])
        cos = {name: float(nn.functional.cosine_similarity(graph(x[test]), reference).mean())
               for name, graph in (("ptq", ptq), ("qat", qat))}
        acc = {name: float((graph(x[test]).argmax(1) == y[test]).float().mean())
               for name, graph in (("ptq", ptq), ("qat", qat), ("float", model))}
    assert measure(qat).bytes == measure(ptq).bytes  # equal size: same bits, blocks, scales
    assert 1 - cos["qat"] < 0.5 * (1 - cos["ptq"])
    assert acc["qat"] >= acc["ptq"] - 0.005 and acc["qat"] >= acc["float"] - 0.02


def test_tiny_bert_int4_prepare_train_convert_export(h):
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128,
                                     max_position_embeddings=32)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    feed = {"input_ids": ids, "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    teacher = gp.capture(model, (), feed)
    q = gp.optimize(teacher, ["quantize-weights:bits=4,block_size=32,algorithm=rtn"]).graph
    p = prepare_qat(q)
    hidden = lambda graph: graph(**feed)["last_hidden_state"]  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(hidden(p), hidden(q), rtol=0, atol=1e-6)
        target = hidden(teacher)
    sites = sum(n.endswith("_qat_weight") for n, _ in p.named_parameters())
    assert sites == 16  # 3 embedding tables, 6 linears per layer x 2 layers, the pooler
    opt = torch.optim.AdamW(p.parameters(), 1e-4, weight_decay=0.0)
    for _ in range(15):
        loss = nn.functional.mse_loss(hidden(p), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    c = convert_qat(p)
    with torch.no_grad():  # measured 5.8e-3 -> 4.7e-3
        before, after = (float(nn.functional.mse_loss(hidden(g), target)) for g in (q, c))
    assert after < 0.9 * before
    onnx_model = to_onnx(c, (), feed)
    names = [v.name for v in onnx_model.graph.inputs]
    got = h.ort_outputs(onnx_model, {n: feed[n].numpy() for n in names})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, hidden(p).numpy(), rtol=1e-4, atol=1e-4)


def test_preconditions(mlp):
    model, gm, quantized = mlp
    with pytest.raises(PreconditionError, match="quantize it first"):
        prepare_qat(gm)
    with pytest.raises(PreconditionError, match="prepare_qat"):
        convert_qat(quantized["int4"])
    p = prepare_qat(quantized["int4"])
    with pytest.raises(PreconditionError, match="already prepared"):
        prepare_qat(p)
    with pytest.raises(PreconditionError, match="GraphModule"):
        prepare_qat(model)


def test_distill_with_qat_trains_the_quantized_student_and_converts_it_back(mlp):
    """``distill(..., qat=True)``: the 4-bit student trains with STE against its float teacher,
    gets closer to it than the PTQ graph, and comes back in the quantized pass's structure
    at the same size."""
    _, teacher, quantized = mlp
    ptq = quantized["int4"]
    batches = [(x,) for x in _inputs(3, 8)]
    result = gp.distill(teacher, ptq, batches, loss="mse", features=None, steps=120, lr=1e-4,
                        qat=True, eval_batches=[(x,) for x in _inputs(9, 2)])
    healed = result.student
    assert not is_prepared(healed)
    ops = [n.target for n in healed.graph.nodes if n.op == "call_function"]
    assert ops == [n.target for n in ptq.graph.nodes if n.op == "call_function"]
    assert measure(healed).bytes == measure(ptq).bytes
    assert _mse(healed, teacher) < 0.85 * _mse(ptq, teacher)  # measured 0.73x
    evaluations = result.evaluations
    assert evaluations[-1]["cosine_mean"] > evaluations[0]["cosine_mean"]
