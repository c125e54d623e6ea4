"""prune-channels:reconstruct=true: the IR-free least-squares refit against numpy's lstsq
and its error bound, convolution patches against torch's conv2d, exact recovery when the kept
channels span the removed ones (linear and convolution; FX in eager and ONNX in ORT), a lower
held-out error than the plain cut on a nonlinear MLP, a transformer block (heads and FFN) and
a CNN with batch norms and a residual block, a bias-less consumer whose outputs another group
prunes in the same call, tied weights left alone, and typed errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from graphpress.graph import verify
from graphpress.graph.errors import PassSpecError, PreconditionError
from graphpress.passes.prune import PruneChannels
from graphpress.passes.prune._patches import ConvGeometry
from graphpress.passes.prune._reconstruct import refit
from graphpress.passes.quantize._gptq import InputStats

from .test_prune_channels import CNN, Attention


def _gram(x: np.ndarray) -> np.ndarray:
    stats = InputStats(x.shape[1], max_rows=0)
    stats.update(x)
    return stats.augmented_gram()


def test_refit_without_damping_is_the_least_squares_solution():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 10)) @ rng.normal(size=(10, 10)) + rng.normal(size=10)
    w = rng.normal(size=(6, 10))  # [N, C], input channels along axis 1
    kept = np.array([0, 2, 3, 5, 8, 9])
    result = refit(w, 1, _gram(x), kept, damping=0.0)
    design = np.concatenate([x[:, kept], np.ones((len(x), 1))], axis=1)
    expected = np.linalg.lstsq(design, x @ w.T, rcond=None)[0]  # [|K|+1, N]
    np.testing.assert_allclose(result.weight[:, kept], expected[:-1].T, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(result.bias_delta, expected[-1], rtol=1e-8, atol=1e-8)
    removed = np.setdiff1d(np.arange(10), kept)
    np.testing.assert_array_equal(result.weight[:, removed], w[:, removed])  # sliced later
    cut = np.square(x[:, removed] @ w[:, removed].T).sum()
    fitted = np.square(x @ w.T - design @ expected).sum()
    assert result.error_ratio == pytest.approx(fitted / cut, rel=1e-6)
    # the same weight stored transposed ([C, N], input along axis 0) gives the same refit
    again = refit(w.T, 0, _gram(x), kept, damping=0.0)
    np.testing.assert_allclose(again.weight, result.weight.T, rtol=1e-10, atol=1e-12)


def test_damping_moves_towards_the_plain_cut_and_never_past_it():
    rng = np.random.default_rng(1)
    x = np.tanh(rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16)))
    w = rng.normal(size=(5, 16))
    kept = np.arange(0, 16, 2)
    ratios = [refit(w, 1, _gram(x), kept, d).error_ratio for d in (0.0, 1e-2, 1.0, 1e3)]
    assert ratios == sorted(ratios) and ratios[0] < 0.9 and ratios[-1] <= 1.0
    heavy = refit(w, 1, _gram(x), kept, 1e8)
    np.testing.assert_allclose(heavy.weight[:, kept], w[:, kept], atol=1e-4)
    # a cut that loses nothing (removed channels never active) needs no refit
    x[:, 1::2] = 0.0
    assert refit(w, 1, _gram(x), kept, 1e-3) is None


class LinearPair(nn.Module):
    """No nonlinearity between fc1 and fc2: the 40 hidden channels span a 13-dimensional
    affine space, so any 20 of them reconstruct fc2's output exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 40), nn.Linear(40, 5)

    def forward(self, x):
        return self.fc2(self.fc1(x))


