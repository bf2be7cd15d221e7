"""Inputs and the plain-torch runs that the backend tests (C++, Triton) share."""

from __future__ import annotations

import torch

from edgeprune_fast.ops import hard_concrete_reference


def uniform_noise(*shape: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.Tensor:
    # away from 0 and 1 so the clamp's kinks (measure zero) are not hit by rounding
    return (0.01 + 0.98 * torch.rand(*shape)).to(device, dtype)


def edge_mix_inputs(R, W, N, D, *, corrupted, node, dtype=torch.float32, mask_dtype=torch.float32, device="cpu"):
    """(log_alpha_edge, log_alpha_node, clean, corrupt, u_edge, u_node), with clamps active at 1 and at 0."""
    la = (torch.randn(R, W) * 1.5).to(device, mask_dtype)
    la[0, 0] = 9.0  # clamp active at 1 (training and deterministic)
    la[-1, -1] = -9.0  # clamp active at 0
    ln = (torch.randn(W) * 1.5).to(device, mask_dtype) if node else None
    clean = torch.randn(W, N, D).to(device, dtype)
    corrupt = torch.randn(W, N, D).to(device, dtype) if corrupted else None
    un = uniform_noise(W, dtype=mask_dtype, device=device) if node else None
    return la, ln, clean, corrupt, uniform_noise(R, W, dtype=mask_dtype, device=device), un


def leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in ts]


def run_edge_mix(fn, la, ln, clean, corrupt, ue, un, training, wx, wz):
    """(x, z_eff, grad la_edge, grad la_node, grad clean) of loss = <x, wx> + <z_eff, wz>."""
    la, ln, clean = leaves(la, ln, clean)
    x, z = fn(la, clean, corrupt, log_alpha_node=ln, u_edge=ue if training else None,
              u_node=un if training else None, training=training)
    ((x.to(wx.dtype) * wx).sum() + (z.to(wz.dtype) * wz).sum()).backward()
    return x.detach(), z.detach(), la.grad, None if ln is None else ln.grad, clean.grad


def torch_low_precision(la, ln, clean, corrupt, ue, un, wx, wz):
    """What plain torch computes in the low dtype: fp32 masks, mixing einsums in clean's dtype."""
    la, ln, clean = leaves(la, ln, clean)
    z = hard_concrete_reference(la, ue) * hard_concrete_reference(ln, un)[None, :]
    dt = clean.dtype
    x = torch.einsum("rw,w...->r...", z.to(dt), clean)
    if corrupt is not None:
        x = x + torch.einsum("rw,w...->r...", (1 - z).to(dt), corrupt)
    ((x.float() * wx).sum() + (z * wz).sum()).backward()
    return x.detach(), z.detach(), la.grad, ln.grad, clean.grad


def grad_into_runs(R, W, N, D, *, corrupted, dtype=torch.float32, device="cpu"):
    """edge_mix and mix run twice under the current backend: plainly, and with ``grad_into``
    holding a nonzero start G0. Returns [(name, plain, accumulated)] pairs that must agree:
    the mask gradients, G - G0 against the plain clean gradient, and clean.grad (None when
    the gradient went into G)."""
    from edgeprune_fast.ops import edge_mix, mix

    la, ln, clean, corrupt, ue, un = edge_mix_inputs(R, W, N, D, corrupted=corrupted, node=True, dtype=dtype,
                                                     device=device)
    g = torch.randn(R, N, D).to(device, dtype)
    g0 = torch.randn(W, N, D).to(device, dtype)
    z = torch.rand(R, W).to(device)
    out = []
    for name, call in (("edge_mix", lambda c, a, b, **kw: edge_mix(a, c, corrupt, log_alpha_node=b, u_edge=ue,
                                                                      u_node=un, **kw)[0]),
                       ("mix", lambda c, a, b, **kw: mix(z, c, corrupt, **kw))):
        a, b, c = leaves(la, ln, clean)
        call(c, a, b).backward(g)
        a2, b2, c2 = leaves(la, ln, clean)
        G = g0.clone()
        call(c2, a2, b2, grad_into=G).backward(g)
        out += [(f"{name} grad log_alpha_edge", a.grad, a2.grad), (f"{name} grad log_alpha_node", b.grad, b2.grad),
                (f"{name} G - G0", c.grad.double(), (G.double() - g0.double())), (f"{name} clean.grad", None, c2.grad)]
    return out


def assert_grad_into_agrees(runs, tol: dict) -> None:
    """Every (name, plain, accumulated) pair of ``grad_into_runs`` agrees within ``tol``."""
    for name, want, got in runs:
        if want is None:
            assert got is None, name
        else:
            torch.testing.assert_close(got, want, **tol, msg=lambda m, name=name: f"{name}: {m}")


def base_runs(R, W, N, D, *, corrupted, dtype=torch.float32, device="cpu"):
    """edge_mix and mix with ``base`` under the current backend. Returns [(name, want, got)]:
    x against the maths in float64 (base + sum_w z clean + (1 - z) corrupt, with the z the op
    returns), and every gradient against the same call without base (base is a constant:
    it changes no gradient). base is in the arithmetic dtype, as the model passes it."""
    from edgeprune_fast.ops import edge_mix, mix

    la, ln, clean, corrupt, ue, un = edge_mix_inputs(R, W, N, D, corrupted=corrupted, node=True, dtype=dtype,
                                                     device=device)
    base = torch.randn(N, D, dtype=torch.float64 if dtype == torch.float64 else torch.float32).to(device)
    g = torch.randn(R, N, D).to(device, dtype)
    zm = torch.rand(R, W).to(device)
    out = []
    for name, call in (("edge_mix", lambda c, a, b, **kw: edge_mix(a, c, corrupt, log_alpha_node=b, u_edge=ue,
                                                                      u_node=un, **kw)),
                       ("mix", lambda c, a, b, **kw: (mix(zm, c, corrupt, **kw), zm))):
        runs = []
        for b in (None, base):
            a, n, c = leaves(la, ln, clean)
            x, z = call(c, a, n, base=b)
            x.backward(g)
            runs.append((x.detach(), z.detach(), a.grad, n.grad, c.grad))
        x, z = runs[1][0], runs[1][1]
        want = base.double() + torch.einsum("rw,w...->r...", z.double(), clean.double())
        if corrupt is not None:
            want = want + torch.einsum("rw,w...->r...", 1 - z.double(), corrupt.double())
        out.append((f"{name} x", want, x.double()))
        for i, what in enumerate(("grad log_alpha_edge", "grad log_alpha_node", "grad clean"), start=2):
            if name == "mix" and what != "grad clean":
                continue
            out.append((f"{name} {what}", runs[0][i], runs[1][i]))
    return out
