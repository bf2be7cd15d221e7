"""edgeprune_fast.mib: MIB's budgets and metrics, its graph's edge count for its four models,
its task files (hand-written rows in its schema, tests/data/mib), and the evaluation of
every budget against one circuit at a time and against an independent slow forward."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from edgeprune_fast.circuit import evaluate, kept_count
from edgeprune_fast.formats import mib_graph
from edgeprune_fast.graph import Graph
from edgeprune_fast.mib.budgets import CURVE_FRACTIONS, SUBMISSION_PERCENTS, area_from_1, area_under, n_at_most
from edgeprune_fast.mib.evaluate import budgets, curve_percents, evaluate_budgets, mib_zero_writers, summarise
from edgeprune_fast.mib.tasks import canonical_task, is_mib_data, load_mib_task
from edgeprune_fast.model import EdgePrunedModel
from tests.tasks._task_tokenizer import build_tokenizer

DATA = Path(__file__).parent / "data" / "mib"
sys.path.insert(0, str(Path(__file__).parent / "models"))  # the slow reference forward
from _slow_reference import slow_forward  # noqa: E402


def eap_ig_edge_count(n_layers, n_heads, parallel=False):
    """len(Graph.from_model(cfg).edges) of EAP-IG, counted as its from_model adds them: every
    residual node feeds each head's q, k and v (one per *query* head: MIB ungroups GQA) and the
    MLP (which also reads its layer's heads unless parallel); everything feeds logits."""
    residual, count = 1, 0  # the input node
    for _ in range(n_layers):
        count += residual * n_heads * 3
        if parallel:
            count += residual
            residual += n_heads
        else:
            residual += n_heads
            count += residual
        residual += 1
    return count + residual


# (layers, heads, KV heads) from each model's config.json; MIB's edge count
MIB_MODELS = {"gpt2 (GPT-2 small)": (12, 12, 12, 32_491), "qwen2.5 (Qwen2.5-0.5B)": (24, 14, 2, 179_749),
              "gemma2 (Gemma-2-2B)": (26, 8, 4, 74_218), "llama3 (Llama-3.1-8B)": (32, 32, 8, 1_592_881)}


@pytest.mark.parametrize("name", list(MIB_MODELS))
def test_per_query_head_graph_has_mibs_edge_count(name):
    L, H, K, count = MIB_MODELS[name]
    assert eap_ig_edge_count(L, H) == count
    g = Graph.build(L, H, K, kv_per_query_head=True)
    assert g.n_edges == count == mib_graph(Graph.build(L, H, K)).n_edges
    if K != H:
        assert Graph.build(L, H, K).n_edges < count  # our grouped graph is smaller


def test_hf_configs_give_mibs_count():
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    from edgeprune_fast.models import graph_config_from_hf

    for cfg, count in ((GPT2Config(), 32_491),
                       (Qwen2Config(num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                    hidden_size=896), 179_749),
                       (LlamaConfig(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8), 1_592_881)):
        assert mib_graph(Graph(graph_config_from_hf(cfg))).n_edges == count


def test_at_most_budgets():
    n = 32_491  # GPT-2 small
    assert [n_at_most(f, n) for f in CURVE_FRACTIONS] == [32, 64, 162, 324, 649, 1624, 3249, 6498, 16245, 32491]
    over = []
    for p in SUBMISSION_PERCENTS:
        k = n_at_most(p / 100, n)
        assert k <= p / 100 * n < k + 1  # the floor: at most p %
        if kept_count(1 - p / 100, n) > p / 100 * n:
            over.append(p)
    assert over == [0.2, 1, 2, 5, 50]  # round((1 - s) n) overshoots at these
    for *_, count in MIB_MODELS.values():
        for f in CURVE_FRACTIONS:
            assert n_at_most(f, count) <= f * count
    with pytest.raises(ValueError, match="fraction"):
        n_at_most(1.5, 10)


def test_cpr_and_cmd_by_hand():
    xs = (0.0, 0.5, 1.0)
    fs = (0.0, 0.5, 1.5)
    # trapezoids: 0.5 * (0 + 0.5) / 2 + 0.5 * (0.5 + 1.5) / 2 = 0.125 + 0.5
    assert area_under(fs, xs) == pytest.approx(0.625)
    # |1 - f|: 1, 0.5, 0.5 -> 0.5 * 1.5 / 2 + 0.5 * 1.0 / 2 = 0.375 + 0.25
    assert area_from_1(fs, xs) == pytest.approx(0.625)
    # on MIB's own fractions a perfect circuit has CMD 0 and CPR = 1 - 0.001
    ones = [1.0] * len(CURVE_FRACTIONS)
    assert area_under(ones) == pytest.approx(0.999) and area_from_1(ones) == 0
    toy = [0.1 * i for i in range(len(CURVE_FRACTIONS))]
    want = sum((b - a) * (fa + fb) / 2 for a, b, fa, fb in zip(CURVE_FRACTIONS, CURVE_FRACTIONS[1:], toy, toy[1:]))
    points = [{"percent": 100 * f, "faithfulness": v} for f, v in zip(CURVE_FRACTIONS, toy)]
    assert summarise(points)["cpr"] == pytest.approx(want)
    with pytest.raises(ValueError, match="increasing"):
        area_under((0, 1), (1, 0))


# -- tasks ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.mark.parametrize("file,task,n,dropped", [("ioi", "ioi", 5, 1), ("mcqa", "mcqa", 3, 1),
                                                 ("arc_easy", "arc_easy", 3, 0),
                                                 ("arithmetic_addition", "arithmetic_addition", 4, 3)])
