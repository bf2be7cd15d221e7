"""EAP-IG / MIB graph JSON: names, exact round trips, GQA and split embeddings, loading either format."""

import json

import pytest
import torch

from edgeprune_fast.circuit import Circuit
from edgeprune_fast.formats import (
    edge_from_eap,
    edge_to_eap,
    graph_from_cfg,
    load_circuit,
    read_eap_ig,
    save_eap_ig,
    to_eap_ig,
)
from edgeprune_fast.graph import Edge, Graph


def eap_edge_names(n_layers, n_heads, parallel=False):
    """Their edge set, built from their description: every earlier residual node feeds each head's
    q/k/v input and the MLP (the MLP also its own layer's heads unless parallel), all feed logits."""
    stream, names = ["input"], []
    for layer in range(n_layers):
        heads = [f"a{layer}.h{h}" for h in range(n_heads)]
        names += [f"{w}->{h}<{x}>" for w in stream for h in heads for x in "qkv"]
        if parallel:
            names += [f"{w}->m{layer}" for w in stream]
            stream = stream + heads
        else:
            stream = stream + heads
            names += [f"{w}->m{layer}" for w in stream]
        stream.append(f"m{layer}")
    return names + [f"{w}->logits" for w in stream]


@pytest.mark.parametrize("parallel", [False, True])
def test_edge_sets_are_the_same(parallel):
    g = Graph.build(3, 4, parallel_mlp=parallel)
    ours = [n for e in g.edges() for n in edge_to_eap(g, e)]
    assert sorted(ours) == sorted(eap_edge_names(3, 4, parallel))
    assert len(set(ours)) == g.n_edges
    for e in g.edges():
        assert edge_from_eap(g, edge_to_eap(g, e)[0]) == [e]


def test_names():
    g = Graph.build(3, 4)
    assert edge_to_eap(g, Edge("embeds", "a2.h3.k")) == ["input->a2.h3<k>"]
    assert edge_to_eap(g, Edge("m1", "resid_post")) == ["m1->logits"]
    assert edge_from_eap(g, "a0.h1->m2") == [Edge("a0.h1", "m2")]
    with pytest.raises(ValueError, match="a2.h1->a0.h3.q"):
        edge_from_eap(g, "a2.h1->a0.h3<q>")  # not upstream
    with pytest.raises(ValueError, match="EAP-IG edge name"):
        edge_from_eap(g, "a0.h1")
    with pytest.raises(ValueError, match="head 7"):
        edge_from_eap(g, "input->a0.h7<q>")


def test_round_trip_exact(tmp_path):
    g = Graph.build(3, 4)
    gen = torch.Generator().manual_seed(0)
    all_edges = g.edges()
    kept = [e for e, keep in zip(all_edges, torch.rand(len(all_edges), generator=gen) < 0.1) if keep]
    scores = {e: float(s) for e, s in zip(all_edges, torch.randn(len(all_edges), generator=gen))}
    p = save_eap_ig(tmp_path / "g.json", g, kept, scores, d_model=32)
    d = json.loads(p.read_text())
    assert d["cfg"] == {"n_layers": 3, "n_heads": 4, "parallel_attn_mlp": False, "d_model": 32}
    assert sum(v["in_graph"] for v in d["edges"].values()) == len(kept)
    assert d["nodes"]["logits"] == any(e.reader == "resid_post" for e in kept)
    g2, back, back_scores = read_eap_ig(d)  # graph from the file's cfg
    assert g2.signature() == g.signature()
    assert back == kept
    assert back_scores == pytest.approx(scores)
    # our format -> theirs -> ours
    c = Circuit.from_edges(g, kept)
    c2 = load_circuit(p)
    assert c2.edges == c.edges and c2.n_edges_total == c.n_edges_total and c2.sparsity == c.sparsity
    # ... and an EAP-IG file written by their code (nodes as bools) or MIB's (nodes as dicts) both load
    d["nodes"] = {k: {"in_graph": v} for k, v in d["nodes"].items()}
    (tmp_path / "mib.json").write_text(json.dumps(d))
    assert load_circuit(tmp_path / "mib.json", g).edges == c.edges


def test_gqa_maps_to_every_head_of_the_group():
    g = Graph.build(2, 4, 2)  # KV group 0 = heads 0, 1
    e = Edge("embeds", "a1.g0.k")
    assert edge_to_eap(g, e) == ["input->a1.h0<k>", "input->a1.h1<k>"]
    kept = [e, Edge("a0.h3", "a1.h2.q"), Edge("m0", "a1.g1.v")]
    d = to_eap_ig(g, kept)
    assert sum(v["in_graph"] for v in d["edges"].values()) == 5
    _, back, _ = read_eap_ig(d, g)
    assert back == sorted(kept, key=g.edges().index)
    # one head of a group is enough on import (a union) unless strict
    d["edges"]["input->a1.h1<k>"]["in_graph"] = False
    assert Edge("embeds", "a1.g0.k") in read_eap_ig(d, g)[1]
    with pytest.raises(ValueError, match="disagree"):
        read_eap_ig(d, g, strict=True)


def test_split_embeds_merge_to_input():
    g = Graph.build(2, 2, split_embeds=True)
    d = to_eap_ig(g, [Edge("pos_embeds", "m0")])
    assert d["edges"]["input->m0"]["in_graph"] and d["nodes"]["input"]
    _, back, _ = read_eap_ig(d, g)
    assert back == [Edge("tok_embeds", "m0"), Edge("pos_embeds", "m0")]


def test_mismatched_and_malformed(tmp_path):
    g = Graph.build(2, 2)
    d = to_eap_ig(g, [Edge("embeds", "m0")])
    with pytest.raises(ValueError, match="n_layers=2, n_heads=2; expected this model's n_layers=3"):
        read_eap_ig(d, Graph.build(3, 2))
    with pytest.raises(ValueError, match="'cfg', 'nodes' and 'edges'"):
        read_eap_ig({"edges": {}})
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_circuit(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="no such file"):
        load_circuit(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="one n_heads"):
        to_eap_ig(Graph.build(2, (2, 3)), [])
    assert graph_from_cfg({"n_layers": 1, "n_heads": 2}).n_edges == Graph.build(1, 2).n_edges
