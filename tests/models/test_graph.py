"""Graph naming and edge counts (graph.py), with GPT-2 small's known counts."""

from __future__ import annotations

import pytest
from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config

from edgeprune_fast.graph import Edge, Graph, n_edges_closed_form
from edgeprune_fast.models import graph_config_from_hf


def test_gpt2_small_counts():
    cfg = GPT2Config()  # 12 layers, 12 heads: graph only, no weights
    g = Graph(graph_config_from_hf(cfg))
    assert (g.n_writers, g.n_edges) == (157, 32491)
    gs = Graph(graph_config_from_hf(cfg, split_embeds=True))
    assert (gs.n_writers, gs.n_edges) == (158, 32936)
    assert len(gs.edges()) == 32936 and len(set(gs.edges())) == 32936


@pytest.mark.parametrize("L,H,K,split,parallel", [
    (1, 1, 1, False, False), (3, 4, 4, True, False), (3, 4, 2, False, False), (5, 8, 1, False, False),
    (4, 6, 6, False, True), (2, 4, 2, False, True),
])
def test_closed_form_matches_enumeration(L, H, K, split, parallel):
    g = Graph.build(L, H, K, split_embeds=split, parallel_mlp=parallel)
    assert g.n_edges == len(g.edges()) == n_edges_closed_form(L, H, K, split_embeds=split, parallel_mlp=parallel)


@pytest.mark.parametrize("cfg,expected", [
    # Llama with GQA (8 heads, 2 KV heads, 2 layers): E=1, readers per layer 8 + 2*2 = 12 (+1 MLP)
    (LlamaConfig(num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, hidden_size=64),
     (8 + 4 + 1) * (1 + 10) + 2 * 8 + 1 + 18),
    (Qwen2Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, hidden_size=32),
     n_edges_closed_form(2, 4, 1)),
    # Pythia: parallel attention + MLP, the MLP does not read its own layer's heads
    (GPTNeoXConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=32), (12 + 1) * (1 + 6) + 1 + 10),
    (GPTNeoXConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, use_parallel_residual=False),
     (12 + 1) * (1 + 6) + 2 * 4 + 1 + 10),
])
def test_architecture_counts(cfg, expected):
    assert Graph(graph_config_from_hf(cfg)).n_edges == expected


def test_names_and_order():
    g = Graph.build(2, 4, 2)
    assert g.writer_names() == ["embeds", "a0.h0", "a0.h1", "a0.h2", "a0.h3", "m0", "a1.h0", "a1.h1", "a1.h2",
                                "a1.h3", "m1"]
    assert g.groups[0].readers == ("a0.h0.q", "a0.h1.q", "a0.h2.q", "a0.h3.q", "a0.g0.k", "a0.g1.k", "a0.g0.v",
                                   "a0.g1.v")
    assert [gr.key for gr in g.groups] == ["a0", "m0", "a1", "m1", "resid_post"]
    assert Graph.build(1, 2).groups[0].readers == ("a0.h0.q", "a0.h1.q", "a0.h0.k", "a0.h1.k", "a0.h0.v", "a0.h1.v")
    edges = g.edges()
    assert str(edges[0]) == "embeds->a0.h0.q"
    assert Edge.parse("a0.h3->a1.h1.q") == Edge("a0.h3", "a1.h1.q") == Edge.parse(["a0.h3", "a1.h1.q"])
    # flat position of an edge = group offset + row * n_upstream + column
    for i in (0, 17, len(edges) - 1):
        gi, row, col = g.edge_index(edges[i])
        assert g.groups[gi].offset + row * g.groups[gi].n_upstream + col == i
    # heads feed their own layer's MLP but not their own layer's q/k/v; split embeds need absolute positions
    assert g.edge_index("a1.h2->m1") and g.edge_index("m0->a1.h0.q")
    kinds = {n.kind for n in g.nodes()}
    assert {"embeds", "head", "mlp", "q", "k", "v", "resid_post"} <= kinds


@pytest.mark.parametrize("edge,match", [
    ("a1.h0->a1.h1.q", "not upstream"),
    ("a0.h9->a1.h1.q", "unknown writer 'a0.h9'.*a0.h"),
    ("a0.h1->a1.h1.k", "unknown reader 'a1.h1.k'.*a1.g0.k"),  # per-head k name in a GQA graph
    ("m1->m1", "not upstream"),
    ("embeds>a0.h0.q", "expected 'writer->reader'"),
])
def test_unknown_edges_are_named(edge, match):
    with pytest.raises(ValueError, match=match):
        Graph.build(2, 4, 2).edge_index(edge)


def test_bad_graph_config():
    with pytest.raises(ValueError, match="n_kv_heads"):
        Graph.build(2, 4, 3)
    with pytest.raises(ValueError, match="n_heads"):
        Graph.build(2, [4, 4, 4])
    with pytest.raises(ValueError, match="split_embeds"):
        graph_config_from_hf(LlamaConfig(num_hidden_layers=1), split_embeds=True)
