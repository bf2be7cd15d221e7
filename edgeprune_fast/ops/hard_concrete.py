"""Hard-concrete masks (Louizos et al., 2018, "Learning sparse neural networks through L0
regularization"), the reference maths and the public op.

    u ~ U(eps, 1 - eps)
    s = sigmoid((log u - log(1 - u) + log_alpha) / beta)        training sample
    s = sigmoid(log_alpha)                                       deterministic form
    z = clamp(s * (right - left) + left, 0, 1)
    P(z != 0) = sigmoid(log_alpha - beta * log(-left / right))   expected L0

Shapes: log_alpha any shape, z the same shape, float32 (float64 stays float64).
"""

from __future__ import annotations

import torch

from . import backends
from ._checks import check_finite, check_same_device, check_seed, check_u, describe
from .params import HardConcreteParams, resolve


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def hard_concrete_reference(
    log_alpha: torch.Tensor,
    u: torch.Tensor | None = None,
    *,
    training: bool = True,
    params: HardConcreteParams | None = None,
) -> torch.Tensor:
    """The maths above in plain PyTorch, differentiable by autograd (the reference)."""
    p = resolve(params)
    la = log_alpha.to(_compute_dtype(log_alpha))
    if training:
        if u is None:
            raise ValueError("u: expected a tensor of uniforms when training=True, got None")
        u = u.to(la.dtype)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + la) / p.beta)
    else:
        s = torch.sigmoid(la)
    return (s * (p.right - p.left) + p.left).clamp(0.0, 1.0)


def expected_l0(log_alpha: torch.Tensor, params: HardConcreteParams | None = None) -> torch.Tensor:
    """P(z != 0) for each entry; differentiable (used by the sparsity loss)."""
    p = resolve(params)
    return torch.sigmoid(log_alpha.to(_compute_dtype(log_alpha)) - p.beta * p.log_ratio)


def uniform_from_seed(seed: int, numel: int, device: torch.device, params: HardConcreteParams) -> torch.Tensor:
    """U(eps, 1 - eps) noise for backends without an in-kernel generator.

    Drawn on the CPU from its own generator, so a seed gives the same bits on every call
    and on every device (reference and C++ backends agree bit for bit)."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    u = torch.rand(numel, generator=gen, dtype=torch.float64)
    u = params.eps + (1.0 - 2.0 * params.eps) * u
    return u.to(torch.float32).to(device)


def draw_seed() -> int:
    """A fresh seed from torch's default generator, so torch.manual_seed governs sampling."""
    return int(torch.randint(0, 2**62, (1,), generator=None).item())


class HardConcreteFunction(torch.autograd.Function):
    """z = hard_concrete(log_alpha); backward recomputes s from log_alpha and u (or seed)."""

    @staticmethod
    def forward(ctx, log_alpha, u, seed, training, params, backend):
        z = backend.hard_concrete_forward(log_alpha, u, seed, 0, training, params)
        ctx.save_for_backward(log_alpha, u)
        ctx.seed, ctx.training, ctx.params, ctx.backend = seed, training, params, backend
        return z

    @staticmethod
    def backward(ctx, grad_z):
        log_alpha, u = ctx.saved_tensors
        grad = ctx.backend.hard_concrete_backward(
            grad_z.contiguous(), log_alpha, u, ctx.seed, 0, ctx.training, ctx.params
        )
        return grad, None, None, None, None, None


def hard_concrete(
    log_alpha: torch.Tensor,
    *,
    u: torch.Tensor | None = None,
    seed: int | None = None,
    training: bool = True,
    params: HardConcreteParams | None = None,
) -> torch.Tensor:
    """Sample hard-concrete masks z (same shape as log_alpha, float32), differentiable in
    log_alpha. Explicit ``u`` makes it deterministic; otherwise ``seed`` (or a seed drawn
    from torch's default generator) picks the noise. ``training=False`` gives the
    deterministic form."""
    p = resolve(params)
    if not isinstance(log_alpha, torch.Tensor) or not log_alpha.is_floating_point():
        raise ValueError(f"log_alpha: expected a floating-point tensor, got {describe(log_alpha)}")
    check_finite("log_alpha", log_alpha)
    if u is not None:
        check_u("u", u, tuple(log_alpha.shape), p)
        check_same_device(log_alpha=log_alpha, u=u)
    la = log_alpha.to(_compute_dtype(log_alpha)).contiguous()
    backend = backends.choose("hard_concrete", [la])
    if training and u is None:
        seed = draw_seed() if seed is None else check_seed(seed)
        if not backend.supports_seed:
            u = uniform_from_seed(seed, la.numel(), la.device, p).view(la.shape)
            seed = None
    elif not training:
        u, seed = None, None
    else:
        u, seed = u.to(la.dtype).contiguous(), None
    return HardConcreteFunction.apply(la, u, seed, training, p, backend)

