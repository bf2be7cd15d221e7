"""Masked clean/corrupted aggregation of writer outputs into reader inputs.

For R readers and W upstream writers (ARCHITECTURE.md §2):

    z_eff[r, w] = z_edge[r, w] * z_node[w]                       [R, W], float32
    x[r]        = sum_w z_eff[r, w] * clean[w] + (1 - z_eff[r, w]) * corrupt[w]
                = sum_w corrupt[w] + sum_w z_eff[r, w] * (clean[w] - corrupt[w])

clean, corrupt: [W, *, D] (corrupt None = zero ablation); x: [R, *, D] in clean's dtype,
accumulated in float32. Gradients go to log_alpha_edge, log_alpha_node and clean, never
to corrupt:

    dL/dz_eff[r, w] = <dL/dx[r], clean[w] - corrupt[w]>
    dL/dclean[w]    = sum_r z_eff[r, w] * dL/dx[r]

`edge_mix` samples the hard-concrete masks and mixes in one pass; `mix` mixes with
given masks (fixed circuits, evaluation). Both take ``base`` [*, D], a constant added to
every reader's x inside the kernel (no pass over x of its own, x rounded once, no gradient
flows to it; the model passes the corrupted prefix sum), and ``grad_into``: a tensor like
clean (or a function returning one when backward runs, so that it need not exist before)
into which backward *adds* dL/dclean in place, instead of returning it through autograd
(a function may return None: the gradient then comes through autograd, as without
grad_into). Callers that sum the gradients of many overlapping reads (the model's slot
buffer, writers.py) so skip one [W, *, D] tensor and one pass over it per read. The
backend (Triton, C++, reference) is chosen in `backends`; the autograd Functions here are
shared by all of them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import backends
from ._checks import check_finite, check_same_device, check_seed, check_tensor, check_u, describe
from .hard_concrete import draw_seed, hard_concrete_reference, uniform_from_seed
from .params import HardConcreteParams, resolve


def mix_reference(z: torch.Tensor, clean: torch.Tensor, corrupt: torch.Tensor | None = None,
                  base: torch.Tensor | None = None) -> torch.Tensor:
    """x = base + sum_w z*clean + (1 - z)*corrupt, plain PyTorch (the reference)."""
    cd = torch.float64 if clean.dtype == torch.float64 else torch.float32
    x = torch.einsum("rw,w...->r...", z.to(cd), clean.to(cd))
    if corrupt is not None:
        x = x + torch.einsum("rw,w...->r...", (1 - z).to(cd), corrupt.detach().to(cd))
    if base is not None:
        x = x + base.detach().to(cd).reshape(clean.shape[1:])
    return x.to(clean.dtype)


def edge_mix_reference(
    log_alpha_edge: torch.Tensor,
    clean: torch.Tensor,
    corrupt: torch.Tensor | None = None,
    *,
    log_alpha_node: torch.Tensor | None = None,
    u_edge: torch.Tensor | None = None,
    u_node: torch.Tensor | None = None,
    training: bool = True,
    params: HardConcreteParams | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole op from the maths, differentiable by autograd: returns (x, z_eff)."""
    z_eff = hard_concrete_reference(log_alpha_edge, u_edge, training=training, params=params)
    if log_alpha_node is not None:
        z_node = hard_concrete_reference(log_alpha_node, u_node, training=training, params=params)
        z_eff = z_eff * z_node[None, :]
    return mix_reference(z_eff, clean, corrupt), z_eff


