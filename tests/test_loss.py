"""The Barlow Twins objective: brute-force reference, the identity optimum, fp32 under bf16 autocast."""

from __future__ import annotations

import itertools

import pytest
import torch

from pipeline.train.loss import barlow_twins_loss, cross_correlation, off_diagonal, on_diagonal, standardize


def brute_force_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float, eps: float = 1e-5) -> float:
    """The paper's formula with explicit loops over samples and features, in float64 Python numbers."""
    n, d = z1.shape

    def standardized(z):
        columns = []
        for j in range(d):
            values = [float(z[b, j]) for b in range(n)]
            mean = sum(values) / n
            var = sum((v - mean) ** 2 for v in values) / n  # biased, as BatchNorm in training mode
            columns.append([(v - mean) / (var + eps) ** 0.5 for v in values])
        return columns

    a, b = standardized(z1), standardized(z2)
    loss = 0.0
    for i, j in itertools.product(range(d), range(d)):
        c_ij = sum(a[i][k] * b[j][k] for k in range(n)) / n
        loss += (1 - c_ij) ** 2 if i == j else lambd * c_ij**2
    return loss


@pytest.mark.parametrize("lambd", [0.0051, 0.5])
def test_loss_matches_brute_force_reference(lambd):
    torch.manual_seed(0)
    z1 = torch.randn(12, 5) * 3 + 1
    z2 = z1 + 0.7 * torch.randn(12, 5)  # correlated views, so both terms matter
    loss, c = barlow_twins_loss(z1, z2, lambd=lambd)
    assert loss.item() == pytest.approx(brute_force_loss(z1, z2, lambd), rel=1e-5)
    assert c.shape == (5, 5)


def test_standardize_is_batchnorm_without_affine():
    torch.manual_seed(1)
    z = torch.randn(32, 7) * 5 - 2
    expected = torch.nn.BatchNorm1d(7, affine=False).train()(z)
    torch.testing.assert_close(standardize(z), expected, rtol=1e-5, atol=1e-6)


def test_loss_is_zero_for_identity_correlation():
    # Columns 1..4 of an 8x8 Hadamard matrix: entries +-1, zero mean, unit (biased) variance, orthogonal,
    # so the standardised cross-correlation of z with itself is exactly the identity (up to eps).
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    hadamard = torch.kron(torch.kron(h2, h2), h2)
    z = hadamard[:, 1:5]
    for z1, z2 in [(z, z), (3 * z + 2, z - 5)]:  # invariant to per-view scale and shift
        loss, c = barlow_twins_loss(z1, z2)
        torch.testing.assert_close(c, torch.eye(4), rtol=0, atol=1e-4)
        assert loss.item() < 1e-8
    # and a permuted view is far from the optimum: the check can fail
    assert barlow_twins_loss(z, z[:, [1, 0, 2, 3]])[0].item() > 1.0


def test_diagonal_helpers():
    c = torch.arange(9.0).view(3, 3)
    assert on_diagonal(c).tolist() == [0.0, 4.0, 8.0]
    assert off_diagonal(c).tolist() == [1.0, 2.0, 3.0, 5.0, 6.0, 7.0]


def test_cross_correlation_stays_fp32_under_bf16_autocast():
    torch.manual_seed(2)
    z1 = torch.randn(256, 64).bfloat16()
    z2 = (z1.float() + 0.5 * torch.randn(256, 64)).bfloat16()
    reference = cross_correlation(z1.float(), z2.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        c = cross_correlation(z1, z2)
        loss, _ = barlow_twins_loss(z1, z2)
        bf16_matmul = (standardize(z1).T @ standardize(z2)) / len(z1)  # what autocast would do
    assert c.dtype == torch.float32 and loss.dtype == torch.float32
    assert (c - reference).abs().max().item() < 1e-5
    # the tolerance above is tight enough to catch a bf16 matmul
    assert bf16_matmul.dtype == torch.bfloat16
    assert (bf16_matmul.float() - reference).abs().max().item() > 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cross_correlation_stays_fp32_under_cuda_bf16_autocast():
    torch.manual_seed(3)
    z1 = torch.randn(512, 256, device="cuda").bfloat16()
    z2 = (z1.float() + 0.5 * torch.randn(512, 256, device="cuda")).bfloat16()
    reference = cross_correlation(z1.double(), z2.double())  # fp64 on the same bf16 inputs
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, c = barlow_twins_loss(z1, z2)
    assert c.dtype == torch.float32 and loss.dtype == torch.float32
    assert (c.double() - reference).abs().max().item() < 1e-5  # fp32; a bf16 matmul is off by ~2e-3
