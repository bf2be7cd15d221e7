"""Writer outputs: the per-forward slot buffer, and their capture from the unmodified model.

**Slot buffer** (ARCHITECTURE.md §3). One forward of the edge-pruned model stores each
writer's output once, in a preallocated ``buffer [W, B, S, D]`` written slot by slot in
residual order; a layer's readers read the view ``buffer[:n]`` of the writers upstream of
them, never a copy. Two autograd Functions make this differentiable:

    token' = WriteSlots(token, y [k, B, S, D], slot)   buffer[slot:slot+k] = y - corrupt[slot:slot+k]
    view   = ReadSlots(token, n)                        buffer[:n]

The buffer and its gradient live in a :class:`Slots` object, the only thing the autograd
graph keeps (never the store, which holds the token chain: that would be a reference cycle
through autograd's C++ nodes, invisible to Python's collector, and every step's buffers
would stay alive; tests/test_memory_flat.py counts them).

With corrupted states (corrupted or mean ablation) a slot holds the writer's output minus
its corrupted state, and ``corrupted_sum(n)`` gives sum_{w<n} corrupt[w] (float32, kept as a
running sum added slot by slot, restarted when a checkpointed layer is recomputed, with the
same bits). A reader's input is then
sum_w corrupt[w] + z_w (clean[w] - corrupt[w]) = corrupted_sum(n) + the zero-ablation mix of
the slots: each read streams one [n, B, S, D] tensor instead of two (clean and corrupted),
in its forward and in its backward, and the corrupted states are read once per forward
(streamed from host memory once, under corrupted_on_cpu). The gradient is unchanged:
d slot / d y = 1. Without corrupted states (zero ablation) a slot holds y.

``token`` is a zero-size tensor threaded through every write and read. Backward: every
read's gradient is added into a gradient buffer ``G[:n]`` in place, and WriteSlots returns
``G[slot:slot+k]`` as y's gradient. The model's reads hand ``grad_into(n)`` (giving the view
G[:n]) to edge_mix, whose backward adds into it directly, so no [n, B, S, D] gradient is
made per read; a read whose gradient comes back through autograd instead has ReadSlots add
it. G does not exist during the forward. The first backward to reach it is the last read's
(resid_post reads every slot): ``grad_into`` gives None then, so that read's gradient comes
back through autograd as a new [W, B, S, D] tensor, and ReadSlots adopts that tensor as G
(no zero-filled buffer, no extra pass); a first read of fewer slots gets G allocated zeroed.
The token chain orders backward
correctly: every read of slot s happens after the write of s, so it holds a token derived
from the write's token, and autograd runs a node's backward only after all nodes that
consumed its outputs; hence all readers of a slot have added into G before its writer
returns G[slot].

Writes go through ``buffer.data``, which does not bump the version counter that
autograd's saved-tensor check reads; this is safe because a slot is written exactly once
per forward, before any read of it, and a view saved by a reader (buffer[:n]) covers
only slots written earlier, which are never written again.

**Capture** (``capture_writer_states``): the full model's logits and every writer's output
come from one plain ``torch.no_grad()`` forward of the unmodified model, with a forward
pre-hook on each layer's output projection (its input is z [B, S, H*dv]; the head writer is
z_h @ W_O[h] + b_O / H, ARCHITECTURE.md §1) and a forward hook on each MLP. Hooks are added
inside a context manager that always removes them. Embedding writers are recomputed with
the model's own embedding modules. States: a tensor [W, B, S, D] in writer order.

**Post-norms** (Gemma-2, OLMo-2: ``LayerSpec.attn_post_norm`` / ``mlp_post_norm``): the
residual gets RMSNorm(o) of the attention output o = sum_h o_h (o_h = z_h W_O[h] + b_O/H),
and RMSNorm(mlp output). RMSNorm(o) = g * o / rms(o) is linear in o once rms(o) is fixed,
so head h's writer is its share g * o_h / rms(o), rms taken over the whole (clean, or
corrupted) output: the shares sum to the norm's output exactly, and removing head h from
every reader under zero ablation is the model minus that share. The MLP writer is the
normed MLP output. Both the pruned forward (``head_writers``, ``rms_norm``) and the capture
compute them so, in float32 (float64 for float64 models) as HF's RMSNorms do in float32.
That is the default, ``post_norm="writer"``; under ``"reader"`` (MIB / EAP-IG's graph,
post_norm.py) a post-normed layer's head writers are the pre-norm z_h W_O[h] and each reader
norms its own mix of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .graph import Graph
from .models import Adapter, RMSNorm


class Slots:
    """The slot buffer [W, B, S, D] and its gradient G: all that the autograd graph of one
    forward keeps (in WriteSlots/ReadSlots contexts and grad_into callables).

    It holds no token and no store, on purpose: autograd's nodes live in C++, where Python's
    cycle collector cannot see them, so a cycle store -> token -> grad_fn -> ctx -> store
    would keep every forward's buffers alive for good (a per-step leak). Freed with the
    last of the graph and the store that reference it."""

    def __init__(self, n_writers: int, shape: tuple[int, int, int], dtype: torch.dtype,
                 device: torch.device) -> None:
        self.data = torch.empty(n_writers, *shape, dtype=dtype, device=device)
        self.grad: torch.Tensor | None = None  # G, see the module docstring

    def gradient(self) -> torch.Tensor:
        """G, allocated zeroed on first use (in backward) unless a full read's gradient was adopted."""
        if self.grad is None:
            self.grad = torch.zeros_like(self.data)
        return self.grad

    def adopt_or_add(self, g: torch.Tensor, n: int) -> None:
        """G[:n] += g, where g is a read's gradient; the first one, covering every slot,
        becomes G itself (see the module docstring)."""
        if self.grad is None and g.shape == self.data.shape and g.dtype == self.data.dtype and g.is_contiguous():
            self.grad = g
        else:
            self.gradient()[:n] += g

    def grad_view(self, n: int, full: bool) -> torch.Tensor | None:
        """G[:n] for a read's grad_into when backward runs; None for a full read while G
        does not exist yet (its gradient then comes through autograd and becomes G)."""
        return None if full and self.grad is None else self.gradient()[:n]


