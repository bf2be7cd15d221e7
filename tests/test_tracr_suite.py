"""The shipped tracr program suite (edgeprune_fast/data/tracr, compiled by
tools/compile_tracr.py) and its ground truth (edgeprune_fast/tracr_truth.py): every program
loads and reproduces tracr's outputs, its ground truth is what the derivation gives from the
weights, holds in the edge-pruned model in both embedding modes, and every one of its edges
is needed; the derivation reproduces ACDC's `reverse` circuit; TRACR_DEFAULTS is one recipe
for all of them; `edgeprune prune` / `eval` take a tracr export as --model."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch

from edgeprune_fast import cli
from edgeprune_fast.model import EdgePrunedModel
from edgeprune_fast.tasks.tracr import TRACR_DEFAULTS, TracrTask, compare_with_ground_truth
from edgeprune_fast.tracr import TRACR_DATA_DIR, find_tracr_export, load_examples, load_ground_truth, load_tracr
from edgeprune_fast.tracr_truth import (
    DERIVED_BY,
    TOLERANCE,
    component_io,
    dependency_edges,
    derive_ground_truth,
    ground_truth_json,
    ground_truth_sets,
)

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
SUITE = ("reverse", "sort", "hist", "pair_balance", "length", "shuffle_dyck")
COMPILED = SUITE[1:]  # reverse is the shared Edge Pruning / ACDC export
SMALL = ("sort", "hist", "pair_balance", "length")  # re-derived in CI; shuffle_dyck's derivation takes ~15 s


def _model(name):
    return load_tracr(TRACR_DATA_DIR, name)


def test_the_suite_is_shipped_and_make_frac_prevs_is_not():
    shipped = sorted(p.name[: -len(".config.json")] for p in TRACR_DATA_DIR.glob("*.config.json"))
    assert shipped == sorted(SUITE)
    assert not [p for p in TRACR_DATA_DIR.iterdir() if "frac_prevs" in p.name]
    tree = ast.parse((ROOT / "tools" / "compile_tracr.py").read_text())
    programs = next(n for n in ast.walk(tree) if isinstance(n, ast.AnnAssign) and getattr(n.target, "id", "") ==
                    "PROGRAMS")
    assert sorted(k.value for k in programs.value.keys) == sorted(COMPILED)
    calls = {n.attr for n in ast.walk(programs) if isinstance(n, ast.Attribute)}
    assert "make_frac_prevs" not in calls and {"make_sort_unique", "make_hist", "make_pair_balance", "make_length",
                                               "make_shuffle_dyck"} <= calls


@pytest.mark.parametrize("name", SUITE)
def test_loads_and_reproduces_every_example_set(name):
    """The torch model gives tracr's outputs (decoded, and the output values to 1e-5)."""
    model, examples = _model(name), load_examples(TRACR_DATA_DIR, name)
    assert examples and any(s.use_for_ground_truth_test for s in examples.values())
    with torch.no_grad():
        for s in examples.values():
            out = model(s.input_ids)
            torch.testing.assert_close(out, s.expected_output_dims_values, atol=1e-5, rtol=0)
            decoded = model.decode(out)
            if model.config.output_kind == "categorical":
                assert [d[1:] for d in decoded] == [e[1:] for e in s.expected_output], s.name
            else:
                assert max(abs(a - b) for d, e in zip(decoded, s.expected_output)
                           for a, b in zip(d[1:], e[1:])) < 1e-4, s.name
    if name in COMPILED:  # the compile tool also ran the RASP evaluator: tracr's model agrees with it
        raw = json.loads((TRACR_DATA_DIR / f"{name}.examples.json").read_text())
        assert all(a == b for a, b in (s["compiled_agrees_with_rasp"].split("/") for s in raw["sets"]))


@pytest.mark.parametrize("name", SUITE)
def test_ground_truth_file_matches_the_graph(name):
    model, gt = _model(name), load_ground_truth(TRACR_DATA_DIR, name)
    assert gt.n_edges_full == len(model.full_graph_edges(False))
    assert gt.n_edges_full_split_embeds == len(model.full_graph_edges(True))
    for split, edges in ((False, gt.edges), (True, gt.edges_split_embeds)):
        full = set(model.full_graph_edges(split))
        assert edges and set(edges) <= full and len(set(edges)) == len(edges)
        assert set(edges) <= set(dependency_edges(model, split)), "every ground-truth edge is a dependency"


@pytest.mark.parametrize("split", [False, True], ids=["embeds", "split_embeds"])
def test_derivation_reproduces_acdc_reverse_circuit(split):
    """On the shared `reverse` (whose file is ACDC's canonical circuit) the derivation from the
    weights gives the same edges; the inert dependencies are the all-true selector's q/k and
    the BOS term of the flip's query (and its key's `one` with split embeddings)."""
    model, examples, gt = _model("reverse"), load_examples(TRACR_DATA_DIR, "reverse"), load_ground_truth(
        TRACR_DATA_DIR, "reverse")
    d = derive_ground_truth(model, ground_truth_sets(examples), split)
    assert set(d.edges) == set(gt.edges_split_embeds if split else gt.edges)
    tok = "tok_embeds" if split else "embeds"
    assert {(tok, "a0.h0.q"), (tok, "a0.h0.k"), (tok, "a3.h0.q")} <= set(d.inert)
    assert d.sufficient and d.every_edge_necessary and d.max_abs_output_diff <= TOLERANCE