class EdgeMixFunction(torch.autograd.Function):
    """Fused forward (sampling + node masks + mixing); backward runs the backend's mixing
    backward, then the chain rule through the masks, recomputed from log_alpha and u/seed."""

    @staticmethod
    def forward(ctx, la_edge, la_node, clean2d, corrupt2d, u_edge, u_node, seed, training, params, backend,
                sink, base):
        x2d, z_eff = backend.edge_mix_forward(
            la_edge, la_node, clean2d, corrupt2d, u_edge, u_node, seed, training, params, base
        )
        ctx.save_for_backward(la_edge, la_node, clean2d, corrupt2d, u_edge, u_node, z_eff)
        ctx.seed, ctx.training, ctx.params, ctx.backend = seed, training, params, backend
        ctx.sink = sink
        return x2d, z_eff

    @staticmethod
    def backward(ctx, grad_x2d, grad_z_eff):
        la_edge, la_node, clean2d, corrupt2d, u_edge, u_node, z_eff = ctx.saved_tensors
        b, seed, training, p = ctx.backend, ctx.seed, ctx.training, ctx.params
        R, W = la_edge.shape
        g_z, g_clean = None, None
        if grad_x2d is not None:
            out = None if ctx.sink is None else ctx.sink()
            g_z, g_clean = b.mix_backward(grad_x2d.contiguous(), z_eff, clean2d, corrupt2d, out)
            if not ctx.needs_input_grad[2] or out is not None:
                g_clean = None
        if grad_z_eff is not None:
            g_z = grad_z_eff.to(la_edge.dtype) if g_z is None else g_z + grad_z_eff.to(la_edge.dtype)
        if g_z is None:
            return (None,) * 12
        g_la_node = None
        if la_node is None:
            g_z_edge = g_z
        else:
            z_edge = b.hard_concrete_forward(la_edge, u_edge, seed, 0, training, p)
            z_node = b.hard_concrete_forward(la_node, u_node, seed, R * W, training, p)
            g_z_edge = g_z * z_node[None, :]
            g_la_node = b.hard_concrete_backward((g_z * z_edge).sum(0), la_node, u_node, seed, R * W, training, p)
        g_la_edge = b.hard_concrete_backward(g_z_edge.contiguous(), la_edge, u_edge, seed, 0, training, p)
        return g_la_edge, g_la_node, g_clean, None, None, None, None, None, None, None, None, None


class MixFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, clean2d, corrupt2d, backend, sink, base):
        ctx.save_for_backward(z, clean2d, corrupt2d)
        ctx.backend, ctx.sink = backend, sink
        return backend.mix_forward(z, clean2d, corrupt2d, base)

    @staticmethod
    def backward(ctx, grad_x2d):
        z, clean2d, corrupt2d = ctx.saved_tensors
        out = None if ctx.sink is None else ctx.sink()
        g_z, g_clean = ctx.backend.mix_backward(grad_x2d.contiguous(), z, clean2d, corrupt2d, out)
        return g_z.to(z.dtype), None if out is not None else g_clean, None, None, None, None


def _check_writers(clean, corrupt, W: int, W_from: str) -> None:
    check_tensor("clean", clean, ndim_min=2)
    if clean.shape[0] != W:
        raise ValueError(f"clean: expected shape [W, *, D] with W = {W} ({W_from}), got {describe(clean)}")
    if corrupt is not None:
        check_tensor("corrupt", corrupt)
        if corrupt.shape != clean.shape:
            raise ValueError(
                f"corrupt: expected the shape of clean {tuple(clean.shape)}, got {describe(corrupt)}"
            )
        if corrupt.dtype != clean.dtype:
            raise ValueError(f"corrupt: expected the dtype of clean ({clean.dtype}), got {describe(corrupt)}")


def _base(base, clean: torch.Tensor) -> torch.Tensor | None:
    """base as the kernels take it: [M] contiguous in the arithmetic dtype (float64 for
    float64 writers, else float32), checked against clean [W, *, D]."""
    if base is None:
        return None
    check_tensor("base", base)
    if base.shape != clean.shape[1:]:
        raise ValueError(f"base: expected shape {tuple(clean.shape[1:])} (clean's without its writer dim), "
                         f"got {describe(base)}")
    if base.requires_grad:
        raise ValueError(f"base: expected a constant (no gradient flows to it), got {describe(base)} that "
                         f"requires grad")
    check_same_device(clean=clean, base=base)
    cd = torch.float64 if clean.dtype == torch.float64 else torch.float32
    return base.to(cd).reshape(-1).contiguous()


