"""Post-norm modes: what a head's edge carries where the attention output goes through an
RMSNorm before the residual (Gemma-2, OLMo-2: ``LayerSpec.attn_post_norm``).

``"writer"`` (the default; writers.py): head h's writer is its share g * o_h / rms(o) of the
normed output, rms taken over the whole (clean, or corrupted) attention output o = sum_h o_h;
a reader's input is the masked sum of the writers, linear in the masks. The shares sum to
the norm's output, so removing some heads of a layer takes exactly their shares out and the
kept heads' contributions stay as in the model.

``"reader"`` (MIB / EAP-IG's graph on TransformerLens, ``use_normalization_before_and_after``;
hannamw/EAP-IG 7af394a ``evaluate_graph`` with TransformerLens 2.9.1's TransformerBlock): the
head writer is the pre-norm z_h W_O[h] (their ``attn.hook_result``) and the norm is recomputed
per reader on the *mix* of that layer's heads. Reader r's input is

    x_r = sum_{w not a post-normed head} mix_rw
          + sum_{post-normed layers l upstream of r} RMSNorm_l(b_O,l + sum_{h in l} mix_rh)
    mix_rw = z_rw clean_w + (1 - z_rw) ablated_w        (ablated: the corrupted run's, the
                                                          mean, or 0 under zero ablation)

(EAP-IG writes it as the clean residual plus, per layer, ln1_post(b_O + sum_h m_h) -
ln1_post(b_O + sum_h clean_h); the same thing.) So removing some of a layer's heads rescales
the kept ones by rms(o) / rms(mix) (under zero ablation a lone kept head is normed to the
layer's full scale), and the bias b_O is never removed. The two modes agree where, for every
reader, each layer's heads are all kept or all removed, and in particular for the full and
the empty circuit; the MLP writers (normed MLP outputs) are the same in both.

Computation (:func:`post_norm_mix`): the linear part is the usual fused ``mix`` with the
post-normed head columns of the masks zeroed and the corrupted prefix sum taken without
those heads (WriterStore.exclude_from_sum); the normed part is one autograd Function over
all upstream post-normed layers that keeps nothing but the masks and the slot buffer (an
alias) for backward and recomputes each layer's [R, B, S, D] pre-norm mix there, so memory
per read stays at one layer's [R, B, S, D] in the arithmetic dtype (float32, float64 for
float64 models), as HF's RMSNorms compute.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .models import Adapter, RMSNorm

POST_NORMS = ("writer", "reader")


def check_post_norm(post_norm, adapter: Adapter) -> str:
    """``post_norm`` checked: one of POST_NORMS, and "reader" only for a model with post-norms."""
    if post_norm not in POST_NORMS:
        raise ValueError(f"post_norm: expected one of {', '.join(map(repr, POST_NORMS))}, got {post_norm!r}")
    if post_norm == "reader" and not any(s.attn_post_norm is not None for s in adapter.layers):
        raise ValueError(f"post_norm: 'reader' applies to models whose attention output is normed before the "
                         f"residual (Gemma-2, OLMo-2); {adapter.architecture} has no post-attention norm, expected "
                         f"'writer' (the default), got 'reader'")
    return post_norm


def has_post_norms(adapter: Adapter) -> bool:
    return any(s.attn_post_norm is not None for s in adapter.layers)


@dataclass(frozen=True)
class NormedLayer:
    """A post-normed layer's heads in the slot buffer: slots [first, first + n_heads)."""

    layer: int
    first: int
    n_heads: int

    @property
    def stop(self) -> int:
        return self.first + self.n_heads


def normed_layers(adapter: Adapter, slot_of_first_head: Callable[[int], int]) -> tuple[NormedLayer, ...]:
    return tuple(NormedLayer(i, slot_of_first_head(i), s.n_heads) for i, s in enumerate(adapter.layers)
                 if s.attn_post_norm is not None)


def _arithmetic(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _PostNormMix(torch.autograd.Function):
    """out[r] = sum_l RMSNorm_l(base_l + sum_{h in l} z[r, h] delta[h]) [R, B, S, D] in the
    arithmetic dtype; delta: the slot buffer's prefix (clean - ablated per slot); base_l =
    b_O,l + sum_h ablated_h (a constant, or None). Backward recomputes each layer's pre-norm mix."""

    @staticmethod
    def forward(ctx, z, delta, parts, sink):
        ctx.save_for_backward(z, delta)
        ctx.parts, ctx.sink = parts, sink
        R, (B, S, D) = z.shape[0], delta.shape[1:]
        cd = _arithmetic(delta.dtype)
        out = torch.zeros(R, B * S, D, dtype=cd, device=delta.device)
        for first, stop, norm, base in parts:
            u = _pre_norm(z, delta, first, stop, base, cd)
            r = torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + norm.eps)
            out += u * r * (norm.offset + norm.weight.to(cd))
        return out.view(R, B, S, D)

    @staticmethod
    def backward(ctx, g):
        z, delta = ctx.saved_tensors
        R, (n, B, S, D) = z.shape[0], delta.shape
        cd = _arithmetic(delta.dtype)
        g = g.reshape(R, B * S, D).to(cd)
        g_z = torch.zeros(R, n, dtype=cd, device=z.device) if ctx.needs_input_grad[0] else None
        into = ctx.sink() if ctx.sink is not None and ctx.needs_input_grad[1] else None
        g_delta = None
        if ctx.needs_input_grad[1] and into is None:
            g_delta = into = torch.zeros_like(delta)
        for first, stop, norm, base in ctx.parts:
            u = _pre_norm(z, delta, first, stop, base, cd)
            r = torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + norm.eps)
            uh = u * r
            gy = g * (norm.offset + norm.weight.to(cd))
            du = (gy - uh * (uh * gy).mean(-1, keepdim=True)) * r  # RMSNorm's Jacobian applied
            d_l = delta[first:stop].reshape(stop - first, -1).to(cd)  # [H, B*S*D]
            du = du.reshape(R, -1)
            if g_z is not None:
                g_z[:, first:stop] = du @ d_l.T
            if into is not None:
                zl = z[:, first:stop].to(cd)
                into[first:stop] += (zl.T @ du).view(stop - first, B, S, D).to(into.dtype)
        return (None if g_z is None else g_z.to(z.dtype)), g_delta, None, None


def _pre_norm(z, delta, first: int, stop: int, base, cd) -> torch.Tensor:
    """[R, B*S, D]: base + sum_{h in [first, stop)} z[:, h] delta[h]."""
    H, D = stop - first, delta.shape[-1]
    u = z[:, first:stop].to(cd) @ delta[first:stop].reshape(H, -1).to(cd)
    u = u.view(z.shape[0], -1, D)
    return u if base is None else u + base.reshape(-1, D)


def post_norm_mix(z: torch.Tensor, delta: torch.Tensor, parts: Sequence[tuple[int, int, RMSNorm, torch.Tensor | None]],
                  sink: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """sum over ``parts`` (first slot, stop slot, the layer's RMSNorm, base [B, S, D] or None)
    of RMSNorm(base + z[:, first:stop] @ delta[first:stop]) for every reader: [R, B, S, D] in
    float32 (float64 for float64 delta), differentiable in z and delta. ``sink``: a function
    giving the slot buffer's gradient [n, B, S, D] (allocated), into which backward adds
    delta's gradient instead of returning it."""
    return _PostNormMix.apply(z, delta, tuple(parts), sink)