@pytest.mark.parametrize("name", SMALL)
def test_shipped_ground_truth_is_the_derived_one(name):
    """The file is what the code derives from the shipped weights and examples (not by hand)."""
    model, examples = _model(name), load_examples(TRACR_DATA_DIR, name)
    shipped = json.loads((TRACR_DATA_DIR / f"{name}.ground_truth.json").read_text())
    assert shipped["derived_by"] == DERIVED_BY
    derived = json.loads(json.dumps(ground_truth_json(model, examples)))
    for key in ("edges", "edges_split_embeds", "n_edges", "n_edges_split_embeds", "full_graph"):
        assert derived[key] == shipped[key], key
    for mode in ("one_embeds_node", "split_embeds"):
        d = shipped["derivation"][mode]
        assert d["sufficient"] and d["every_edge_necessary"]
        assert all(v["max_abs_output_diff"] > TOLERANCE for v in d["per_edge_removal"].values())


@pytest.mark.parametrize("name", SUITE)
@pytest.mark.parametrize("split", [False, True], ids=["embeds", "split_embeds"])
def test_ground_truth_holds_in_the_edge_pruned_model(name, split):
    """Masks fixed to the ground truth (zero ablation): the fused model computes the program
    (accuracy 1.0) on every ground-truth set; the empty circuit does not."""
    task = TracrTask.load(TRACR_DATA_DIR, name)
    gt = load_ground_truth(TRACR_DATA_DIR, name)
    pruned = EdgePrunedModel.from_hf(task.model, ablation="zero", split_embeds=split, node_masks=False)
    batches = task.batches()
    with torch.no_grad():
        pruned.set_circuit(gt.edges_split_embeds if split else gt.edges)
        assert all(float(task.metric(pruned(b.input_ids).logits, b).mean()) == 1.0 for b in batches)
        pruned.set_circuit([])
        assert float(torch.cat([task.metric(pruned(b.input_ids).logits, b) for b in batches]).mean()) < 1.0


def test_shuffle_dyck_edges_are_each_needed():
    """shuffle_dyck (not re-derived in CI): removing any one ground-truth edge breaks the
    output values in the edge-pruned model (one embeds node)."""
    task = TracrTask.load(TRACR_DATA_DIR, "shuffle_dyck")
    gt = load_ground_truth(TRACR_DATA_DIR, "shuffle_dyck")
    pruned = EdgePrunedModel.from_hf(task.model, ablation="zero", node_masks=False)
    b = max(task.batches(), key=len)  # length 4, 256 examples
    with torch.no_grad():
        full = task.model(b.input_ids)[:, 1:]
        for edge in gt.edges:
            pruned.set_circuit([e for e in gt.edges if e != edge])
            assert float((pruned(b.input_ids).logits[:, 1:] - full).abs().max()) > TOLERANCE, edge


def test_component_io_of_length():
    """length = SelectorWidth(Select(tokens, tokens, TRUE)): the embeddings write tokens/one and
    indices, m0 writes `length` and resid_post reads it."""
    model = _model("length")
    writes, reads = component_io(model)
    labels = model.config.raw["residual_stream"]["labels"]
    names = lambda dims: {labels[d].split(":")[0] for d in dims}  # noqa: E731
    assert names(writes["tok_embeds"]) == {"tokens", "one"} and names(writes["pos_embeds"]) == {"indices"}
    sop = model.config.raw["program"]["output_sop"]  # tracr's label of the length SOp
    assert sop.startswith("length") and names(reads["resid_post"]) == {sop} and sop in names(writes["m0"])
    deps = dependency_edges(model)
    assert deps[("m0", "resid_post")] == [sop]


def test_one_recipe_for_the_suite():
    """TRACR_DEFAULTS names no example set (each export's marked sets are used) and its lambda
    learning rate follows the graph size by one rule."""
    assert TRACR_DEFAULTS.sets is None
    for name in SUITE:
        task = TracrTask.load(TRACR_DATA_DIR, name, sets=TRACR_DEFAULTS.sets)
        assert [s.name for s in task.sets] == [s.name for s in ground_truth_sets(load_examples(TRACR_DATA_DIR, name))]
    assert TRACR_DEFAULTS.lambda_lr(TRACR_DEFAULTS.lambda_reference_edges) == TRACR_DEFAULTS.lr_lambda
    assert TRACR_DEFAULTS.lambda_lr(2 * 77) == pytest.approx(2 * TRACR_DEFAULTS.lr_lambda)
    with pytest.raises(ValueError, match="n_edges: expected an integer >= 1, got 0"):
        TRACR_DEFAULTS.lambda_lr(0)


