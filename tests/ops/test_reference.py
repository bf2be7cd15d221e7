"""The reference maths itself: gradcheck in float64, and agreement with hand-written
formulas of ARCHITECTURE.md §2 (the reference is what every backend is tested against)."""

import math

import pytest
import torch

from edgeprune_fast.ops import (
    HardConcreteParams,
    edge_mix,
    edge_mix_reference,
    expected_l0,
    hard_concrete_reference,
    mix,
    mix_reference,
    use_backend,
)


def _u(*shape):
    return (0.05 + 0.9 * torch.rand(*shape, dtype=torch.float64))


def test_hard_concrete_reference_matches_formula():
    p = HardConcreteParams()
    la = torch.tensor([-3.0, -0.5, 0.0, 0.7, 4.0], dtype=torch.float64)
    u = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64)
    z = hard_concrete_reference(la, u, training=True, params=p)
    for i in range(5):
        s = 1 / (1 + math.exp(-(math.log(u[i]) - math.log(1 - u[i]) + la[i]) / p.beta))
        want = min(1.0, max(0.0, s * (p.right - p.left) + p.left))
        assert z[i].item() == pytest.approx(want, abs=1e-12)
    zd = hard_concrete_reference(la, training=False, params=p)
    for i in range(5):
        s = 1 / (1 + math.exp(-la[i].item()))
        assert zd[i].item() == pytest.approx(min(1.0, max(0.0, s * 1.2 - 0.1)), abs=1e-12)
    # log_alpha = 10 gives a deterministic mask of exactly 1 (not 0.999994 as the original)
    assert hard_concrete_reference(torch.tensor([10.0]), training=False).item() == 1.0


def test_expected_l0_formula():
    p = HardConcreteParams()
    la = torch.linspace(-5, 5, 11, dtype=torch.float64)
    want = torch.sigmoid(la - p.beta * math.log(0.1 / 1.1))
    torch.testing.assert_close(expected_l0(la), want)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("zero_ablation", [True, False])
def test_edge_mix_reference_gradcheck(training, zero_ablation):
    R, W, N, D = 3, 5, 2, 3
    la = (torch.randn(R, W, dtype=torch.float64) * 0.5).requires_grad_()
    ln = (torch.randn(W, dtype=torch.float64) * 0.5).requires_grad_()
    clean = torch.randn(W, N, D, dtype=torch.float64, requires_grad=True)
    corrupt = None if zero_ablation else torch.randn(W, N, D, dtype=torch.float64)
    ue, un = _u(R, W), _u(W)

    def f(la, ln, clean):
        x, z = edge_mix_reference(la, clean, corrupt, log_alpha_node=ln, u_edge=ue, u_node=un, training=training)
        return x, z

    assert torch.autograd.gradcheck(f, (la, ln, clean))


def test_mix_reference_gradcheck_and_formula():
    R, W, D = 4, 3, 5
    z = torch.rand(R, W, dtype=torch.float64, requires_grad=True)
    clean = torch.randn(W, D, dtype=torch.float64, requires_grad=True)
    corrupt = torch.randn(W, D, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z, c: mix_reference(z, c, corrupt), (z, clean))
    x = mix_reference(z, clean, corrupt)
    for r in range(R):
        want = sum(z[r, w] * clean[w] + (1 - z[r, w]) * corrupt[w] for w in range(W))
        torch.testing.assert_close(x[r], want)
    with torch.no_grad():
        corrupt_grad = corrupt.clone().requires_grad_()
        x = mix_reference(z, clean, corrupt_grad)
    assert corrupt_grad.grad is None


def test_autograd_function_gradcheck_reference_backend():
    """The shared autograd Functions (custom backward + chain rule) against finite differences."""
    R, W, N, D = 2, 4, 3, 2
    la = (torch.randn(R, W, dtype=torch.float64) * 0.5).requires_grad_()
    ln = (torch.randn(W, dtype=torch.float64) * 0.5).requires_grad_()
    clean = torch.randn(W, N, D, dtype=torch.float64, requires_grad=True)
    corrupt = torch.randn(W, N, D, dtype=torch.float64)
    ue, un = _u(R, W), _u(W)
    with use_backend("reference"):
        assert torch.autograd.gradcheck(
            lambda la, ln, c: edge_mix(la, c, corrupt, log_alpha_node=ln, u_edge=ue, u_node=un), (la, ln, clean)
        )
        z = torch.rand(R, W, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda z, c: mix(z, c, corrupt), (z, clean))


def test_corrupt_gets_no_gradient():
    R, W, D = 2, 3, 4
    la = torch.randn(R, W, requires_grad=True)
    clean = torch.randn(W, D, requires_grad=True)
    corrupt = torch.randn(W, D, requires_grad=True)
    x, _ = edge_mix(la, clean, corrupt, seed=1)
    x.sum().backward()
    assert corrupt.grad is None and clean.grad is not None and la.grad is not None


def test_all_ones_and_all_zeros_masks():
    """z = 1 reads the clean stack's sum; z = 0 reads the corrupted stack's sum."""
    W, N, D = 6, 2, 5
    clean, corrupt = torch.randn(W, N, D), torch.randn(W, N, D)
    la_on = torch.full((3, W), 10.0)
    x, z = edge_mix(la_on, clean, corrupt, training=False)
    assert bool((z == 1).all())
    torch.testing.assert_close(x, clean.sum(0).expand(3, N, D))
    x0 = mix(torch.zeros(3, W), clean, corrupt)
    torch.testing.assert_close(x0, corrupt.sum(0).expand(3, N, D))
