"""Per-layer activation checkpointing and streamed corrupted states change nothing: the same
logits, loss and gradient of every mask parameter as the plain forward (same seed)."""

import pytest
import torch
import torch.nn.functional as F
from _tiny import VOCAB, tiny_model

from edgeprune_fast.model import EdgePrunedModel


def _step(pruned: EdgePrunedModel, ids, cids, target, seed: int):
    pruned.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = pruned(ids, cids, training=True)
    kl = F.kl_div(out.logits.log_softmax(-1), target, log_target=True, reduction="batchmean")
    loss = kl + out.edge_sparsity + out.node_sparsity
    loss.backward()
    grads = [p.grad.clone() for p in pruned.masks.parameters()]
    return out, loss.detach(), grads


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2"])  # gemma2: post-norm shares, softcaps recomputed
@pytest.mark.parametrize("node_masks", [True, False])
def test_checkpointed_equals_plain(arch, node_masks):
    hf = tiny_model(arch)
    pruned = EdgePrunedModel.from_hf(hf, node_masks=node_masks, init=1.0, init_std=1.0).train()
    ids, cids = torch.randint(0, VOCAB, (3, 7)), torch.randint(0, VOCAB, (3, 7))
    target = pruned.reference(ids)[0].log_softmax(-1)
    plain, loss0, g0 = _step(pruned, ids, cids, target, seed=5)
    assert not pruned.checkpoint_layers
    pruned.gradient_checkpointing(True)
    calls = []
    layer = pruned._layer
    pruned._layer = lambda *a: calls.append(a[2]) or layer(*a)  # count (re)computations of each layer
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        saved = []
        ckpt, loss1, g1 = _step(pruned, ids, cids, target, seed=5)
    saved_ckpt = sum(saved)
    pruned._layer = layer
    pruned.gradient_checkpointing(False)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        saved = []
        _step(pruned, ids, cids, target, seed=5)
    n = hf.config.num_hidden_layers
    assert calls == list(range(n)) + list(reversed(range(n)))  # forward, then recomputed in backward
    assert saved_ckpt < 0.5 * sum(saved)  # what autograd keeps outside the checkpointed layers
    # masks near 0.5 (init 1 +- 1): a sampled z is strictly inside (0, 1) for many edges,
    # so a different noise draw in the recomputation would change the gradients
    torch.testing.assert_close(ckpt.logits, plain.logits, rtol=0, atol=0)
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    assert ckpt.sampled_edge_sparsity == plain.sampled_edge_sparsity
    for a, b in zip(g1, g0):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_checkpointing_from_hf_option_and_noise_free_paths():
    """The from_hf option; eval (no noise) and fixed circuits go through the same path."""
    hf = tiny_model("llama")
    ids, cids = torch.randint(0, VOCAB, (2, 5)), torch.randint(0, VOCAB, (2, 5))
    a = EdgePrunedModel.from_hf(hf, init=1.0, init_std=1.0)
    b = EdgePrunedModel.from_hf(hf, init=1.0, init_std=1.0, checkpoint_layers=True)
    b.load_mask_state_dict(a.mask_state_dict())
    for model in (a, b):
        model.eval()
    la, lb = a(ids, cids).logits, b(ids, cids).logits
    la.sum().backward()
    lb.sum().backward()
    torch.testing.assert_close(lb, la, rtol=0, atol=0)
    for pa, pb in zip(a.masks.parameters(), b.masks.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-6, atol=1e-7)
    edges = [str(e) for e in a.graph.edges()[::3]]
    a.set_circuit(edges)
    b.set_circuit(edges)
    with torch.no_grad():  # no grad: checkpointing is skipped, same result
        torch.testing.assert_close(b(ids, cids).logits, a(ids, cids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("checkpoint_layers", [False, True])
def test_corrupted_states_streamed_from_cpu(checkpoint_layers):
    """corrupted_on_cpu keeps the states off the device and reads prefixes: same results."""
    hf = tiny_model("gpt2")
    ids, cids = torch.randint(0, VOCAB, (2, 6)), torch.randint(0, VOCAB, (2, 6))
    a = EdgePrunedModel.from_hf(hf, init=1.0, init_std=1.0).train()
    b = EdgePrunedModel.from_hf(hf, init=1.0, init_std=1.0, corrupted_on_cpu=True,
                                checkpoint_layers=checkpoint_layers).train()
    b.load_mask_state_dict(a.mask_state_dict())
    target = a.reference(ids)[0].log_softmax(-1)
    corrupted = a.reference(cids)[1]
    assert b.place_corrupted_writers(corrupted).device.type == "cpu"
    out_a, loss_a, g_a = _step(a, ids, cids, target, seed=3)
    out_b, loss_b, g_b = _step(b, ids, cids, target, seed=3)
    torch.testing.assert_close(out_b.logits, out_a.logits, rtol=0, atol=0)
    for x, y in zip(g_b, g_a):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def test_trainer_with_checkpointing_and_offload_takes_the_same_steps():
    """End to end through the Trainer: checkpointed layers and corrupted states kept on the
    CPU (placed once, when the trainer caches them) train the same masks as the plain model."""
    from edgeprune_fast.tasks.base import Task, TaskBatch
    from edgeprune_fast.train import TrainConfig, Trainer

    class KL(Task):
        name = "kl"

    g = torch.Generator().manual_seed(3)
    target = torch.zeros(2, 6, dtype=torch.bool)
    target[:, -2:] = True
    batches = [TaskBatch(torch.randint(3, VOCAB, (2, 6), generator=g), torch.randint(3, VOCAB, (2, 6), generator=g),
                         None, target) for _ in range(2)]
    config = TrainConfig(target_edge_sparsity=0.5, steps=3, sparsity_warmup=2, lr_warmup=1, lr_edge=0.1, lr_node=0.1,
                         lr_lambda=0.1, progress=False)
    masks = []
    for kwargs in ({}, {"checkpoint_layers": True, "corrupted_on_cpu": True}):
        model = EdgePrunedModel.from_hf(tiny_model("llama"), init=1.0, init_std=0.5, **kwargs)
        trainer = Trainer(model, KL(), batches, config)
        trainer.run()
        assert trainer._cache and all(c.device.type == "cpu" for _, _, c in trainer._cache.values())
        masks.append(model.mask_state_dict())
    for k, v in masks[0].items():
        torch.testing.assert_close(masks[1][k], v, rtol=1e-6, atol=1e-6)
