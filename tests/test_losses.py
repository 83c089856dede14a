"""L_fea (Eq. 3) and L_att (Eq. 4) against float64 loops and their defining properties."""
import math

import pytest
import torch

from tec_pipeline.step import attention_loss, feature_loss


def test_feature_loss_matches_loop_and_ignores_visible_patches():
    pred, target = torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(2, 5, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.float64)
    terms = [sum((pred[b, l, c] - target[b, l, c]).item() ** 2 for c in range(3)) / 3
             for b in range(2) for l in range(5) if mask[b, l]]
    assert feature_loss(pred, target, mask).item() == pytest.approx(sum(terms) / len(terms), abs=1e-12)
    moved = pred.clone()
    moved[mask == 0] += 100.0  # predictions on visible patches do not count
    assert feature_loss(moved, target, mask).item() == pytest.approx(feature_loss(pred, target, mask).item(), abs=1e-12)
    moved[0, 0] += 1.0
    assert feature_loss(moved, target, mask).item() != pytest.approx(feature_loss(pred, target, mask).item())


def test_attention_loss_matches_loop():
    pred, target, tau = torch.randn(2, 3, 2, 6, dtype=torch.float64), torch.randn(2, 3, 2, 6, dtype=torch.float64), 1.8
    total, n = 0.0, 0
    for idx in torch.cartesian_prod(torch.arange(2), torch.arange(3), torch.arange(2)).tolist():
        t, p = target[tuple(idx)].tolist(), pred[tuple(idx)].tolist()
        zt = sum(math.exp(v / tau) for v in t)
        zp = sum(math.exp(v) for v in p)
        total += -sum(math.exp(t[l] / tau) / zt * (p[l] - math.log(zp)) for l in range(6))
        n += 1
    assert attention_loss(pred, target, tau).item() == pytest.approx(total / n, abs=1e-12)


def test_attention_loss_is_minimal_at_scaled_target():
    target, tau = torch.randn(2, 4, 3, 8, dtype=torch.float64) * 3, 1.4
    best = (target / tau).clone().requires_grad_(True)
    loss = attention_loss(best, target, tau)
    loss.backward()
    assert best.grad.abs().max() < 1e-12  # stationary point
    for _ in range(5):
        other = target / tau + 0.3 * torch.randn_like(target)
        assert attention_loss(other, target, tau) > loss
    # invariant to a per-row shift of the prediction (softmax), so the minimum is Za = As/tau up to a constant
    shifted = target / tau + torch.randn(2, 4, 3, 1, dtype=torch.float64)
    assert attention_loss(shifted, target, tau).item() == pytest.approx(loss.item(), abs=1e-10)