class WriterStore:
    """Slots [W, B, S, D] of one forward; ``write`` in residual order, ``read`` prefixes."""

    def __init__(self, n_writers: int, shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device,
                 track_grad: bool, corrupt: torch.Tensor | None = None) -> None:
        self.slots = Slots(n_writers, shape, dtype, device)
        self.token = torch.empty(0, dtype=dtype, device=device, requires_grad=track_grad)
        self.n_written = 0
        self.corrupt = corrupt  # [W, B, S, D] in the model dtype, on the device or in host memory; or None
        self._sum: torch.Tensor | None = None  # corrupted_sum(self._sum_n)
        self._sum_n = 0
        self._skip: frozenset[int] = frozenset()  # slots left out of corrupted_sum (exclude_from_sum)
        self._range_sums: dict[tuple[int, int], torch.Tensor] = {}

    @property
    def buffer(self) -> torch.Tensor:
        return self.slots.data

    @property
    def grad(self) -> torch.Tensor | None:
        return self.slots.grad

    def corrupted(self, start: int, stop: int) -> torch.Tensor:
        """corrupt[start:stop] on the buffer's device (copied from host memory if kept there)."""
        return self.corrupt[start:stop].to(self.buffer.device, non_blocking=True)

    def corrupted_sum(self, n: int) -> torch.Tensor | None:
        """sum_{w<n} corrupt[w] [B, S, D] in float32 (float64 for float64 slots), or None
        without corrupted states. Valid until the next call (it is a running sum)."""
        if self.corrupt is None:
            return None
        if self._sum is None or n < self._sum_n:  # a recomputed (checkpointed) layer starts again
            dtype = torch.float64 if self.buffer.dtype == torch.float64 else torch.float32
            self._sum = torch.zeros(self.buffer.shape[1:], dtype=dtype, device=self.buffer.device)
            self._sum_n = 0
        for w in range(self._sum_n, n):  # one slot at a time: the same bits however often it restarts
            if w not in self._skip:
                self._sum += self.corrupted(w, w + 1)[0]
        self._sum_n = max(self._sum_n, n)
        return self._sum

    def exclude_from_sum(self, slots) -> None:
        """Leave these slots out of ``corrupted_sum`` (post_norm.py's reader mode: a post-normed
        layer's heads enter the readers through the norm, not the sum). Before any read."""
        self._skip = frozenset(int(s) for s in slots)
        self._sum, self._sum_n = None, 0

    def corrupted_range_sum(self, start: int, stop: int) -> torch.Tensor | None:
        """sum_{start <= w < stop} corrupt[w] [B, S, D] in float32 (float64 for float64 slots),
        kept until release_corrupted; None without corrupted states."""
        if self.corrupt is None:
            return None
        key = (start, stop)
        if key not in self._range_sums:
            dtype = torch.float64 if self.buffer.dtype == torch.float64 else torch.float32
            self._range_sums[key] = self.corrupted(start, stop).to(dtype).sum(0)
        return self._range_sums[key]

    def write(self, y: torch.Tensor) -> None:
        """Append y [k, B, S, D] (k writers) at the next slots."""
        slot, k = self.n_written, y.shape[0]
        if slot + k > self.buffer.shape[0] or y.shape[1:] != self.buffer.shape[1:]:
            raise RuntimeError(f"WriterStore: cannot write {tuple(y.shape)} at slot {slot} of {tuple(self.buffer.shape)}")
        into = self.buffer.data[slot:slot + k]  # no version bump: views of earlier slots saved for backward stay valid
        if self.corrupt is None:
            into.copy_(y.detach())
        else:
            torch.sub(y.detach(), self.corrupted(slot, slot + k), out=into)
        self.token = WriteSlots.apply(self.token, y, self.slots, slot)
        self.n_written = slot + k

    def resume(self, token: torch.Tensor, n_written: int) -> None:
        """Continue the chain from ``token`` with ``n_written`` slots filled: a checkpointed
        layer's recomputation starts again from its first slot and rewrites the same values."""
        self.token, self.n_written = token, n_written

    def release_corrupted(self) -> None:
        """Drop the corrupted states and their prefix sum once the forward is done: backward
        never reads them (unless a checkpointed layer is recomputed), so a caller that keeps
        no reference of its own frees them before backward."""
        self.corrupt, self._sum, self._sum_n = None, None, 0
        self._range_sums = {}

    def grad_into(self, n: int):
        """For edge_mix's ``grad_into`` on a read of n slots: a function giving G[:n] when
        backward runs, or None there when G does not exist yet and the read covers every slot
        (its gradient then comes through autograd and becomes G); None without autograd.
        The function holds the slots, never the store (see Slots)."""
        if not self.token.requires_grad:
            return None
        slots, full = self.slots, n == self.buffer.shape[0]
        return lambda: slots.grad_view(n, full)

    def grad_buffer(self, n: int):
        """For a reader that adds its gradient into the slots' gradient itself (post_norm.py): a
        function giving G[:n] when backward runs, G allocated zeroed if it does not exist yet;
        None without autograd. Holds the slots, never the store (see Slots)."""
        if not self.token.requires_grad:
            return None
        slots = self.slots
        return lambda: slots.gradient()[:n]

    def read(self, n: int) -> torch.Tensor:
        """The view buffer[:n] of the first n writers (all already written)."""
        if n > self.n_written:
            raise RuntimeError(f"WriterStore: read of {n} slots but only {self.n_written} are written")
        return ReadSlots.apply(self.token, self.slots, n)


