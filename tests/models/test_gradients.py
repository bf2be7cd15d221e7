"""Mask gradients: finite for every parameter, and the slot buffer's gradients equal a plain
torch.cat implementation of the same forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _tiny import ARCHS, VOCAB, tiny_model

from edgeprune_fast.model import EdgePrunedModel
from edgeprune_fast.writers import ReadSlots, WriterStore, WriteSlots


class CatStore:
    """The obvious implementation: keep every write, concatenate them at every read."""

    def __init__(self, n_writers, shape, dtype, device, track_grad, corrupt=None):
        self.parts = []
        self.corrupt = corrupt
        self.token = None  # the WriterStore interface the model uses (resume: checkpointing only)

    def resume(self, token, n_written):
        pass

    def write(self, y):  # the slots hold clean - corrupted, as WriterStore's
        n = sum(p.shape[0] for p in self.parts)
        self.parts.append(y if self.corrupt is None else y - self.corrupt[n:n + y.shape[0]])

    def corrupted_sum(self, n):
        return None if self.corrupt is None else self.corrupt[:n].float().sum(0)

    def read(self, n):
        return torch.cat(self.parts)[:n]

    def grad_into(self, n):  # gradients through autograd (the cat's backward)
        return None

    def release_corrupted(self):
        self.corrupt = None



def _ids(seed):
    return torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))


def _kl(pruned, full_logits, ids, cids, mask=None):
    out = pruned(ids, cids, attention_mask=mask, training=True)
    kl = F.kl_div(out.logits.log_softmax(-1), full_logits.log_softmax(-1), log_target=True, reduction="batchmean")
    return kl, out


@pytest.mark.parametrize("arch", ARCHS)
def test_every_mask_parameter_gets_a_finite_gradient(arch):
    model = tiny_model(arch)
    # log_alpha near 0.5: samples fall inside (0, 1) often, so most gradients are non-zero
    pruned = EdgePrunedModel.from_hf(model, init=0.5, init_std=0.5).train()
    ids, cids = _ids(0), _ids(1)
    full, _ = pruned.reference(ids)
    kl, out = _kl(pruned, full, ids, cids)
    (kl + out.edge_sparsity + out.node_sparsity).backward()
    params = pruned.edge_log_alpha_parameters() + pruned.node_log_alpha_parameters()
    assert len(params) == len(pruned.graph.groups) + 1
    for p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all()
        assert p.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())  # the HF weights are frozen
    assert 0 < out.edge_sparsity.item() < 1 and out.edge_sparsity.requires_grad


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
@pytest.mark.parametrize("node_masks", [True, False])
def test_slot_buffer_gradients_equal_cat_implementation(arch, node_masks, monkeypatch):
    model = tiny_model(arch)
    ids, cids = _ids(0), _ids(1)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    results = []
    for store in (WriterStore, CatStore):
        monkeypatch.setattr(EdgePrunedModel, "store_cls", store)
        torch.manual_seed(3)
        pruned = EdgePrunedModel.from_hf(model, node_masks=node_masks, init=1.0, init_std=1.0)
        full, _ = pruned.reference(ids, mask)
        torch.manual_seed(4)  # the same mask noise in both runs
        kl, out = _kl(pruned, full, ids, cids, mask)
        kl.backward()
        grads = [p.grad.clone() for p in pruned.edge_log_alpha_parameters() + pruned.node_log_alpha_parameters()]
        results.append((out.logits.detach(), grads))
    (logits_a, grads_a), (logits_b, grads_b) = results
    torch.testing.assert_close(logits_a, logits_b, atol=1e-6, rtol=0)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("checkpoint_layers", [False, True])
def test_corrupted_states_are_dropped_after_the_forward(checkpoint_layers, monkeypatch):
    """Backward never reads the corrupted states (only a checkpointed layer's recomputation
    does), so the store lets go of them when the forward ends: states the caller does not
    hold are freed before backward. The gradients match the concatenating store's."""
    stores = []

    class Recording(WriterStore):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            stores.append(self)

    model = tiny_model("gpt2")
    ids, cids = _ids(0), _ids(1)
    grads = []
    for store, ckpt in ((Recording, checkpoint_layers), (CatStore, False)):
        monkeypatch.setattr(EdgePrunedModel, "store_cls", store)
        torch.manual_seed(3)
        pruned = EdgePrunedModel.from_hf(model, init=1.0, init_std=1.0, checkpoint_layers=ckpt)
        full, _ = pruned.reference(ids)
        torch.manual_seed(4)
        kl, _ = _kl(pruned, full, ids, cids)
        if store is Recording:
            (recorded,) = stores
            assert (recorded.corrupt is None) == (not checkpoint_layers)
        kl.backward()
        grads.append([p.grad for p in pruned.edge_log_alpha_parameters()])
    for ga, gb in zip(*grads):
        torch.testing.assert_close(ga, gb, atol=1e-6, rtol=1e-5)


def test_slot_functions_on_a_toy_chain():
    # y0 = a; y1 = f(read(1)); y2 = g(read(2)); loss = h(read(3)), against stacking
    a = torch.randn(1, 2, 3, 4, requires_grad=True)
    w = torch.randn(4, 4)

    def run(read_write):
        read, write = read_write
        write(a * 2)
        write(torch.tanh(read(1).sum(0, keepdim=True) @ w))
        r = read(2)
        write((r * r).sum(0, keepdim=True))  # r is saved for backward while slot 2 is written
        return (read(3) ** 3).sum()

    store = WriterStore(3, (2, 3, 4), torch.float32, torch.device("cpu"), True)
    (g1,) = torch.autograd.grad(run((store.read, store.write)), a)
    cat = CatStore(3, None, None, None, True)
    (g2,) = torch.autograd.grad(run((cat.read, cat.write)), a)
    torch.testing.assert_close(g1, g2)
    assert ReadSlots is not None and WriteSlots is not None


def test_read_is_a_view_not_a_copy():
    store = WriterStore(4, (2, 3, 5), torch.float32, torch.device("cpu"), False)
    store.write(torch.ones(2, 2, 3, 5))
    view = store.read(2)
    assert view.data_ptr() == store.buffer.data_ptr()
    with pytest.raises(RuntimeError, match="only 2 are written"):
        store.read(3)