def _flat(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.reshape(t.shape[0], -1).contiguous()


def _sink(grad_into, clean: torch.Tensor):
    """None, or a function giving grad_into as the [W, M] view that backward adds into (never a
    copy: the additions must land in it). A tensor is checked now, a function's result then."""
    if grad_into is None:
        return None
    shape, dtype, device = clean.shape, clean.dtype, clean.device

    def resolve() -> torch.Tensor | None:
        t = grad_into() if callable(grad_into) else grad_into
        if t is None and callable(grad_into):
            return None
        if not isinstance(t, torch.Tensor) or t.shape != shape or t.dtype != dtype or t.device != device \
                or not t.is_contiguous():
            raise ValueError(f"grad_into: expected a contiguous tensor of clean's shape {tuple(shape)}, dtype "
                             f"{dtype} and device {device}, got {describe(t)}")
        return t.view(t.shape[0], -1)

    if not callable(grad_into):
        resolve()
    return resolve


def edge_mix(
    log_alpha_edge: torch.Tensor,
    clean: torch.Tensor,
    corrupt: torch.Tensor | None = None,
    *,
    log_alpha_node: torch.Tensor | None = None,
    u_edge: torch.Tensor | None = None,
    u_node: torch.Tensor | None = None,
    seed: int | None = None,
    training: bool = True,
    params: HardConcreteParams | None = None,
    base: torch.Tensor | None = None,
    grad_into: torch.Tensor | Callable[[], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample edge (and node) masks and mix clean/corrupted writer outputs in one pass.

    log_alpha_edge [R, W]; clean [W, *, D]; corrupt like clean or None (zero ablation);
    log_alpha_node [W] or None. Returns (x [R, *, D], z_eff [R, W]). Explicit u_edge
    (and u_node) make it deterministic; otherwise ``seed`` or a seed drawn from torch's
    default generator picks the noise. ``base`` [*, D] and ``grad_into``: see the module
    docstring."""
    p = resolve(params)
    check_tensor("log_alpha_edge", log_alpha_edge, ndim=2)
    check_finite("log_alpha_edge", log_alpha_edge)
    R, W = log_alpha_edge.shape
    _check_writers(clean, corrupt, W, "log_alpha_edge.shape[1]")
    if log_alpha_node is not None:
        check_tensor("log_alpha_node", log_alpha_node, ndim=1)
        if log_alpha_node.shape[0] != W:
            raise ValueError(f"log_alpha_node: expected shape ({W},) (W writers), got {describe(log_alpha_node)}")
        check_finite("log_alpha_node", log_alpha_node)
    if u_edge is not None:
        check_u("u_edge", u_edge, (R, W), p)
        if log_alpha_node is not None and u_node is None:
            raise ValueError("u_node: expected a tensor of shape (W,) when u_edge and log_alpha_node are given, got None")
    if u_node is not None:
        if log_alpha_node is None:
            raise ValueError("u_node: given without log_alpha_node; expected None")
        check_u("u_node", u_node, (W,), p)
    check_same_device(log_alpha_edge=log_alpha_edge, clean=clean, corrupt=corrupt,
                      log_alpha_node=log_alpha_node, u_edge=u_edge, u_node=u_node)
    sink = _sink(grad_into, clean)
    base = _base(base, clean)

    cd = torch.float64 if log_alpha_edge.dtype == torch.float64 else torch.float32
    la_edge = log_alpha_edge.to(cd).contiguous()
    la_node = None if log_alpha_node is None else log_alpha_node.to(cd).contiguous()
    clean2d, corrupt2d = _flat(clean), _flat(corrupt)
    backend = backends.choose("edge_mix", [la_edge, clean2d])
    if not training:
        u_edge = u_node = seed = None
    elif u_edge is not None:
        u_edge = u_edge.to(cd).contiguous()
        u_node = None if u_node is None else u_node.to(cd).contiguous()
        seed = None
    else:
        seed = draw_seed() if seed is None else check_seed(seed)
        if not backend.supports_seed:
            u_all = uniform_from_seed(seed, R * W + W, la_edge.device, p).to(cd)
            u_edge = u_all[: R * W].view(R, W)
            u_node = None if la_node is None else u_all[R * W :].contiguous()
            seed = None
    x2d, z_eff = EdgeMixFunction.apply(la_edge, la_node, clean2d, corrupt2d, u_edge, u_node, seed, training, p, backend,
                                       sink, base)
    return x2d.view(R, *clean.shape[1:]), z_eff


def mix(z: torch.Tensor, clean: torch.Tensor, corrupt: torch.Tensor | None = None, *,
        base: torch.Tensor | None = None,
        grad_into: torch.Tensor | Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """x[r] = base + sum_w z[r, w]*clean[w] + (1 - z[r, w])*corrupt[w] for given masks z [R, W];
    ``base`` and ``grad_into``: see the module docstring."""
    check_tensor("z", z, ndim=2)
    R, W = z.shape
    _check_writers(clean, corrupt, W, "z.shape[1]")
    check_same_device(z=z, clean=clean, corrupt=corrupt)
    sink = _sink(grad_into, clean)
    base = _base(base, clean)
    cd = torch.float64 if z.dtype == torch.float64 else torch.float32
    zc = z.to(cd).contiguous()
    clean2d, corrupt2d = _flat(clean), _flat(corrupt)
    backend = backends.choose("mix", [zc, clean2d])
    return MixFunction.apply(zc, clean2d, corrupt2d, backend, sink, base).view(R, *clean.shape[1:])