class Chain(nn.Module):
    """fc2 has no bias and its outputs form the next pruned group."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = (nn.Linear(12, 40), nn.Linear(40, 24, bias=False),
                                        nn.Linear(24, 5))

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.relu(self.fc1(x)))))


def _prune(h, model, ir_kind, calibration, **options):
    graph = h.graph_of(model, calibration[0], ir_kind)
    batches = [(x,) if ir_kind == "fx" else (x.numpy(),) for x in calibration]
    result = PruneChannels(**options)(graph, calibration=batches)
    verify(graph)
    return graph, result


@pytest.mark.parametrize("ir_kind", ["fx", "onnx"])
def test_kept_channels_spanning_the_removed_ones_reconstruct_exactly(h, ir_kind):
    model = LinearPair().eval()
    calibration = [torch.randn(64, 12) for _ in range(2)]
    held_out = torch.randn(64, 12)  # graphs are captured at the calibration shape
    expected = model(held_out).detach().numpy()
    plain, _ = _prune(h, model, ir_kind, calibration, ratio=0.5, importance="l1")
    refit_graph, result = _prune(h, model, ir_kind, calibration, ratio=0.5, importance="l1",
                                 reconstruct=True, damping=0.0)
    assert result.stats["consumers_refit"] == 1 and result.layers[0]["refit"] == 1
    assert result.layers[0]["refit_error_ratio"] < 1e-8
    assert np.abs(h.run_graph(plain, held_out) - expected).max() > 0.1
    np.testing.assert_allclose(h.run_graph(refit_graph, held_out), expected, atol=2e-4)


@pytest.mark.parametrize("ir_kind", ["fx", "onnx"])
def test_bias_less_consumer_with_pruned_outputs_gets_a_sliced_bias(h, ir_kind):
    torch.manual_seed(3)
    model = Chain().eval()
    calibration = [torch.randn(128, 12) for _ in range(2)]
    held_out = torch.randn(128, 12)
    expected = model(held_out).detach().numpy()
    options = {"ratio": 0.5, "importance": "activation", "scope": "all"}
    plain, _ = _prune(h, model, ir_kind, calibration, **options)
    refit_graph, result = _prune(h, model, ir_kind, calibration, reconstruct=True, **options)
    assert result.stats["groups_pruned"] == 2 and result.stats["consumers_refit"] == 2
    assert all(0 < row["refit_error_ratio"] < 1 for row in result.layers)
    got = h.run_graph(refit_graph, held_out)
    assert got.shape == expected.shape
    plain_error = np.square(h.run_graph(plain, held_out) - expected).mean()
    assert np.square(got - expected).mean() < 0.7 * plain_error


def test_fx_and_onnx_reconstructions_agree(h):
    torch.manual_seed(4)
    model = Chain().eval()
    calibration = [torch.randn(128, 12) for _ in range(2)]
    held_out = torch.randn(128, 12)
    options = {"ratio": 0.5, "importance": "activation", "reconstruct": True}
    fx_graph, _ = _prune(h, model, "fx", calibration, **options)
    onnx_graph, _ = _prune(h, model, "onnx", calibration, **options)
    np.testing.assert_allclose(h.run_graph(onnx_graph, held_out),
                               h.run_graph(fx_graph, held_out), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ir_kind", ["fx", "onnx"])
def test_transformer_block_heads_and_ffn(h, ir_kind):
    torch.manual_seed(5)
    model = Attention().eval()
    calibration = [torch.randn(8, 5, 64) for _ in range(4)]
    held_out = torch.randn(8, 5, 64)
    expected = model(held_out).detach().numpy()
    options = {"ratio": 0.5, "importance": "activation", "round_to": 8}
    plain, _ = _prune(h, model, ir_kind, calibration, **options)
    refit_graph, result = _prune(h, model, ir_kind, calibration, reconstruct=True, **options)
    rows = {row["kind"]: row for row in result.layers}
    assert rows["heads"]["refit"] == 1 and rows["ffn"]["refit"] == 1  # o and f2
    plain_error = np.square(h.run_graph(plain, held_out) - expected).mean()
    assert np.square(h.run_graph(refit_graph, held_out) - expected).mean() < plain_error


def test_convolution_patches_times_the_flat_weight_is_the_convolution():
    torch.manual_seed(0)
    x, w = torch.randn(2, 3, 9, 8), torch.randn(5, 3, 3, 2)
    geometry = ConvGeometry(kernel=(3, 2), stride=(2, 1), dilation=(1, 2), pads=(1, 0, 1, 0))
    expected = torch.nn.functional.conv2d(x, w, stride=(2, 1), padding=(1, 0), dilation=(1, 2))
    rows = geometry.patches(x.numpy()) @ w.reshape(5, -1).numpy().T  # [N·L, O]
    got = rows.reshape(2, -1, 5).transpose(0, 2, 1).reshape(expected.shape)
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-5)


class ConvPair(nn.Module):
    """A 1×1 convolution then an unpadded 3×3 one, nothing between: the 16 hidden channels are
    affine in the 3 input channels, so any 8 of them rebuild the second convolution exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 1), nn.Conv2d(16, 4, 3)

    def forward(self, x):
        return self.c2(self.c1(x))