class WriteSlots(torch.autograd.Function):
    """token' = WriteSlots(token, y, slots, slot): orders backward after every read of the
    slots written (their values were stored by WriterStore.write); y's gradient is G[slot:slot+k]."""

    @staticmethod
    def forward(ctx, token, y, slots: Slots, slot: int):
        ctx.slots, ctx.slot, ctx.k = slots, slot, y.shape[0]
        return token.new_empty(0)

    @staticmethod
    def backward(ctx, g_token):
        G = ctx.slots.grad
        g_y = None if G is None or not ctx.needs_input_grad[1] else G[ctx.slot:ctx.slot + ctx.k]
        return g_token, g_y, None, None


class ReadSlots(torch.autograd.Function):
    @staticmethod
    def forward(ctx, token, slots: Slots, n: int):
        ctx.set_materialize_grads(False)  # None when the reader added into G itself (grad_into)
        ctx.slots, ctx.n = slots, n
        ctx.token_like = (token.dtype, token.device)
        return slots.data[:n].detach()  # an alias of the slots, not a copy

    @staticmethod
    def backward(ctx, g):
        if g is not None:
            ctx.slots.adopt_or_add(g, ctx.n)
        dtype, device = ctx.token_like
        return torch.empty(0, dtype=dtype, device=device), None, None


