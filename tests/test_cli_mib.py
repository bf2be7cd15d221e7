"""`edgeprune mib evaluate` / `mib export` and `eval` of MIB score files, end to end on tiny
models saved with save_pretrained: one prune run on a MIB data file gives the circuits at
every MIB budget; its export reads back into the same curve; bad input exits 2."""

import json
from pathlib import Path

import pytest
import torch

from edgeprune_fast import cli
from edgeprune_fast.formats import mib_graph, parse_eap_ig, save_eap_ig
from edgeprune_fast.graph import Graph
from edgeprune_fast.mib.budgets import SUBMISSION_PERCENTS, n_at_most
from edgeprune_fast.mib.evaluate import curve_percents, masks_graph, order_from_masks
from tests.tasks._task_tokenizer import build_tokenizer, save_tiny_model
from tests.test_cli import run

DATA = Path(__file__).parent / "data" / "mib"
GPT2_EDGES = Graph.build(2, 2).n_edges  # save_tiny_model: 2 layers, 2 heads


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("mib")
    model = save_tiny_model(root / "model")
    g = Graph.build(2, 2)
    scores = {e: float(torch.randn(1, generator=torch.Generator().manual_seed(i))) for i, e in enumerate(g.edges())}
    save_eap_ig(root / "scores.json", g, [], scores, d_model=32)
    return {"root": root, "model": model, "scores": root / "scores.json"}


@pytest.fixture(scope="module")
def pruned(files):
    out = files["root"] / "run"
    code = cli.main(["prune", "--model", str(files["model"]), "--data", str(DATA / "ioi.jsonl"), "--sparsity", "0.5",
                     "--steps", "3", "--batch-size", "2", "--quiet", "--picture", "none", "--out", str(out)])
    assert code == 0
    return out


def test_eval_of_a_scores_only_file(files, capsys):
    base = ["eval", files["scores"], "--model", files["model"], "--data", DATA / "ioi.jsonl"]
    code, out, err = run(base, capsys)
    assert code == 2 and "scores only" in err and "--top-n N or --top-percent P" in err and not out
    code, out, err = run([*base, "--top-n", "10"], capsys)
    assert code == 0, err
    assert "edges:" in out
    code, _, err = run([*base, "--top-percent", "101"], capsys)
    assert code == 2 and "--top-percent" in err


def test_mib_evaluate_a_score_file(files, capsys):
    report = files["root"] / "report.json"
    code, out, err = run(["mib", "evaluate", files["scores"], "--model", files["model"], "--data",
                          DATA / "ioi.jsonl", "--batch-size", "2", "--out", report], capsys)
    assert code == 0, err
    r = json.loads(report.read_text())
    assert report.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert r["n_edges_total"] == GPT2_EDGES and r["task"] == "ioi" and r["n_examples"] == 5
    assert [p["percent"] for p in r["points"]] == curve_percents()
    for p in r["points"]:
        assert set(p) >= {"percent", "n_edges", "faithfulness"}
        assert p["n_edges"] == int(p["percent"] / 100 * GPT2_EDGES + 1e-9) and p["n_edges_kept"] <= p["n_edges"]
    assert set(r["curves"]) == {"signed", "abs"}  # the file has negative scores: MIB's two rankings
    assert r["cpr"] == r["curves"]["signed"]["cpr"] and r["cmd"] == r["curves"]["abs"]["cmd"]
    assert "CPR" in out