def test_compare_with_ground_truth():
    gt = load_ground_truth(TRACR_DATA_DIR, "length")
    same = compare_with_ground_truth(gt.edges, TRACR_DATA_DIR, "length")
    assert same["exact"] and same["matched"] == same["n_expected"] == len(gt.edges)
    off = compare_with_ground_truth(gt.edges[1:] + [("embeds", "resid_post")], TRACR_DATA_DIR, "length")
    assert not off["exact"] and off["missing"] == [list(gt.edges[0])] and off["extra"] == [["embeds", "resid_post"]]


# ---- the CLI on tracr exports ------------------------------------------------------------------------
def _export(tmp_path, name="length"):
    folder = tmp_path / name
    folder.mkdir()
    for f in TRACR_DATA_DIR.glob(f"{name}.*"):
        shutil.copy(f, folder / f.name)
    return folder


def _run(argv, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_find_tracr_export_forms(tmp_path):
    folder = _export(tmp_path)
    assert find_tracr_export(folder) == (folder, "length")
    assert find_tracr_export(folder / "length") == (folder, "length")
    assert find_tracr_export(folder / "length.config.json") == (folder, "length")
    assert find_tracr_export(tmp_path) is None  # nothing there
    with pytest.raises(ValueError, match="holds 6 tracr models"):
        find_tracr_export(TRACR_DATA_DIR)


def test_cli_prune_and_eval_a_tracr_export(tmp_path, capsys):
    """prune on the export folder with the tracr recipe (short), then eval of its circuit:
    accuracy on the program and the ground-truth comparison, in both outputs."""
    folder = _export(tmp_path)
    out = tmp_path / "run"
    code, stdout, err = _run(["prune", "--model", str(folder), "--steps", "300", "--quiet", "--picture", "none",
                              "--out", str(out)], capsys)
    assert code == 0, err
    assert "accuracy: circuit" in stdout and "ground truth: 4 edges" in stdout
    circuit = json.loads((out / "circuit.json").read_text())
    cfg = circuit["config"]
    assert cfg["ablation"] == "zero" and not cfg["node_masks"] and cfg["train"]["steps"] == 300
    assert cfg["train"]["lr_edge"] == TRACR_DEFAULTS.lr_edge and cfg["train"]["lr_lambda"] == pytest.approx(
        TRACR_DEFAULTS.lambda_lr(8))
    assert cfg["train"]["sparsity_warmup"] == round(TRACR_DEFAULTS.sparsity_warmup * 300 / TRACR_DEFAULTS.steps)
    assert circuit["metrics"]["metric_name"] == "accuracy" and "ground_truth" in circuit["metrics"]
    code, stdout, err = _run(["eval", str(out / "circuit.json"), "--model", str(folder / "length"),
                              "--out", str(tmp_path / "eval.json")], capsys)
    assert code == 0, err
    assert "zero ablation" in stdout and "accuracy: circuit" in stdout and "ground truth: 4 edges" in stdout
    evaluated = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    assert evaluated["ground_truth"] == circuit["metrics"]["ground_truth"]
    assert evaluated["metric_circuit"] == circuit["metrics"]["metric_circuit"]
    code, stdout, err = _run(["circuit", str(out), "--sparsity", "0.5", "--picture", "none", "--out",
                              str(tmp_path / "more")], capsys)  # re-cut from the masks, evaluated on the examples
    assert code == 0, err
    assert "edges: 4 of 8" in stdout and "accuracy: circuit" in stdout


def test_cli_eval_the_ground_truth_circuit(tmp_path, capsys):
    """eval of a circuit file holding the ground truth, on split embeddings: accuracy 1, exact."""
    folder = _export(tmp_path, "sort")
    gt = load_ground_truth(folder, "sort")
    task = TracrTask.load(folder, "sort")
    pruned = EdgePrunedModel.from_hf(task.model, ablation="zero", split_embeds=True, node_masks=False)
    from edgeprune_fast.circuit import Circuit

    path = tmp_path / "gt.json"
    Circuit.from_edges(pruned.graph, gt.edges_split_embeds, config={"ablation": "zero"}).save(path)
    code, stdout, err = _run(["eval", str(path), "--model", str(folder), "--split-embeds"], capsys)
    assert code == 0, err
    assert "accuracy: circuit 1.0000" in stdout and "exact recovery: yes" in stdout


@pytest.mark.parametrize("extra, shown", [
    (["--data", "x.jsonl"], "--data: a tracr export brings its own example sets"),
    (["--task", "ioi"], "--task: a tracr export brings its own example sets; expected 'tracr' or no --task, got 'ioi'"),
])
def test_cli_tracr_bad_task_source(tmp_path, capsys, extra, shown):
    folder = _export(tmp_path)
    out = tmp_path / "run"
    code, _, err = _run(["prune", "--model", str(folder), "--steps", "2", "--quiet", "--out", str(out), *extra], capsys)
    assert code == 2 and shown in err and "Traceback" not in err
    assert not out.exists()


def test_cli_folder_with_several_tracr_models(tmp_path, capsys):
    code, _, err = _run(["prune", "--model", str(TRACR_DATA_DIR), "--steps", "2", "--out", str(tmp_path / "r")],
                        capsys)
    assert code == 2 and "holds 6 tracr models" in err and "expected one: pass" in err
    assert not (tmp_path / "r").exists()
