"""The multi-scale CNN against docs/original.md: sizes, pooling kinds, init, batch norm, dropout."""
import math

import pytest
import torch
import torch.nn as nn

import common


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return common.MSCNN(n_tags=50)


def test_parameter_count(model):
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2_936_810
    assert sum(p.numel() for p in common.MSCNN(n_tags=10).parameters()) == 2_936_810 - 40 * 501


def test_shapes_of_every_block(model):
    x = torch.randn(2, 1, common.N_MELS, common.N_FRAMES)
    model.eval()
    with torch.no_grad():
        branches = model.features(x)
        assert [tuple(b.shape) for b in branches] == [(2, 70, 16, 19)] * 3
        merged = model.merge(torch.cat(branches, dim=1))
        assert merged.shape == (2, 5040)
        assert model(x).shape == (2, 50)


def test_pooling_kinds_per_branch(model):
    # branch 2 and 3 see the input average-pooled (a widely shared port max-pools here)
    assert isinstance(model.subsample, nn.AvgPool2d) and model.subsample.kernel_size == (2, 4)
    for branch in (model.branch1, model.branch2, model.branch3, model.merge):
        assert not any(isinstance(m, nn.AvgPool2d) for m in branch.modules())
    def pools(seq):
        return [m.kernel_size for m in seq if isinstance(m, nn.MaxPool2d)]
    assert pools(model.branch1) == [(2, 4), (2, 4), (2, 2)]
    assert pools(model.branch2) == [(2, 4), (2, 2)]
    assert pools(model.branch3) == [(2, 2)]
    assert pools(model.merge) == [(2, 2)]
    # branch 3 = two average-pools of the input: check against a direct computation
    x = torch.randn(1, 1, 128, 628)
    quarter = nn.functional.avg_pool2d(x, (4, 16))
    assert torch.allclose(model.subsample(model.subsample(x)), quarter, atol=1e-6)


def test_convolutions_are_same_padded_with_relu(model):
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [
        (50, (3, 7)), (100, (3, 5)), (70, (3, 3)), (100, (3, 5)), (70, (3, 3)), (70, (3, 3)),
        (70, (3, 3)), (70, (3, 3))]
    assert all(c.padding == (c.kernel_size[0] // 2, c.kernel_size[1] // 2) for c in convs)
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == len(convs) + 1


def test_batch_norm_and_dropout_settings(model):
    bn = model.head[0]
    assert isinstance(bn, nn.BatchNorm1d) and bn.num_features == 5040
    assert bn.eps == 1e-3 and bn.momentum == 0.01  # running = 0.99 running + 0.01 batch
    assert isinstance(model.head[1], nn.Dropout) and model.head[1].p == pytest.approx(0.4)
    # running statistics move by 1% of the batch statistics per step
    bn = nn.BatchNorm1d(3, eps=1e-3, momentum=0.01).train()
    bn(torch.full((4, 3), 10.0) + torch.arange(4.0)[:, None])
    assert torch.allclose(bn.running_mean, torch.full((3,), 0.01 * 11.5))


def test_glorot_init(model):
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            w = module.weight.detach()
            receptive = w[0, 0].numel() if w.dim() == 4 else 1
            fan_in, fan_out = w.shape[1] * receptive, w.shape[0] * receptive
            glorot = math.sqrt(2.0 / (fan_in + fan_out))
            expected = 4 * glorot if module is model.head[-1] else glorot
            # 5% for the large tensors; small ones get 4 standard errors of a sample std
            assert w.std().item() == pytest.approx(expected, rel=max(0.05, 4 / math.sqrt(2 * w.numel())))
            assert abs(w.mean().item()) < 0.05 * expected + 3 * expected / math.sqrt(w.numel())
            assert torch.all(module.bias == 0)
    assert torch.all(model.head[0].weight == 1) and torch.all(model.head[0].bias == 0)
    # normal, not uniform (same std): kurtosis 3 rather than 1.8
    w = model.head[2].weight.detach().flatten()
    assert ((w - w.mean()) ** 4).mean() / w.var() ** 2 == pytest.approx(3.0, abs=0.05)


def test_forward_returns_logits_trained_with_bce_with_logits(model):
    model.eval()
    x = torch.randn(3, 1, 128, 628)
    with torch.no_grad():
        logits = model(x)
    y = (torch.rand(3, 50) < 0.3).float()
    manual = -(y * torch.log(torch.sigmoid(logits)) + (1 - y) * torch.log(1 - torch.sigmoid(logits))).mean()
    assert nn.functional.binary_cross_entropy_with_logits(logits, y).item() == pytest.approx(
        manual.item(), rel=1e-4)
    assert logits.min() < 0 < logits.max()  # logits, not probabilities
