"""``--post-norm writer|reader`` end to end on a tiny Gemma-2 saved with save_pretrained: prune
stores it in circuit.json's config, eval takes it (an override says so), `mib evaluate` under
MIB's conventions uses "reader" for post-norm models and says so; bad values and models
without post-norms exit 2 with nothing written."""

import json
from pathlib import Path

import pytest
import torch

from edgeprune_fast import cli
from edgeprune_fast.formats import save_eap_ig
from edgeprune_fast.graph import Graph
from tests.tasks._task_tokenizer import build_tokenizer, save_tiny_model
from tests.test_cli import run

DATA = Path(__file__).parent / "data" / "mib"


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    root = tmp_path_factory.mktemp("post_norm")
    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = Gemma2Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                       head_dim=8, intermediate_size=48, max_position_embeddings=64, vocab_size=len(tok),
                       sliding_window=4, query_pre_attn_scalar=8, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg._attn_implementation = "eager"
    model = Gemma2ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)  # gains 1 + w away from 1, so that the modes differ visibly
    model.eval().save_pretrained(root / "gemma2")
    tok.save_pretrained(root / "gemma2")
    return root


@pytest.fixture(scope="module")
def pruned(gemma2):
    out = gemma2 / "run"
    code = cli.main(["prune", "--model", str(gemma2 / "gemma2"), "--data", str(DATA / "ioi.jsonl"), "--sparsity",
                     "0.5", "--steps", "3", "--batch-size", "2", "--quiet", "--picture", "none", "--post-norm",
                     "reader", "--out", str(out)])
    assert code == 0
    return out


def test_prune_stores_the_mode_and_eval_takes_it(pruned, gemma2, capsys):
    c = json.loads((pruned / "circuit.json").read_text())
    assert c["config"]["post_norm"] == "reader" and c["config"]["run"]["post_norm"] == "reader"
    base = ["eval", pruned / "circuit.json", "--model", gemma2 / "gemma2", "--data", DATA / "ioi.jsonl",
            "--batch-size", "2", "--out"]
    code, out, err = run([*base, gemma2 / "as_stored.json"], capsys)
    assert code == 0, err
    assert "post-norm reader" in out and "overrides" not in err
    stored = json.loads((gemma2 / "as_stored.json").read_text())["metrics"]
    assert stored["post_norm"] == "reader"
    assert stored["kl"] == pytest.approx(c["metrics"]["kl"], rel=1e-5, abs=1e-7)  # prune's own evaluation
    code, out, err = run([*base, gemma2 / "writer.json", "--post-norm", "writer"], capsys)
    assert code == 0, err
    assert "note: --post-norm writer overrides the circuit file's reader" in err and "post-norm writer" in out
    other = json.loads((gemma2 / "writer.json").read_text())["metrics"]
    assert abs(other["kl"] - stored["kl"]) > 1e-6  # the same circuit means something else in the other mode


def test_circuit_command_keeps_the_runs_mode(pruned, gemma2, capsys):
    code, _, err = run(["circuit", pruned, "--sparsity", "0.9", "--picture", "none", "--out", gemma2 / "more"], capsys)
    assert code == 0, err
    c = json.loads((gemma2 / "more" / "sparsity_0.9000" / "circuit.json").read_text())
    assert c["config"]["post_norm"] == "reader"


def test_mib_evaluate_uses_reader_for_post_norm_models_under_mib_conventions(gemma2, capsys):
    g = Graph.build(2, 4, 2, kv_per_query_head=True)
    scores = {e: float(torch.randn(1, generator=torch.Generator().manual_seed(i))) for i, e in enumerate(g.edges())}
    save_eap_ig(gemma2 / "scores.json", g, [], scores, d_model=32)
    base = ["mib", "evaluate", gemma2 / "scores.json", "--model", gemma2 / "gemma2", "--data", DATA / "ioi.jsonl",
            "--batch-size", "2", "--rank", "abs", "--out"]
    reports = {}
    for name, extra in (("mib", []), ("edgeprune", ["--conventions", "edgeprune"]), ("forced", ["--post-norm", "writer"])):
        code, _, err = run([*base, gemma2 / f"{name}.json", *extra], capsys)
        assert code == 0, err
        reports[name] = json.loads((gemma2 / f"{name}.json").read_text())
        if name == "mib":
            assert "as MIB's evaluation (--post-norm reader)" in err
        if name == "edgeprune":
            assert "(--post-norm writer)" in err
    assert reports["mib"]["post_norm"] == "reader"
    assert reports["edgeprune"]["post_norm"] == reports["forced"]["post_norm"] == "writer"
    f = [[p["faithfulness"] for p in reports[k]["points"]] for k in ("mib", "forced")]
    assert max(abs(a - b) for a, b in zip(*f)) > 1e-4


@pytest.mark.parametrize("command", ["prune", "eval", "mib"])
def test_reader_on_a_model_without_post_norms_exits_2(command, tmp_path, capsys):
    model = save_tiny_model(tmp_path / "gpt2")
    if command == "prune":
        argv = ["prune", "--model", model, "--data", DATA / "ioi.jsonl", "--steps", "2", "--batch-size", "2",
                "--quiet", "--post-norm", "reader", "--out", tmp_path / "out"]
    else:
        g = Graph.build(2, 2)
        save_eap_ig(tmp_path / "s.json", g, [], {e: float(i) for i, e in enumerate(g.edges())}, d_model=32)
        argv = (["eval", tmp_path / "s.json", "--top-n", "5"] if command == "eval" else
                ["mib", "evaluate", tmp_path / "s.json", "--out", tmp_path / "r.json"])
        argv += ["--model", model, "--data", DATA / "ioi.jsonl", "--post-norm", "reader"]
    code, out, err = run(argv, capsys)
    assert code == 2
    assert "--post-norm: reader applies to models whose attention output is normed before the residual" in err
    assert "GPT2LMHeadModel has no post-attention norm" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "r.json").exists()


def test_bad_value_exits_2(gemma2, tmp_path, capsys):
    code, out, err = run(["prune", "--model", gemma2 / "gemma2", "--data", DATA / "ioi.jsonl", "--post-norm", "mib",
                          "--out", tmp_path / "out"], capsys)
    assert code == 2 and "argument --post-norm: invalid choice: 'mib' (choose from 'writer', 'reader')" in err
    assert not (tmp_path / "out").exists()