# ---- capture from the unmodified model --------------------------------------------------------
@contextmanager
def hooks(registrations: list) -> Iterator[None]:
    """Register (module, kind, fn) hooks; always remove them on exit."""
    handles = []
    try:
        for module, kind, fn in registrations:
            handles.append(module.register_forward_pre_hook(fn) if kind == "pre" else module.register_forward_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()


def embedding_writers(adapter: Adapter, input_ids: torch.Tensor, position_ids: torch.Tensor,
                      split_embeds: bool) -> torch.Tensor:
    """[E, B, S, D]: (embeds) or (tok_embeds, pos_embeds), from the model's embedding modules."""
    tok = adapter.embed_tokens(input_ids)
    if adapter.embed_positions is None:
        return tok[None]
    pos = adapter.embed_positions(position_ids).to(tok.dtype).expand_as(tok)
    return torch.stack([tok, pos]) if split_embeds else (tok + pos)[None]


def rms_norm(x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
    """norm(x) over the last dimension, computed in float32 (float64 for float64 x) and
    rounded once to x's dtype, in the order HF's Gemma/OLMo-2 RMSNorms use."""
    xf = x.to(_arithmetic(x.dtype))
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)
    return (y * (norm.offset + norm.weight.to(xf.dtype))).to(x.dtype)


def _arithmetic(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def head_writers(z: torch.Tensor, W_O: torch.Tensor, b_O: torch.Tensor | None,
                 out: torch.Tensor | None = None, post_norm: RMSNorm | None = None) -> torch.Tensor:
    """z [B, H, S, dv] (any strides) -> writers [H, B, S, D] = z_h W_O[h] + b_O / H, or with a
    post-norm each head's share of RMSNorm(o), o = sum_h of those: g * o_h / rms(o) (see the
    module docstring; rms from all heads, so gradients reach every head through it).

    One batched product per head with the bias as its starting value (baddbmm): no separate
    bias pass over the [H, B, S, D] result. ``out`` (no autograd): a contiguous [H, B, S, D]
    tensor to write into, e.g. the capture's states, so the writers are never copied."""
    B, H, S, dv = z.shape
    D = W_O.shape[-1]
    zh = z.transpose(0, 1).reshape(H, B * S, dv)  # a small copy ([B, S, H*dv] elements)
    if b_O is None:
        y = torch.bmm(zh, W_O, out=None if out is None else out.view(H, B * S, D))
    else:
        bias = (b_O / H).expand(H, 1, D)
        y = torch.baddbmm(bias, zh, W_O, out=None if out is None else out.view(H, B * S, D))
    y = y.view(H, B, S, D)
    if post_norm is None:
        return y
    o = y.sum(0, dtype=_arithmetic(y.dtype))  # [B, S, D]
    gain = post_norm.offset + post_norm.weight.to(o.dtype)
    share = torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + post_norm.eps) * gain  # [B, S, D]
    if out is not None:  # computed in the arithmetic dtype, rounded once into out
        return torch.mul(y, share, out=y)
    return (y * share).to(y.dtype)


@torch.no_grad()
def capture_writer_states(adapter: Adapter, graph: Graph, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor | None, position_ids: torch.Tensor, *,
                          logits: bool = True, post_norm: str = "writer") -> tuple[torch.Tensor | None, torch.Tensor]:
    """(logits, states [W, B, S, D] in graph writer order) from one plain forward of the
    unmodified model with per-head outputs captured (see the module docstring).
    ``logits=False``: (None, states), the forward stopping before the unembedding where the
    adapter has a ``body_forward`` (the corrupted run's logits are never used).
    ``post_norm="reader"``: a post-normed layer's head states are the pre-norm z_h W_O[h],
    without b_O (post_norm.py)."""
    if adapter.reference_fn is not None:
        out = adapter.reference_fn(input_ids, attention_mask, position_ids, graph)
        return out if logits else (None, out[1])
    B, S = input_ids.shape
    states = torch.empty(graph.n_writers, B, S, adapter.d_model, dtype=adapter.dtype, device=input_ids.device)
    emb = embedding_writers(adapter, input_ids, position_ids, graph.config.split_embeds)
    states[: emb.shape[0]] = emb
    regs: list = []
    for layer, spec in enumerate(adapter.layers):
        first = graph.slot(f"a{layer}.h0")
        H, mlp_slot = spec.n_heads, graph.slot(f"m{layer}")

        def z_hook(module, args, first=first, H=H, spec=spec):
            z = args[0]  # [B, S, H*dv], the heads concatenated
            z = z.view(*z.shape[:-1], H, -1).transpose(1, 2)
            if post_norm == "reader" and spec.attn_post_norm is not None:
                head_writers(z, spec.W_O, None, out=states[first:first + H])
            else:
                head_writers(z, spec.W_O, spec.b_O, out=states[first:first + H], post_norm=spec.attn_post_norm)

        def mlp_hook(module, args, output, slot=mlp_slot, norm=spec.mlp_post_norm):
            y = output[0] if isinstance(output, tuple) else output
            states[slot] = y if norm is None else rms_norm(y, norm)

        regs += [(spec.o_proj, "pre", z_hook), (spec.mlp, "post", mlp_hook)]
    with hooks(regs):
        if logits or adapter.body_forward is None:
            out = adapter.full_forward(input_ids, attention_mask, position_ids)
        else:
            adapter.body_forward(input_ids, attention_mask, position_ids)
    return (out if logits else None), states