def test_one_prune_run_gives_every_mib_budget(pruned, files, capsys):
    c = json.loads((pruned / "circuit.json").read_text())
    assert c["config"]["task"] == str(DATA / "ioi.jsonl")
    sub = files["root"] / "submission"
    # the task is found from the run's data (a MIB file); this tiny model needs its MIB name
    code, out, err = run(["mib", "export", pruned, "--out", sub, "--layout", "both", "--model-name", "gpt2"], capsys)
    assert code == 0, err
    folder = sub / "ioi_gpt2"
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(["importances.json"] + [f"circuit_{p:g}.json" for p in SUBMISSION_PERCENTS])
    imp = parse_eap_ig(json.loads((folder / "importances.json").read_text()))
    assert imp.scores_only and len(imp.names) == GPT2_EDGES
    assert json.loads((folder / "importances.json").read_text())["cfg"]["d_model"] == 32
    graph = mib_graph(masks_graph(pruned / "masks.safetensors"))
    order, _ = order_from_masks(pruned / "masks.safetensors", graph)
    from edgeprune_fast.formats import edge_to_eap

    edges = graph.edges()
    for n in (1, 7, GPT2_EDGES // 3):  # MIB's top n by |score| is the run's first n edges
        ours = {edge_to_eap(graph, edges[i])[0] for i in order[:n].tolist()}
        assert {nm for nm, k in zip(imp.names, imp.top_n(n)) if k} == ours
    for p in SUBMISSION_PERCENTS:
        f = parse_eap_ig(json.loads((folder / f"circuit_{p:g}.json").read_text()))
        assert sum(f.in_graph) <= n_at_most(p / 100, GPT2_EDGES)
    # the run folder and its exported importances give the same curve
    reports = []
    for source in (pruned, folder / "importances.json"):
        report = files["root"] / f"r_{len(reports)}.json"
        code, _, err = run(["mib", "evaluate", source, "--model", files["model"], "--data", DATA / "ioi.jsonl",
                            "--batch-size", "5", "--out", report], capsys)
        assert code == 0, err
        reports.append(json.loads(report.read_text()))
    for a, b in zip(reports[0]["points"], reports[1]["points"]):
        assert a["n_edges_kept"] == b["n_edges_kept"]
        assert a["faithfulness"] == pytest.approx(b["faithfulness"], abs=1e-6)
    # exporting again into the same folder: refused, nothing changed
    before = (folder / "importances.json").read_bytes()
    code, _, err = run(["mib", "export", pruned, "--out", sub, "--model-name", "gpt2"], capsys)
    assert code == 2 and "ioi_gpt2" in err and (folder / "importances.json").read_bytes() == before


def test_gqa_model_evaluates_on_mibs_graph(tmp_path, capsys):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = build_tokenizer()
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                                 intermediate_size=48, max_position_embeddings=64, vocab_size=len(tok),
                                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)).eval().save_pretrained(tmp_path / "qwen")
    tok.save_pretrained(tmp_path / "qwen")
    g = Graph.build(2, 4, 2, kv_per_query_head=True)
    save_eap_ig(tmp_path / "s.json", g, [], {e: float(i) for i, e in enumerate(g.edges())}, d_model=32)
    code, _, err = run(["mib", "evaluate", tmp_path / "s.json", "--model", tmp_path / "qwen", "--data",
                        DATA / "mcqa.jsonl", "--ablation", "zero", "--out", tmp_path / "r.json"], capsys)
    assert code == 0, err
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["n_edges_total"] == g.n_edges > Graph.build(2, 4, 2).n_edges and r["task"] == "mcqa"
    # the same file into our grouped graph: refused where the heads of a KV group disagree
    code, _, err = run(["eval", tmp_path / "s.json", "--model", tmp_path / "qwen", "--data", DATA / "mcqa.jsonl",
                        "--top-n", "40"], capsys)
    assert code == 2 and "KV group" in err and "gqa='union'" in err
    code, _, err = run(["eval", tmp_path / "s.json", "--model", tmp_path / "qwen", "--data", DATA / "mcqa.jsonl",
                        "--top-n", "40", "--kv-per-query-head"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("extra,message", [
    (["--ablation", "mean"], "--ablation mean: not under --conventions mib"),
    (["--split-embeds"], "--split-embeds: MIB's graph has one input node"),
    (None, "--mib-task: applies to MIB data files"),
])
def test_mib_evaluate_bad_input(files, tmp_path, capsys, extra, message):
    if extra is None:  # --mib-task on data that is not MIB's
        jsonl = tmp_path / "ours.jsonl"
        jsonl.write_text(json.dumps({"clean": "When Mary and John went out, John thanked<predict> Mary</predict>",
                                     "corrupted": "When Lisa and Paul went out, Kate thanked Mary"}) + "\n")
        argv = ["mib", "evaluate", files["scores"], "--model", files["model"], "--data", jsonl, "--mib-task", "ioi",
                "--out", tmp_path / "r.json"]
    else:
        argv = ["mib", "evaluate", files["scores"], "--model", files["model"], "--data", DATA / "ioi.jsonl", *extra,
                "--out", tmp_path / "r.json"]
    code, out, err = run(argv, capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "r.png").exists()


def test_mib_export_bad_input(files, tmp_path, capsys):
    code, _, err = run(["mib", "export", tmp_path, "--out", tmp_path / "sub"], capsys)
    assert code == 2 and "masks.safetensors" in err
    code, _, err = run(["mib", "evaluate", tmp_path, "--model", files["model"], "--data", DATA / "ioi.jsonl",
                        "--out", tmp_path / "r.json"], capsys)
    assert code == 2 and "masks.safetensors" in err
