"""The sampler's statistics against the analytic hard-concrete distribution, per backend
that runs here, and seed determinism."""

import math

import pytest
import torch

from edgeprune_fast.ops import HardConcreteParams, edge_mix, hard_concrete, use_backend
from edgeprune_fast.ops.backends import reasons

P = HardConcreteParams()


def analytic(la: float, p: HardConcreteParams = P) -> tuple[float, float, float]:
    """P(z = 0), P(z = 1) and E[z] written from the distribution (not from a sampler):
    z = 0 iff u <= sigmoid(beta*log(-l/r) - la); z = 1 iff u >= sigmoid(beta*log((1-l)/(r-1)) - la);
    E[z] by quadrature over u."""

    def sig(x):
        return 1 / (1 + math.exp(-x))

    p0 = sig(p.beta * math.log(-p.left / p.right) - la)
    p1 = 1 - sig(p.beta * math.log((1 - p.left) / (p.right - 1)) - la)
    u = (torch.arange(200_000, dtype=torch.float64) + 0.5) / 200_000
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + la) / p.beta)
    mean = (s * (p.right - p.left) + p.left).clamp(0, 1).mean().item()
    return p0, p1, mean


def cpu_backends():
    x = torch.zeros(2, 2)
    return [n for n in ("cpp", "reference") if not reasons(n, "hard_concrete", [x], auto=False)]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("la", [-2.0, 0.0, 1.5, 4.0])
def test_sampler_matches_analytic(backend, la):
    n = 200_000
    with use_backend(backend):
        z = hard_concrete(torch.full((n,), la), seed=1234)
    p0, p1, mean = analytic(la)
    tol = 5 * 0.5 / math.sqrt(n)  # five standard errors of a proportion
    assert (z == 0).float().mean().item() == pytest.approx(p0, abs=tol)
    assert (z == 1).float().mean().item() == pytest.approx(p1, abs=tol)
    assert z.mean().item() == pytest.approx(mean, abs=tol)


@pytest.mark.parametrize("backend", cpu_backends())
def test_seed_gives_same_bits(backend):
    la = torch.randn(7, 11)
    with use_backend(backend):
        a = hard_concrete(la, seed=5)
        b = hard_concrete(la, seed=5)
        c = hard_concrete(la, seed=6)
        assert torch.equal(a, b) and not torch.equal(a, c)
        clean, ln = torch.randn(11, 3, 5), torch.randn(11)
        x1, z1 = edge_mix(la, clean, seed=9, log_alpha_node=ln)
        x2, z2 = edge_mix(la, clean, seed=9, log_alpha_node=ln)
        x3, z3 = edge_mix(la, clean, seed=10, log_alpha_node=ln)
    assert torch.equal(x1, x2) and torch.equal(z1, z2)
    assert not torch.equal(z1, z3)
    torch.manual_seed(3)
    d = hard_concrete(la)
    torch.manual_seed(3)
    assert torch.equal(d, hard_concrete(la))  # torch.manual_seed governs the drawn seed


def test_deterministic_form_ignores_noise():
    la = torch.randn(5, 5)
    assert torch.equal(hard_concrete(la, training=False, seed=1), hard_concrete(la, training=False, seed=2))