def test_task_files_load_in_mibs_schema(tok, file, task, n, dropped):
    path = DATA / f"{file}.jsonl"
    assert is_mib_data(path)
    t = load_mib_task(path, tok)
    assert t.name == task and len(t.examples("validation")) == n and t.dropped["validation"] == dropped
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    e, row = t.examples("validation")[0], rows[0]
    bos = tok.bos_token_id
    assert e.input_ids == (bos, *tok(row["prompt"], add_special_tokens=False)["input_ids"])  # BOS, as TL prepends
    assert e.target_positions == (len(e.input_ids) - 1,)
    if task == "ioi":
        label, wrong = " " + row["metadata"]["indirect_object"], " " + row["metadata"]["subject"]
        cf = row["s2_io_flip_counterfactual"]["prompt"]
    elif task == "arithmetic_addition":
        label, wrong, cf = str(row["label"]), str(row["random_counterfactual"]["label"]), \
            row["random_counterfactual"]["prompt"]
    else:
        c = row["symbol_counterfactual"]
        label, wrong, cf = row["choices"]["label"][row["answerKey"]], c["choices"]["label"][c["answerKey"]], c["prompt"]
    assert e.label == tok(label, add_special_tokens=False)["input_ids"][0]  # tokenised alone, as MIB does
    assert e.extras["wrong_id"] == tok(wrong, add_special_tokens=False)["input_ids"][0]
    assert e.corrupted_input_ids == (bos, *tok(cf, add_special_tokens=False)["input_ids"])
    ours = load_mib_task(path, tok, conventions="edgeprune").examples("validation")[0]
    assert ours.input_ids == e.input_ids[1:]  # our tokenizer adds no BOS of its own


def test_task_folder_layout_and_detection(tok, tmp_path):
    (tmp_path / "copycolors_mcqa" / "4_answer_choices").mkdir(parents=True)
    (tmp_path / "copycolors_mcqa" / "2_answer_choices").mkdir()
    for split in ("train", "validation"):
        (tmp_path / "copycolors_mcqa" / "4_answer_choices" / f"{split}-00000-of-00001.jsonl").write_text(
            (DATA / "mcqa.jsonl").read_text())
    (tmp_path / "copycolors_mcqa" / "2_answer_choices" / "validation.jsonl").write_text("{}\n")
    t = load_mib_task(tmp_path / "copycolors_mcqa", tok)  # MIB's config: 4_answer_choices
    assert t.name == "mcqa" and set(t.split_names) == {"train", "validation"}
    arc = tmp_path / "arc_challenge.jsonl"
    arc.write_text((DATA / "arc_easy.jsonl").read_text())
    assert load_mib_task(arc, tok).name == "arc_challenge"  # ARC is told apart by its name
    assert canonical_task("arc-easy") == "arc_easy" and canonical_task("copycolors_mcqa") == "mcqa"
    with pytest.raises(ValueError, match="expected a MIB task"):
        canonical_task("sst2")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "choices": {"label": ["A"]}, "answerKey": 0}) + "\n")
    with pytest.raises(ValueError, match="symbol_counterfactual"):
        load_mib_task(bad, tok)
    uneven = tmp_path / "uneven.jsonl"
    row = json.loads((DATA / "ioi.jsonl").read_text().splitlines()[0])
    row["s2_io_flip_counterfactual"]["prompt"] += " and then"
    uneven.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match="row 0: clean and corrupted prompts must tokenise to the same length"):
        load_mib_task(uneven, tok)


