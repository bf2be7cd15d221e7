"""`prune --init-from`: scores carried onto our graph (grouped k/v: the heads' sum; split
embeddings: input's score on both), the rank mapping (the target's top edges start kept,
the others below the threshold), and the CLI end to end."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from edgeprune_fast import cli
from edgeprune_fast.formats import mib_graph, to_eap_ig
from edgeprune_fast.graph import Graph
from edgeprune_fast.masks import EdgeMasks
from edgeprune_fast.ops import hard_concrete
from edgeprune_fast.ranking import top_k
from edgeprune_fast.warm_start import read_scores, warm_log_alpha, warm_start
from tests.tasks._task_tokenizer import save_tiny_model

IOI = Path(__file__).parent / "data" / "mib" / "ioi.jsonl"


def write_scores(path, graph, scores):
    path.write_text(json.dumps(to_eap_ig(graph, [], dict(zip(graph.edges(), scores.tolist())), d_model=32)))
    return path


def test_rank_mapping_keeps_the_top_edges_and_the_order():
    scores = torch.randn(200, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    la = warm_log_alpha(scores, 30)
    keep = top_k(scores.abs(), 30)
    assert bool((la[keep] >= 3).all()) and bool((la[~keep] <= -3).all()) and float(la.max()) == 10.0
    assert float(la.min()) == -6.0
    order = torch.argsort(scores.abs(), descending=True)
    assert bool((la[order][1:] < la[order][:-1]).all())  # strictly decreasing along the ranking
    z = hard_concrete(la, training=False)  # the deterministic masks: exactly the top 30
    assert torch.equal(z > 0, keep) and bool((z[keep] == 1).all())
    with pytest.raises(ValueError, match="n_keep"):
        warm_log_alpha(scores, 201)


def test_warm_start_sets_every_group():
    g = Graph.build(2, 2)
    masks = EdgeMasks(g)
    scores = torch.randn(g.n_edges, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    n = warm_start(masks, scores, 0.9)
    assert n == round(0.1 * g.n_edges)
    torch.testing.assert_close(masks.edge_scores(), warm_log_alpha(scores, n))


def test_read_scores_sums_grouped_heads_and_copies_input(tmp_path):
    grouped = Graph.build(2, 4, 2)
    per_head = mib_graph(grouped)
    s = torch.randn(per_head.n_edges, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = read_scores(write_scores(tmp_path / "s.json", per_head, s), grouped)
    theirs = dict(zip([str(e) for e in per_head.edges()], s.tolist()))
    ours = dict(zip([str(e) for e in grouped.edges()], got.tolist()))
    assert ours["m0->a1.g1.k"] == pytest.approx(theirs["m0->a1.h2.k"] + theirs["m0->a1.h3.k"], abs=1e-12)
    assert ours["a0.h1->a1.h3.q"] == pytest.approx(theirs["a0.h1->a1.h3.q"], abs=1e-12)
    split = Graph.build(2, 2, split_embeds=True)
    one = Graph.build(2, 2)
    s1 = torch.randn(one.n_edges, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = dict(zip([str(e) for e in split.edges()], read_scores(write_scores(tmp_path / "e.json", one, s1), split)))
    src = dict(zip([str(e) for e in one.edges()], s1.tolist()))
    assert float(got["tok_embeds->m1"]) == float(got["pos_embeds->m1"]) == pytest.approx(src["embeds->m1"])


def test_read_scores_bad_files(tmp_path):
    g = Graph.build(2, 2)
    with pytest.raises(ValueError, match="does not exist"):
        read_scores(tmp_path / "nope.json", g)
    (tmp_path / "x.json").write_text("{")
    with pytest.raises(ValueError, match="not a JSON file"):
        read_scores(tmp_path / "x.json", g)
    other = write_scores(tmp_path / "o.json", Graph.build(3, 2), torch.zeros(Graph.build(3, 2).n_edges))
    with pytest.raises(ValueError, match="n_layers=3"):
        read_scores(other, g)
    d = to_eap_ig(g, [], {e: 1.0 for e in g.edges()}, d_model=32)
    del d["edges"]["m0->logits"]
    (tmp_path / "m.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="no score for 1 edges"):
        read_scores(tmp_path / "m.json", g)


@pytest.fixture(scope="module")
def model_and_scores(tmp_path_factory):
    root = tmp_path_factory.mktemp("warm")
    model = save_tiny_model(root / "model")
    scores = root / "scores.json"
    assert cli.main(["attribute", "--model", str(model), "--data", str(IOI), "--method", "eap", "--quiet",
                     "--out", str(scores)]) == 0
    return root, model, scores


def test_prune_init_from_starts_at_the_warm_masks(model_and_scores, capsys):
    root, model, scores = model_and_scores
    out = root / "run"
    code = cli.main(["prune", "--model", str(model), "--data", str(IOI), "--init-from", str(scores), "--sparsity",
                     "0.8", "--steps", "1", "--lr", "1e-6", "--no-node-masks", "--batch-size", "2", "--quiet",
                     "--picture", "none", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "edge masks start from" in err
    g = Graph.build(2, 2)
    expected = warm_log_alpha(read_scores(scores, g), round(0.2 * g.n_edges))
    saved = load_file(str(out / "masks.safetensors"))
    got = torch.cat([saved[f"edges.{grp.key}"].flatten() for grp in g.groups])
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=0)
    circuit = json.loads((out / "circuit.json").read_text())
    keep = top_k(read_scores(scores, g).abs(), round(0.2 * g.n_edges))
    assert sorted(map(tuple, circuit["edges"])) == sorted((e.writer, e.reader)
                                                         for e, k in zip(g.edges(), keep.tolist()) if k)
    assert json.loads((out / "circuit.json").read_text())["config"]["run"]["init_from"] == str(scores)


def test_prune_init_from_bad_file_exits_2_writing_nothing(model_and_scores, tmp_path, capsys):
    _, model, _ = model_and_scores
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"cfg": {"n_layers": 5, "n_heads": 2, "d_model": 32}, "nodes": {}, "edges": {}}))
    out = tmp_path / "run"
    code = cli.main(["prune", "--model", str(model), "--data", str(IOI), "--init-from", str(bad), "--steps", "1",
                     "--quiet", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "--init-from:" in err and "n_layers=5" in err and "Traceback" not in err
    assert not out.exists()
