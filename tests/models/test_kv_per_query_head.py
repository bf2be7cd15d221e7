"""k/v readers per query head (MIB's graph for grouped-query models) against HF, the slow
reference, and the grouped graph with the same masks (forward and mask gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _slow_reference import slow_forward
from _tiny import VOCAB, tiny_model

from edgeprune_fast.formats import mib_graph
from edgeprune_fast.graph import Graph, n_edges_closed_form
from edgeprune_fast.model import EdgePrunedModel

TOL = 1e-5
GQA = ["llama", "qwen2"]  # 4 query heads, 2 KV heads


def _ids(seed, B=3, S=8):
    return torch.randint(3, VOCAB, (B, S), generator=torch.Generator().manual_seed(seed))


def test_graph_names_and_counts():
    g = Graph.build(2, 4, 2, kv_per_query_head=True)
    assert g.groups[0].readers == tuple(f"a0.h{h}.{t}" for t in "qkv" for h in range(4))
    assert g.n_edges == Graph.build(2, 4).n_edges == n_edges_closed_form(2, 4, 2, kv_per_query_head=True)
    assert g.n_edges > Graph.build(2, 4, 2).n_edges
    # no grouping: the flag changes nothing (and is not part of the signature)
    assert Graph.build(2, 4, 4, kv_per_query_head=True).signature() == Graph.build(2, 4).signature()
    assert "kv_per_query_head" in g.signature()
    with pytest.raises(ValueError, match="did you mean"):
        g.edge_index("embeds->a1.g0.k")


@pytest.mark.parametrize("arch", GQA)
def test_every_edge_kept_equals_hf(arch, one_thread):
    model = tiny_model(arch)
    pruned = EdgePrunedModel.from_hf(model, ablation="zero", kv_per_query_head=True)
    assert pruned.graph.signature() == mib_graph(pruned.graph).signature()
    ids = _ids(0)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        pruned.set_circuit(pruned.graph.edges())
        for m in (None, mask):
            want = model(ids, attention_mask=m).logits
            got = pruned(ids, attention_mask=m).logits
            real = slice(None) if m is None else m.bool()
            torch.testing.assert_close(got[real], want[real], atol=TOL, rtol=0)


@pytest.mark.parametrize("ablation", ["corrupted", "zero"])
@pytest.mark.parametrize("arch", GQA)
def test_random_circuit_equals_slow_reference(arch, ablation, one_thread):
    model = tiny_model(arch)
    pruned = EdgePrunedModel.from_hf(model, ablation=ablation, kv_per_query_head=True)
    ids, cids = _ids(0), _ids(1)
    g = torch.Generator().manual_seed(3)
    edges = [e for e in pruned.graph.edges() if torch.rand(1, generator=g).item() < 0.5]
    # the heads of a KV group read different writers (else the test could not tell per-head readers apart)
    assert {e.writer for e in edges if e.reader == "a1.h0.k"} != {e.writer for e in edges if e.reader == "a1.h1.k"}
    everything = {(e.writer, e.reader) for e in pruned.graph.edges()}
    with torch.no_grad():
        ablated = slow_forward(model, cids, everything, kv_per_query_head=True)[1] if ablation == "corrupted" \
            else None
        want, _ = slow_forward(model, ids, {(e.writer, e.reader) for e in edges}, ablated=ablated,
                               kv_per_query_head=True)
        pruned.set_circuit(edges)
        got = pruned(ids, cids if ablation == "corrupted" else None).logits
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    assert (want - model(ids).logits).abs().max() > 1e-2


def _soft_masks(graph: Graph, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(len(gr.readers), gr.n_upstream, generator=g).requires_grad_() for gr in graph.groups]


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")  # soft masks set as a circuit
@pytest.mark.parametrize("arch", GQA)
def test_equal_masks_per_group_equal_the_grouped_graph(arch, one_thread):
    """Per-query-head masks that agree inside every KV group are the grouped graph's masks:
    same logits, and the grouped mask's gradient is the sum of its heads' gradients."""
    model = tiny_model(arch)
    grouped = EdgePrunedModel.from_hf(model, ablation="corrupted")
    per_query = EdgePrunedModel.from_hf(model, ablation="corrupted", kv_per_query_head=True)
    H, K = 4, 2
    ids, cids = _ids(0), _ids(1)
    z = _soft_masks(grouped.graph, 11)

    def expand(zg, gi):  # [H + 2K, W] -> [3H, W]: k/v rows repeated for the heads of their group
        if gi % 2 or gi == len(z) - 1:
            return zg
        q, k, v = zg.split([H, K, K])
        return torch.cat([q, k.repeat_interleave(H // K, 0), v.repeat_interleave(H // K, 0)])

    full = model(ids).logits.detach()
    outs = []
    for pruned, masks in ((grouped, z), (per_query, [expand(zg, gi) for gi, zg in enumerate(z)])):
        pruned.masks.circuit = masks
        logits = pruned(ids, cids).logits
        loss = F.kl_div(logits.log_softmax(-1), full.log_softmax(-1), log_target=True, reduction="batchmean")
        grads = torch.autograd.grad(loss, z)
        outs.append((logits.detach(), grads))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=TOL, rtol=0)
    for g0, g1 in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(g1, g0, atol=1e-5, rtol=1e-4)
    assert all(g.abs().sum() > 0 for g in outs[0][1])


@pytest.mark.parametrize("arch", GQA)
def test_learned_masks_train(arch, one_thread):
    model = tiny_model(arch)
    pruned = EdgePrunedModel.from_hf(model, init=0.5, init_std=0.5, kv_per_query_head=True).train()
    ids, cids = _ids(0, B=2, S=6), _ids(1, B=2, S=6)
    full, _ = pruned.reference(ids)
    out = pruned(ids, cids, training=True)
    loss = F.kl_div(out.logits.log_softmax(-1), full.log_softmax(-1), log_target=True, reduction="batchmean")
    (loss + out.edge_sparsity).backward()
    for p in pruned.edge_log_alpha_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