# -- evaluation -------------------------------------------------------------------------------------------
def _tiny(arch, tok):
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=64, **common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             hidden_size=32, intermediate_size=48, max_position_embeddings=64,
                                             **common))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_every_budget_in_one_pass_equals_one_circuit_at_a_time(arch, tok, one_thread):
    model = EdgePrunedModel.from_hf(_tiny(arch, tok), kv_per_query_head=True)
    task = load_mib_task(DATA / "ioi.jsonl", tok)
    batches = task.batches(2, "validation")
    order = torch.randperm(model.graph.n_edges, generator=torch.Generator().manual_seed(0))
    circuits = budgets(model.graph, order, curve_percents(), pruned=True)
    got = evaluate_budgets(model, circuits, batches, task.metric)
    assert [p["percent"] for p in got["points"]] == curve_percents()
    for b, point in zip(circuits, got["points"]):
        assert b.n_kept <= b.n_edges <= b.percent / 100 * model.graph.n_edges  # at most, after the prune
        edges = [e for e, k in zip(model.graph.edges(), b.keep.tolist()) if k]
        one = evaluate(model, edges, batches, metric_fn=task.metric)
        assert point["metric"] == pytest.approx(one["metric_circuit"], abs=1e-5)
        if math.isfinite(point["faithfulness"]):
            assert point["faithfulness"] == pytest.approx(one["faithfulness"], abs=1e-4)
    assert got["points"][0]["faithfulness"] == 0.0  # 0 %: the empty circuit
    assert got["points"][-1]["metric"] == pytest.approx(got["metric_full"], abs=1e-5)  # 100 %: every edge
    assert got["points"][-1]["n_edges_kept"] == model.graph.n_edges


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_mib_zero_ablation_equals_the_slow_reference(arch, tok, one_thread):
    """MIB's zero ablation keeps, for a removed edge, what EAP-IG never removes; here the slow
    reference removes writers outright and is given those kept parts as its 'ablated' values."""
    hf = _tiny(arch, tok)
    base = EdgePrunedModel.from_hf(hf, kv_per_query_head=True)
    ids = torch.randint(3, len(tok), (2, 7), generator=torch.Generator().manual_seed(1))
    const = mib_zero_writers(base, ids.shape[1])
    model = EdgePrunedModel.from_hf(hf, ablation="mean", mean_writers=const, kv_per_query_head=True)
    g = torch.Generator().manual_seed(2)
    edges = [e for e in model.graph.edges() if torch.rand(1, generator=g).item() < 0.4]
    ablated = {w: const[i][None].expand(2, -1, -1) for i, w in enumerate(model.graph.writer_names())}
    with torch.no_grad():
        want, _ = slow_forward(hf, ids, {(e.writer, e.reader) for e in edges}, ablated=ablated, kv_per_query_head=True)
        model.set_circuit(edges)
        got = model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # the kept parts, by hand for GPT-2: the position embedding; b_O / H + (ln_1.bias W_V + b_V) W_O per head
    if arch == "gpt2":
        blk, D, H = hf.transformer.h[1], 32, 4
        W_V, b_V = blk.attn.c_attn.weight[:, 2 * D:], blk.attn.c_attn.bias[2 * D:]
        v = blk.ln_1.bias @ W_V + b_V
        W_O = blk.attn.c_proj.weight
        head = model.graph.slot("a1.h2")
        want_h = blk.attn.c_proj.bias / H + v[16:24] @ W_O[16:24]
        torch.testing.assert_close(const[head, 0], want_h, atol=1e-6, rtol=0)
        torch.testing.assert_close(const[0], hf.transformer.wpe.weight[:7], atol=0, rtol=0)
        assert const[model.graph.slot("m0")].abs().max() == 0


def test_grouped_run_scores_go_to_every_head_of_the_group():
    from edgeprune_fast.formats import scores_on_mib_graph
    from edgeprune_fast.graph import Edge

    g = Graph.build(2, 4, 2)
    s = torch.arange(g.n_edges, dtype=torch.float32)
    target, out = scores_on_mib_graph(g, s)
    assert target.signature() == Graph.build(2, 4, 2, kv_per_query_head=True).signature()
    index = {e: i for i, e in enumerate(g.edges())}
    for e, v in zip(target.edges(), out.tolist()):
        parts = e.reader.split(".")
        grouped = f"{parts[0]}.g{int(parts[1][1:]) // 2}.{parts[2]}" if parts[-1] in ("k", "v") else e.reader
        assert v == s[index[Edge(e.writer, grouped)]]
    split = Graph.build(1, 2, split_embeds=True)
    with pytest.raises(ValueError, match="split embeddings"):
        scores_on_mib_graph(split, torch.zeros(split.n_edges))
    s2 = torch.randn(split.n_edges, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="input->r"):
        _, merged = scores_on_mib_graph(split, s2, split_embeds="merge")
    index = {e: i for i, e in enumerate(split.edges())}
    for e, v in zip(Graph.build(1, 2).edges(), merged.tolist()):
        if e.writer == "embeds":
            want = max(s2[index[Edge("tok_embeds", e.reader)]], s2[index[Edge("pos_embeds", e.reader)]])
        else:
            want = s2[index[e]]
        assert v == float(want)


def test_submission_names():
    from edgeprune_fast.mib.export import model_name_of, submission_name

    assert submission_name("arithmetic_addition", "llama3") == "arithmetic-addition_llama3"
    assert submission_name("arc-easy", "gemma2") == "arc-easy_gemma2"
    assert submission_name("copycolors_mcqa", "qwen2.5") == "mcqa_qwen2.5"
    names = {model_name_of(Graph.build(L, H, K)) for L, H, K, _ in MIB_MODELS.values()}
    assert names == {"gpt2", "qwen2.5", "gemma2", "llama3"}
    assert model_name_of(Graph.build(2, 2)) is None
