"""EAP-IG / MIB graph JSON: names, exact round trips, GQA and split embeddings, loading either format."""

import json

import pytest
import torch

from edgeprune_fast.circuit import Circuit
from edgeprune_fast.formats import (
    eap_matrix_position,
    edge_from_eap,
    edge_to_eap,
    graph_from_cfg,
    load_circuit,
    mib_eap_ig,
    parse_eap_ig,
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
    # nodes in EAP-IG's current form (since 13c0033): name -> {"in_graph": bool}, logits included
    assert set(d["nodes"]) == {"input", "logits", *(f"a{la}.h{h}" for la in range(3) for h in range(4)),
                               "m0", "m1", "m2"}
    assert all(set(v) == {"in_graph"} and isinstance(v["in_graph"], bool) for v in d["nodes"].values())
    assert d["nodes"]["logits"] == {"in_graph": True}
    g2, back, back_scores = read_eap_ig(d)  # graph from the file's cfg
    assert g2.signature() == g.signature()
    assert back == kept
    assert back_scores == pytest.approx(scores)
    # our format -> theirs -> ours
    c = Circuit.from_edges(g, kept)
    c2 = load_circuit(p)
    assert c2.edges == c.edges and c2.n_edges_total == c.n_edges_total and c2.sparsity == c.sparsity
    # ... and a file in the 2024 form (nodes as bare bools) loads the same
    d["nodes"] = {k: v["in_graph"] for k, v in d["nodes"].items()}
    (tmp_path / "old.json").write_text(json.dumps(d))
    assert load_circuit(tmp_path / "old.json", g).edges == c.edges
    d["nodes"]["m0"] = "yes"
    with pytest.raises(ValueError, match="'m0'"):
        read_eap_ig(d)


def test_node_flags_follow_eap_igs_apply_topn():
    """A node is in the graph when it has a kept outgoing and a kept incoming edge (input: outgoing only)."""
    g = Graph.build(2, 2)
    d = to_eap_ig(g, [Edge("embeds", "a0.h1.v"), Edge("a0.h1", "m1"), Edge("a0.h0", "resid_post")], d_model=8)
    on = {n for n, v in d["nodes"].items() if v["in_graph"]}
    assert on == {"input", "a0.h1", "logits"}  # a0.h0 has no incoming edge, m1 no outgoing one


def test_d_model_is_required():
    g = Graph.build(1, 2)
    with pytest.raises(TypeError):
        to_eap_ig(g, [])  # keyword-only and required: their loader needs it
    with pytest.raises(ValueError, match="d_model"):
        to_eap_ig(g, [], d_model=None)


def test_gqa_maps_to_every_head_of_the_group():
    g = Graph.build(2, 4, 2)  # KV group 0 = heads 0, 1
    e = Edge("embeds", "a1.g0.k")
    assert edge_to_eap(g, e) == ["input->a1.h0<k>", "input->a1.h1<k>"]
    kept = [e, Edge("a0.h3", "a1.h2.q"), Edge("m0", "a1.g1.v")]
    d = to_eap_ig(g, kept, d_model=8)
    assert sum(v["in_graph"] for v in d["edges"].values()) == 5
    assert len(d["edges"]) == Graph.build(2, 4).n_edges  # MIB's graph: k/v per query head
    _, back, _ = read_eap_ig(d, g)
    assert back == sorted(kept, key=g.edges().index)
    # the per-query-head graph takes the file as it is
    gq = Graph.build(2, 4, 2, kv_per_query_head=True)
    _, back_q, _ = read_eap_ig(d, gq)
    assert len(back_q) == 5 and to_eap_ig(gq, back_q, d_model=8) == d
    # heads of a group that disagree: an error naming the group by default; union / intersection on request
    d["edges"]["input->a1.h1<k>"]["in_graph"] = False
    with pytest.raises(ValueError, match=r"KV group 0 of layer 1 \(query heads 0..1.*input->a1.h0<k>.*input->a1.h1<k>"):
        read_eap_ig(d, g)
    assert Edge("embeds", "a1.g0.k") in read_eap_ig(d, g, gqa="union")[1]
    assert Edge("embeds", "a1.g0.k") not in read_eap_ig(d, g, gqa="intersection")[1]
    assert len(read_eap_ig(d, gq)[1]) == 4
    with pytest.raises(ValueError, match="gqa"):
        read_eap_ig(d, g, gqa="any")


def test_split_embeds_merge_to_input():
    g = Graph.build(2, 2, split_embeds=True)
    both = [Edge("tok_embeds", "m0"), Edge("pos_embeds", "m0")]
    d = to_eap_ig(g, both, d_model=8)  # both kept: nothing changes
    assert d["edges"]["input->m0"]["in_graph"] and d["nodes"]["input"]["in_graph"]
    _, back, _ = read_eap_ig(d, g)
    assert back == both
    with pytest.raises(ValueError, match=r"1 edges change.*\['input->m0'\]"):
        to_eap_ig(g, [Edge("pos_embeds", "m0")], d_model=8)
    with pytest.warns(UserWarning, match=r"input->m0"):
        d = to_eap_ig(g, [Edge("pos_embeds", "m0")], d_model=8, split_embeds="merge")
    assert d["edges"]["input->m0"]["in_graph"]


def test_scores_only_files_need_a_selection(tmp_path):
    g = Graph.build(2, 2)
    scores = {e: float(i % 7) - 3.0 for i, e in enumerate(g.edges())}  # negative scores rank by |score|
    p = save_eap_ig(tmp_path / "scores.json", g, [], scores, d_model=8)
    with pytest.raises(ValueError, match="scores only.*--top-n N or --top-percent P"):
        load_circuit(p, g)
    f = parse_eap_ig(json.loads(p.read_text()))
    assert f.scores_only
    c = load_circuit(p, g, top_n=5)
    assert c.n_edges <= 5 and c.config["selection"]["top_n"] == 5
    assert load_circuit(p, g, top_percent=10).config["selection"]["top_n"] == int(0.1 * g.n_edges)
    # top n by |score|, ties in EAP-IG's matrix order (forward index, then backward index)
    keep = f.top_n(5)
    chosen = [n for n, k in zip(f.names, keep) if k]
    assert all(abs(scores[edge_from_eap(g, n)[0]]) == 3.0 for n in chosen)
    by_pos = sorted((n for n in f.names if abs(scores[edge_from_eap(g, n)[0]]) == 3.0),
                    key=lambda n: eap_matrix_position(2, 2, n))
    assert len(by_pos) > 5 and set(chosen) == set(by_pos[:5])
    with pytest.raises(ValueError, match="top_n, top_percent"):
        load_circuit(p, g, top_n=1, top_percent=1)


def test_matrix_position_is_eap_igs_index():
    # Graph._forward_index / _backward_index of EAP-IG, L=2, H=2: n_backward = 2*(3*2+1)+1 = 15
    assert eap_matrix_position(2, 2, "input->a0.h0<q>") == 0
    assert eap_matrix_position(2, 2, "input->a0.h1<k>") == 3
    assert eap_matrix_position(2, 2, "input->m0") == 6
    assert eap_matrix_position(2, 2, "a0.h1->a1.h0<v>") == 2 * 15 + 7 + 4
    assert eap_matrix_position(2, 2, "m1->logits") == 6 * 15 + 14


def test_top_n_then_prune_removes_dangling_edges(tmp_path):
    g = Graph.build(2, 2)
    # a0.h0 gets no input edge: its output edge is dropped by EAP-IG's prune
    scores = {e: 0.0 for e in g.edges()}
    scores[Edge("a0.h0", "resid_post")] = 5.0
    scores[Edge("embeds", "resid_post")] = 4.0
    p = save_eap_ig(tmp_path / "s.json", g, [], scores, d_model=8)
    assert load_circuit(p, g, top_n=2).edges == (("embeds", "resid_post"),)


def test_mismatched_and_malformed(tmp_path):
    g = Graph.build(2, 2)
    d = to_eap_ig(g, [Edge("embeds", "m0")], d_model=8)
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
        to_eap_ig(Graph.build(2, (2, 3)), [], d_model=8)
    assert graph_from_cfg({"n_layers": 1, "n_heads": 2}).n_edges == Graph.build(1, 2).n_edges
    del d["edges"]["input->m0"]
    with pytest.raises(ValueError, match="lacks 1 of this graph's"):
        read_eap_ig(d, g)


def test_mib_eap_ig_ranks_a_grouped_circuit_first_with_distinct_scores():
    g = Graph.build(2, 4, 2)
    gen = torch.Generator().manual_seed(3)
    effective = torch.randn(g.n_edges, generator=gen)
    effective[:10] = 2.0  # ties
    circuit = [e for e, k in zip(g.edges(), (torch.rand(g.n_edges, generator=gen) < 0.2).tolist()) if k]
    d = json.loads(json.dumps(mib_eap_ig(g, circuit, effective, d_model=8)))
    f = parse_eap_ig(d)
    assert len(f.names) == Graph.build(2, 4, 2, kv_per_query_head=True).n_edges
    assert len(set(f.scores)) == len(f.scores) and min(f.scores) > 0  # every file edge its own score
    n = sum(f.in_graph)
    assert n == sum(len(edge_to_eap(g, e)) for e in circuit)
    assert f.top_n(n) == list(f.in_graph)  # the circuit is the top n by |score|
    _, back, _ = read_eap_ig(d, g)  # strict: the heads of every group agree
    assert back == sorted(circuit, key=g.edges().index)