@pytest.mark.parametrize("ir_kind", ["fx", "onnx"])
def test_convolution_consumer_reconstructs_exactly(h, ir_kind):
    model = ConvPair().eval()
    calibration = [torch.randn(8, 3, 10, 10) for _ in range(2)]
    held_out = torch.randn(8, 3, 10, 10)
    expected = model(held_out).detach().numpy()
    plain, _ = _prune(h, model, ir_kind, calibration, ratio=0.5, importance="l1")
    refit_graph, result = _prune(h, model, ir_kind, calibration, ratio=0.5, importance="l1",
                                 reconstruct=True, damping=0.0)
    assert result.stats["consumers_refit"] == 1 and result.layers[0]["refit_error_ratio"] < 1e-8
    assert np.abs(h.run_graph(plain, held_out) - expected).max() > 0.1
    np.testing.assert_allclose(h.run_graph(refit_graph, held_out), expected, atol=2e-4)


@pytest.mark.parametrize("ir_kind", ["fx", "onnx"])
def test_cnn_with_batch_norms_and_a_residual_block(h, ir_kind):
    torch.manual_seed(6)
    model = h.randomize_bn(CNN())
    calibration = [torch.randn(16, 3, 8, 8) for _ in range(4)]
    held_out = torch.randn(16, 3, 8, 8)
    expected = model(held_out).detach().numpy()
    options = {"ratio": 0.5, "importance": "activation", "round_to": 4}
    plain, _ = _prune(h, model, ir_kind, calibration, **options)
    refit_graph, result = _prune(h, model, ir_kind, calibration, reconstruct=True, **options)
    assert result.stats["consumers_refit"] >= 4  # block convolutions and the head
    plain_error = np.square(h.run_graph(plain, held_out) - expected).mean()
    assert np.square(h.run_graph(refit_graph, held_out) - expected).mean() < 0.7 * plain_error


class Tied(nn.Module):
    """fc2's weight is read by two linears: refitting it for one would change the other."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1a, self.fc1b, self.fc2 = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1a(x))) + self.fc2(torch.relu(self.fc1b(x)))


def test_tied_consumer_weight_keeps_the_plain_cut(h):
    model = Tied().eval()
    calibration = [torch.randn(32, 8)]
    graph, result = _prune(h, model, "fx", calibration, ratio=0.5, importance="l1",
                           reconstruct=True)
    assert result.stats["groups_pruned"] >= 1 and result.stats["consumers_refit"] == 0
    assert h.run_graph(graph, calibration[0]).shape == (32, 4)


def test_errors(h):
    with pytest.raises(PassSpecError, match="damping"):
        PruneChannels(reconstruct=True, damping=-1.0)
    graph = h.graph_of(LinearPair().eval(), torch.randn(4, 12), "fx")
    with pytest.raises(PreconditionError, match="reconstruct=true needs calibration"):
        PruneChannels(reconstruct=True)(graph)
