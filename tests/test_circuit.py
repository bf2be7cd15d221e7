"""Discretisation hits the target edge count exactly (ties, node masks); Circuit files round-trip;
evaluation on a tiny GPT-2 agrees with direct forwards."""

import json

import pytest
import torch

from edgeprune_fast.circuit import Circuit, circuit_set, discretise, evaluate, faithfulness, kept_count
from edgeprune_fast.graph import Edge, Graph
from edgeprune_fast.masks import EdgeMasks
from edgeprune_fast.model import EdgePrunedModel
from edgeprune_fast.tasks.base import TaskBatch, kl_loss

VOCAB = 61


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=3, n_embd=24, n_positions=16, vocab_size=VOCAB, initializer_range=0.2)
    return GPT2LMHeadModel(cfg).eval()


def brute_force(scores, n_keep):
    """Reference: sort by (score desc, index asc), take the first n_keep."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    keep = torch.zeros(len(scores), dtype=torch.bool)
    keep[order[:n_keep]] = True
    return keep


@pytest.mark.parametrize("seed", range(5))
def test_discretise_exact_count_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    E = 200
    scores = torch.randint(-3, 4, (E,), generator=g).float()  # many ties
    for k in (0, 1, 7, E // 2, E - 1, E):
        d = discretise(scores, k)
        assert d.n_kept == k
        assert torch.equal(d.keep, brute_force(scores, k))
        if 0 < k:
            assert bool((scores[d.keep] >= d.threshold).all())
            assert bool((scores[~d.keep] <= d.threshold).all())
            assert d.ties_kept + d.ties_dropped == int((scores == d.threshold).sum())


def test_discretise_all_equal_scores_keeps_graph_order():
    d = discretise(torch.zeros(10), 4)
    assert d.keep.nonzero().squeeze(1).tolist() == [0, 1, 2, 3]
    assert (d.ties_kept, d.ties_dropped) == (4, 6)


def test_discretise_errors():
    with pytest.raises(ValueError, match="n_keep"):
        discretise(torch.zeros(5), 6)
    with pytest.raises(ValueError, match="finite"):
        discretise(torch.tensor([0.0, float("nan")]), 1)
    with pytest.raises(ValueError, match=r"sparsity: expected a number in \[0, 2\)"):
        kept_count(2.0, 10)
    with pytest.raises(ValueError, match="sparsity"):
        kept_count(-0.1, 10)


def test_kept_count():
    assert kept_count(0.0, 101) == 101
    assert kept_count(0.98, 32491) == round(0.02 * 32491)
    assert kept_count(1.5, 10) == 0  # targets above 1 keep nothing


@pytest.mark.parametrize("split", [False, True])
def test_from_masks_exact_sparsity(split):
    """Exactly the target's count, cut from the ranking by min(edge, writer node) log_alpha,
    even where the node masks alone would leave fewer edges (every node below 0 here)."""
    graph = Graph.build(3, 4, 2, split_embeds=split)
    masks = EdgeMasks(graph, node_masks=True)
    with torch.no_grad():
        for p in masks.edge_log_alpha:
            p.copy_(torch.randint(-2, 3, p.shape).float())  # ties
    order = {e: i for i, e in enumerate(graph.edges())}
    for nodes in (torch.linspace(-1, 5, graph.n_writers), torch.linspace(-6, -1, graph.n_writers)):
        with torch.no_grad():
            masks.node_log_alpha.copy_(nodes)
        eff = torch.minimum(masks.edge_scores(), nodes[masks.writer_index()])
        for s in (0.5, 0.9, 0.97):
            c = Circuit.from_masks(masks, s)
            k = round((1 - s) * graph.n_edges)
            assert c.n_edges == k and c.sparsity == pytest.approx(1 - k / graph.n_edges, abs=0)
            idx = [order[Edge(*e)] for e in c.edges]
            assert idx == sorted(idx)
            assert torch.equal(torch.tensor([i in set(idx) for i in range(graph.n_edges)]), brute_force(eff, k))
            d = c.config["discretisation"]
            assert d["rule"] == "exact count" and d["n_keep"] == k and d["score"].startswith("min(edge")


def test_targets_of_one_or_more_take_the_nonzero_masks():
    graph = Graph.build(2, 2)
    masks = EdgeMasks(graph, node_masks=True)
    with torch.no_grad():
        for p in masks.edge_log_alpha:
            p.copy_(torch.randn(p.shape) * 4)
    c = Circuit.from_masks(masks, 1.02)
    assert c.config["discretisation"]["rule"] == "non-zero masks (target >= 1)"
    assert c.edges == Circuit.from_masks(masks, None).edges and 0 < c.n_edges < graph.n_edges


def test_circuit_json_round_trip(tmp_path):
    graph = Graph.build(2, 3)
    edges = [["embeds", "a0.h1.q"], "a0.h1->m0", Edge("m0", "resid_post"), ("a0.h1", "a1.h2.v")]
    c = Circuit.from_edges(graph, edges, metrics={"kl": 0.25}, config={"steps": 3})
    p = c.save(tmp_path / "c.json")
    d = json.loads(p.read_text())
    assert d["edges"][0] == ["embeds", "a0.h1.q"] and d["n_edges"] == 4
    back = Circuit.load(p)
    assert back == c
    assert set(back.nodes) == {"embeds", "a0.h1", "m0", "a0.h1.q", "a1.h2.v", "resid_post"}
    with pytest.raises(ValueError, match="does not exist"):
        Circuit.from_edges(graph, ["a1.h0->a0.h1.q"])
    bad = dict(d, edges=[["embeds", "nowhere"]])
    with pytest.raises(ValueError, match="nowhere"):
        Circuit.from_dict(bad)
    with pytest.raises(ValueError, match="format"):
        Circuit.from_dict({"edges": []})


def test_faithfulness():
    assert faithfulness(0.75, 1.0, 0.0) == 0.75
    assert faithfulness(2.0, 3.0, 1.0) == 0.5
    assert faithfulness(1.0, 1.0, 1.0) != faithfulness(1.0, 1.0, 1.0)  # NaN


def _batch(B=3, S=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, S), generator=g)
    cor = torch.randint(3, VOCAB, (B, S), generator=g)
    tm = torch.zeros(B, S, dtype=torch.bool)
    tm[:, -1] = True
    return TaskBatch(ids, cor, None, tm, labels=ids[:, -1])


def _accuracy(logits, batch):
    return (logits[batch.target_mask].argmax(-1) == batch.labels).float()


def test_evaluate_matches_direct_forwards():
    model = EdgePrunedModel.from_hf(tiny_gpt2())
    batches = [_batch(seed=1), _batch(B=2, seed=2)]
    edges = [e for i, e in enumerate(model.graph.edges()) if i % 3 == 0]
    m = evaluate(model, edges, batches, metric_fn=_accuracy,
                 metrics_fn=lambda logits, b: {"accuracy": _accuracy(logits, b), "zero": _accuracy(logits, b) * 0})
    kl, n, acc, acc_full = 0.0, 0, 0.0, 0.0
    for b in batches:
        full, _ = model.reference(b.input_ids)
        cw = model.reference(b.corrupted_input_ids)[1]
        with circuit_set(model, edges), torch.no_grad():
            logits = model(b.input_ids, corrupted_writers=cw, training=False).logits
        kl += float(kl_loss(logits, full, b)) * len(b)
        acc += float(_accuracy(logits, b).sum())
        acc_full += float(_accuracy(full, b).sum())
        n += len(b)
    assert m["n_examples"] == n == 5
    assert m["kl"] == pytest.approx(kl / n, rel=1e-5)
    assert m["metric_circuit"] == pytest.approx(acc / n)
    assert m["metric_full"] == pytest.approx(acc_full / n)
    assert m["measures"]["accuracy"]["circuit"] == m["metric_circuit"] and m["measures"]["zero"]["full"] == 0
    assert model.masks.circuit is None, "evaluate must restore the learned masks"
    full_m = evaluate(model, model.graph.edges(), batches, metric_fn=_accuracy)
    assert full_m["kl"] == pytest.approx(0.0, abs=1e-5)
    assert full_m["metric_circuit"] == full_m["metric_full"]


def test_from_masks_masks_rule():
    """sparsity=None keeps exactly the edges whose deterministic mask (and writer's) is non-zero."""
    from edgeprune_fast.ops import hard_concrete

    graph = Graph.build(2, 2)
    masks = EdgeMasks(graph, node_masks=True)
    with torch.no_grad():
        for p in masks.edge_log_alpha:
            p.copy_(torch.randn(p.shape) * 4)
        masks.node_log_alpha.copy_(torch.tensor([5.0, -5.0, 5.0, 5.0, 5.0, 5.0, 5.0]))
    c = Circuit.from_masks(masks, None)
    z_edge = hard_concrete(masks.edge_scores(), training=False) > 0
    z_node = (hard_concrete(masks.node_scores(), training=False) > 0)[masks.writer_index()]
    expected = [(e.writer, e.reader) for e, k in zip(graph.edges(), (z_edge & z_node).tolist()) if k]
    assert list(c.edges) == expected and 0 < len(expected) < graph.n_edges
    assert not any(w == "a0.h0" for w, _ in c.edges)
