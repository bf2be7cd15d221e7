"""`edgeprune attribute` end to end on a tiny GPT-2 and Qwen2 saved with save_pretrained: the
scores file is EAP-IG's current format with every edge scored, `eval --top-n` and
`mib evaluate` read it, `prune --init-from` starts from it; bad input exits 2 with one
message and writes nothing."""

import json
from pathlib import Path

import pytest
import torch

from edgeprune_fast import cli
from edgeprune_fast.formats import parse_eap_ig
from edgeprune_fast.graph import Graph
from tests.tasks._task_tokenizer import build_tokenizer, save_tiny_model
from tests.test_cli import run

DATA = Path(__file__).parent / "data" / "mib"
IOI = DATA / "ioi.jsonl"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("attr")
    model = save_tiny_model(root / "model")
    scores = root / "scores.json"
    code = cli.main(["attribute", "--model", str(model), "--data", str(IOI), "--method", "eap-ig", "--ig-steps", "2",
                     "--batch-size", "4", "--quiet", "--out", str(scores)])
    assert code == 0
    return {"root": root, "model": model, "scores": scores}


def test_scores_file_is_eap_ig_current_format(files):
    d = json.loads(files["scores"].read_text())
    g = Graph.build(2, 2)
    assert d["cfg"] == {"n_layers": 2, "n_heads": 2, "parallel_attn_mlp": False, "d_model": 32}
    assert all(isinstance(v, dict) and set(v) == {"in_graph"} for v in d["nodes"].values())
    assert len(d["edges"]) == g.n_edges and not any(e["in_graph"] for e in d["edges"].values())
    assert d["attribution"]["method"] == "eap-ig" and d["attribution"]["metric"] == "logit-diff"  # MIB IOI: contrast
    f = parse_eap_ig(d)
    assert f.scores_only and len({s for s in f.scores}) > 10  # really scored, not constant


def test_eval_top_n_and_mib_evaluate_accept_it(files, capsys):
    code, out, err = run(["eval", files["scores"], "--model", files["model"], "--data", IOI, "--top-n", "20"], capsys)
    assert code == 0, err
    assert "edges:" in out and "faithfulness" in out
    report = files["root"] / "report.json"
    code, out, err = run(["mib", "evaluate", files["scores"], "--model", files["model"], "--data", IOI,
                          "--batch-size", "2", "--out", report], capsys)
    assert code == 0, err
    assert json.loads(report.read_text())["points"]


def test_top_n_marks_the_largest_scores(files, capsys):
    out = files["root"] / "top.json"
    code, _, err = run(["attribute", "--model", files["model"], "--data", IOI, "--method", "eap", "--top-n", "7",
                        "--quiet", "--out", out], capsys)
    assert code == 0, err
    edges = json.loads(out.read_text())["edges"]
    kept = {k for k, v in edges.items() if v["in_graph"]}
    best = sorted(edges, key=lambda k: -abs(edges[k]["score"]))[:7]
    assert kept == set(best)
    signed = files["root"] / "signed.json"
    code, _, err = run(["attribute", "--model", files["model"], "--data", IOI, "--method", "eap", "--top-n", "7",
                        "--signed", "--quiet", "--out", signed], capsys)
    assert code == 0, err
    edges = json.loads(signed.read_text())["edges"]
    assert {k for k, v in edges.items() if v["in_graph"]} == set(sorted(edges, key=lambda k: -edges[k]["score"])[:7])


def test_gqa_model_is_scored_on_eap_igs_graph(tmp_path, capsys):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = build_tokenizer()
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                                 intermediate_size=48, vocab_size=len(tok), max_position_embeddings=64,
                                 pad_token_id=tok.pad_token_id)).eval().save_pretrained(tmp_path / "qwen")
    tok.save_pretrained(tmp_path / "qwen")
    out = tmp_path / "q.json"
    code, _, err = run(["attribute", "--model", tmp_path / "qwen", "--data", IOI, "--method", "eap", "--quiet",
                        "--out", out], capsys)
    assert code == 0, err
    edges = json.loads(out.read_text())["edges"]
    assert len(edges) == Graph.build(2, 4, 2, kv_per_query_head=True).n_edges
    assert edges["input->a1.h0<k>"]["score"] != edges["input->a1.h1<k>"]["score"]  # one score per query head


