"""ranking.py: the edge order, scores that carry it through float32 and JSON to EAP-IG's
top-n, and EAP-IG's prune against a plain re-statement of it on their node names."""

import json

import pytest
import torch

from edgeprune_fast.formats import edge_to_eap, parse_eap_ig, to_eap_ig
from edgeprune_fast.graph import Edge, Graph
from edgeprune_fast.masks import EdgeMasks
from edgeprune_fast.ranking import effective_scores, export_scores, prune, rank_order, top_k


def test_rank_order_breaks_ties_by_graph_order():
    s = torch.tensor([1.0, 3.0, 2.0, 3.0, 1.0])
    assert rank_order(s).tolist() == [1, 3, 2, 0, 4]
    assert top_k(s, 2).tolist() == [False, True, False, True, False]
    first = torch.tensor([False, False, False, False, True])
    assert rank_order(s, first).tolist() == [4, 1, 3, 2, 0]
    with pytest.raises(ValueError, match="finite"):
        rank_order(torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="k: expected an int in"):
        top_k(s, 6)


def test_effective_score_is_the_min_of_edge_and_writer_node():
    g = Graph.build(1, 2)
    m = EdgeMasks(g)
    with torch.no_grad():
        for la in m.edge_log_alpha:
            la.copy_(torch.arange(la.numel(), dtype=torch.float32).view_as(la))
        m.node_log_alpha.copy_(torch.tensor([5.0, -1.0, 2.0, 0.5]))
    eff, edge, w = effective_scores(m), m.edge_scores(), m.writer_index()
    assert torch.equal(eff, torch.minimum(edge, m.node_log_alpha.detach()[w]))
    m2 = EdgeMasks(g, node_masks=False)
    assert torch.equal(effective_scores(m2), m2.edge_scores())


@pytest.mark.parametrize("case", ["ties", "huge", "close", "first"])
def test_exported_scores_give_our_top_n_for_every_n(case):
    gen = torch.Generator().manual_seed(0)
    E = 4000
    s = torch.randn(E, generator=gen) * 5
    first = None
    if case == "ties":
        s = torch.randint(-3, 4, (E,), generator=gen).float()  # many exact ties
    elif case == "huge":
        s = s * 1e3  # sigmoid would saturate these to equal floats
    elif case == "close":
        s = 20.0 + torch.arange(E) * 1e-9  # closer than float32 can tell apart
    else:
        first = torch.rand(E, generator=gen) < 0.1  # a circuit not chosen by the score alone
    v = export_scores(s, first)
    assert v.dtype == torch.float32 and bool((v > 0).all())
    order = rank_order(s, first)
    assert bool((v[order][1:] < v[order][:-1]).all())  # strictly decreasing along our order
    back = torch.tensor(json.loads(json.dumps(v.tolist())), dtype=torch.float32)  # through JSON
    assert torch.equal(back, v)
    # top n by |score| with an unstable sort (EAP-IG's argsort) is our first n, for every n
    theirs = torch.argsort(back.abs(), descending=True)
    assert torch.equal(theirs, order)
    if case in ("huge", "ties"):  # the values are the scores shifted (up to float32 steps), not ranks
        shifted = s.double() - s.min() + 1
        assert float((v.double() - shifted).abs().max()) < 1e-3 * float(shifted.max())


def _eap_prune(names: set[str], n_layers: int, n_heads: int) -> set[str]:
    """EAP-IG's Graph.prune restated on their names (their graph: input, a{l}.h{h}, m{l}, logits)."""
    def node(reader):
        return reader.split("<")[0]

    kept = set(names)
    while True:
        parents = {n.split("->")[0] for n in kept}
        fed = {node(n.split("->")[1]) for n in kept} | {"input"}
        alive = parents & fed
        new = {n for n in kept if n.split("->")[0] in alive and (node(n.split("->")[1]) in alive
                                                                or n.endswith("->logits"))}
        if new == kept:
            return kept
        kept = new


@pytest.mark.parametrize("density", [0.03, 0.1, 0.3])
def test_prune_equals_eap_igs(density):
    g = Graph.build(3, 4)
    gen = torch.Generator().manual_seed(int(density * 100))
    for _ in range(5):
        keep = torch.rand(g.n_edges, generator=gen) < density
        got = prune(g, keep)
        names = {edge_to_eap(g, e)[0] for e, k in zip(g.edges(), keep.tolist()) if k}
        want = _eap_prune(names, 3, 4)
        assert {edge_to_eap(g, e)[0] for e, k in zip(g.edges(), got.tolist()) if k} == want
        assert bool((got <= keep).all())


def test_prune_grouped_reader_belongs_to_every_head_of_its_group():
    g = Graph.build(2, 4, 2)
    index = {e: i for i, e in enumerate(g.edges())}
    keep = torch.zeros(g.n_edges, dtype=torch.bool)
    # a1.g0.k feeds heads 0 and 1 of layer 1; only head 1 writes on: the shared reader stays
    for e in [Edge("embeds", "a1.g0.k"), Edge("a1.h1", "resid_post"), Edge("a0.h0", "resid_post")]:
        keep[index[e]] = True
    got = {e for e, k in zip(g.edges(), prune(g, keep).tolist()) if k}
    assert got == {Edge("embeds", "a1.g0.k"), Edge("a1.h1", "resid_post")}  # a0.h0 has no input


def test_file_scores_rank_like_ours():
    g = Graph.build(2, 4, 2, kv_per_query_head=True)
    s = torch.randn(g.n_edges, generator=torch.Generator().manual_seed(1))
    v = export_scores(s)
    d = to_eap_ig(g, [], dict(zip(g.edges(), v.tolist())), d_model=8)
    f = parse_eap_ig(json.loads(json.dumps(d)))
    for n in (0, 1, 17, g.n_edges // 2, g.n_edges):
        ours = {edge_to_eap(g, e)[0] for e, k in zip(g.edges(), top_k(s, n).tolist()) if k}
        assert {nm for nm, k in zip(f.names, f.top_n(n)) if k} == ours
