"""FSDP2 sharding of the frozen HF weights for the edge-pruned forward (issue #7).

``shard_weights(model, mesh)`` calls ``torch.distributed.fsdp.fully_shard`` on every decoder
layer (``LayerSpec.block``) and then on the HF model itself, whose own unit (the root) keeps
the rest: embeddings, final norm, unembedding. Every process then holds 1/P of each
parameter as a DTensor shard; the weights stay frozen (FSDP2 takes parameters with
requires_grad=False and never reduces gradients for them). Nothing here communicates by
itself: gathering and freeing are FSDP's ``FSDPModule.unshard()`` / ``reshard()``.

Why the forward needs hook points. FSDP gathers a unit's parameters in hooks around that
unit's ``forward``, and the edge-pruned forward (model.py) never calls a decoder layer's or
the root's forward: it calls their norms and MLPs as submodules and reads per-head *views*
of W_Q, W_K, W_V, W_O (models/). So model.py gathers each unit around its own work:

    forward   enter(unit, x):  unit.unshard(); the layer (or embedding / final read + unembed)
              leave(unit, y):  unit.reshard()
    backward  leave's backward unshards the unit again before any of its operations run
              backward (their outputs all flow into y); enter's backward reshards it after
              the last of them (their inputs all come from x)

``enter``/``leave`` are identities on the tensor that threads the layer (the slot store's
token; the logits for the root), so autograd orders the hooks around the unit's backward,
with or without activation checkpointing: a checkpointed layer is recomputed inside its
backward, i.e. between the two hooks, while its weights are gathered. At most one unit is
gathered at a time, in forward and in backward.

Why the views can be taken once. FSDP2 keeps one unsharded parameter per parameter for the
module's lifetime (``FSDPParam._unsharded_param``): ``reshard`` resizes its storage to 0 and
``unshard`` resizes it back and all-gathers into it, without a version bump. Views of it
(the LayerSpec's W_Q ..., and the tensors autograd saves in a forward without
checkpointing) are therefore valid whenever their unit is gathered. ``shard_weights``
builds each layer's views once (``Adapter.layer_fn``) while that layer alone is gathered;
the root's parts are modules (embedding, norm, lm_head) whose parameters FSDP swaps in.

Reference passes (``EdgePrunedModel.reference``) are the HF model's own forward: FSDP's
hooks gather each layer there, the capture hooks read the views while it is gathered, and
model.py gathers the root around it (the embedding writers are computed outside the HF
forward). ``shard_weights`` runs one token through the HF model, so that FSDP takes the HF
model as its root even when a later pass enters below it.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from .models import Adapter


class ShardedWeights:
    """The FSDP units of a sharded model: ``layers[l]`` (decoder layer l) and ``root``."""

    def __init__(self, layers: list[nn.Module], root: nn.Module) -> None:
        self.layers, self.root = layers, root

    @contextmanager
    def gathered(self, unit: nn.Module) -> Iterator[None]:
        """``unit``'s weights gathered for the body (no backward through them, e.g. the
        embedding: its input is token ids, its weights frozen)."""
        unit.unshard()
        try:
            yield
        finally:
            unit.reshard()

    def enter(self, unit: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Gather ``unit`` now; returns x, through which backward reshards it afterwards."""
        unit.unshard()
        return _InBackward.apply(x, unit.reshard)  # in backward: the unit's backward (all that used x) is done

    def leave(self, unit: nn.Module, y: torch.Tensor) -> torch.Tensor:
        """Free ``unit``'s gathered weights now; returns y, through which backward gathers them
        again before the unit's own backward."""
        unit.reshard()
        return _InBackward.apply(y, unit.unshard)  # in backward: before the unit's backward or recomputation

    def local_fraction(self) -> list[float]:
        """Per unit (layers, then the root): the share of its parameter elements this process
        holds (about 1/P each while sharded; for tests and reports)."""
        in_layers = {id(p) for layer in self.layers for p in layer.parameters()}
        units = [list(layer.parameters()) for layer in self.layers]
        units.append([p for p in self.root.parameters() if id(p) not in in_layers])
        return [sum(_local(p).numel() for p in ps) / max(sum(p.numel() for p in ps), 1) for ps in units]


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p  # a DTensor shard, or a gathered (plain) parameter


class _InBackward(torch.autograd.Function):
    """Identity whose backward calls ``action()`` before passing the gradient on."""

    @staticmethod
    def forward(ctx, x, action):
        ctx.action = action
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.action()
        return g, None


def fsdp_wrapped(module: nn.Module) -> bool:
    """Whether ``fully_shard`` has been applied to ``module`` or to one of its submodules."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is None:  # never imported (its first import takes ~1 s): nothing can be wrapped
        return False
    return any(isinstance(m, fsdp.FSDPModule) for m in module.modules())


def _storages(module: nn.Module) -> set[int]:
    return {p.untyped_storage().data_ptr() for p in module.parameters()}


def shard_weights(adapter: Adapter, mesh=None) -> tuple[ShardedWeights, Adapter]:
    """``fully_shard`` every decoder layer, then the HF model (the root); returns the units
    and the adapter rebuilt on FSDP's unsharded parameters (the caller drops the old one:
    its views keep the full weights alive). ``mesh``: a 1-D DeviceMesh (default: FSDP's,
    every process of the default group, on the current device type)."""
    if adapter.layer_fn is None or any(s.block is None for s in adapter.layers):
        raise NotImplementedError(f"model: {adapter.architecture}'s adapter gives no per-layer builder "
                                  f"(Adapter.layer_fn, LayerSpec.block), so its weights cannot be sharded")
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("torch.distributed: expected an initialised process group (DataParallel.from_env() "
                         "under torchrun), got none")
    from torch.distributed.fsdp import fully_shard

    if fsdp_wrapped(adapter.model):
        raise ValueError("model: expected weights not yet sharded, got a model already wrapped by fully_shard")
    for i, s in enumerate(adapter.layers):  # the views must be of the block's own parameters, or FSDP won't gather them
        views = [t for f in dataclasses.fields(s) if isinstance(t := getattr(s, f.name), torch.Tensor)]
        if missing := [t for t in views if t.untyped_storage().data_ptr() not in _storages(s.block)]:
            raise ValueError(f"adapter: layer {i}'s weight views must be of LayerSpec.block's parameters; "
                             f"{len(missing)} of {len(views)} are not")
    layers = [s.block for s in adapter.layers]
    kw = {} if mesh is None else {"mesh": mesh}
    for block in layers:
        fully_shard(block, **kw)
    fully_shard(adapter.model, **kw)
    units = ShardedWeights(layers, adapter.model)
    # FSDP makes the first unit to run forward the root; a pass that starts inside the HF model
    # (e.g. a capture through its base model) would make each layer a root of its own, left
    # gathered after its forward. One token through the HF model settles the root now.
    device = next(adapter.model.parameters()).device
    one = torch.zeros(1, 1, dtype=torch.long, device=device)
    with torch.no_grad(), units.gathered(adapter.model):
        adapter.full_forward(one, None, one)
    specs = []
    for i, block in enumerate(layers):  # one layer gathered at a time
        with units.gathered(block):
            specs.append(adapter.layer_fn(i))
    return units, dataclasses.replace(adapter, layers=tuple(specs))