@pytest.mark.parametrize("extra,message", [
    (["--method", "eap", "--metric", "kl"], "--metric: 'kl' with method 'eap' is meaningless"),
    (["--ablation", "zero"], "--ablation: attribution patches from the corrupted input"),
    (["--split-embeds"], "--split-embeds: EAP-IG's graph has one input node"),
    (["--signed"], "--signed: orders the edges --top-n marks"),
    (["--top-n", "100000"], "--top-n: expected at most the graph's"),
    (["--ig-steps", "0"], "--ig-steps: expected an integer >= 1"),
    (["--corrupted-on-cpu"], "--corrupted-on-cpu: attribution's forward reads no corrupted states"),
    (["--post-norm", "reader"], "--post-norm: attribution scores the writer graph"),
])
def test_bad_input_exits_2_and_writes_nothing(files, tmp_path, capsys, extra, message):
    out = tmp_path / "bad.json"
    code, stdout, err = run(["attribute", "--model", files["model"], "--data", IOI, "--quiet", "--out", out, *extra],
                            capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_logit_diff_refused_without_contrast(files, tmp_path, capsys):
    data = tmp_path / "plain.jsonl"
    rows = [("When Mary and John went to the store, John gave a drink to<predict> Mary</predict>",
             "When Lisa and Paul went to the store, Paul gave a drink to<predict> Lisa</predict>"),
            ("When Anna and Mark went to the park, Mark gave a ball to<predict> Anna</predict>",
             "When Mary and John went to the park, John gave a ball to<predict> Mary</predict>")]
    data.write_text("\n".join(json.dumps({"clean": c, "corrupted": x}) for c, x in rows))
    out = tmp_path / "s.json"
    code, _, err = run(["attribute", "--model", files["model"], "--data", data, "--metric", "logit-diff", "--quiet",
                        "--out", out], capsys)
    assert code == 2 and "--metric: 'logit-diff' needs a task with a contrasting answer" in err and not out.exists()
    code, _, err = run(["attribute", "--model", files["model"], "--data", data, "--method", "eap", "--quiet",
                        "--out", out], capsys)
    assert code == 0, err
    assert json.loads(out.read_text())["attribution"]["metric"] == "log-prob"


@pytest.mark.parametrize("options", [[], ["--shard-weights", "--checkpoint-layers"]], ids=["replicated", "sharded"])
def test_two_processes_give_one_process_scores(files, tmp_path, options):
    """Under torchrun (2 CPU processes, gloo) each process attributes its rows of every batch,
    with the weights replicated or FSDP2-sharded; rank 0 writes one process's scores."""
    import os
    import subprocess
    import sys

    common = ["attribute", "--model", str(files["model"]), "--data", str(IOI), "--method", "eap-ig", "--ig-steps",
              "2", "--batch-size", "5", "--quiet"]  # the 5 training rows: 3 and 2 per process
    single = tmp_path / "single.json"
    assert cli.main([*common, "--out", str(single)]) == 0
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                            "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    out = tmp_path / "two.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "edgeprune_fast.cli", *common, *options, "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(f"wrote {out}") == 1 and "2 processes" in proc.stdout
    a, b = (json.loads(p.read_text()) for p in (single, out))
    assert a["edges"].keys() == b["edges"].keys() and b["attribution"]["processes"] == 2
    for k, v in a["edges"].items():
        assert b["edges"][k]["score"] == pytest.approx(v["score"], abs=1e-6)


def test_short_last_batch_under_torchrun_is_refused(files, tmp_path, capsys, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "s.json"
    code, _, err = run(["attribute", "--model", files["model"], "--data", IOI, "--batch-size", "2", "--quiet",
                        "--out", out], capsys)
    assert code == 2 and "--batch-size: every batch is split over the 2 processes" in err and not out.exists()
