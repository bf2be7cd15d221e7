"""The `edgeprune` command line end to end on a tiny GPT-2 saved with save_pretrained (and a
tokenizer trained in the tests): prune (one target in-process, a sweep in a subprocess),
eval of the produced circuit in both file formats, draw, info, the tracr demo (few steps),
and bad input: one clear message, exit code 2, nothing written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgeprune_fast import cli, staging
from edgeprune_fast.circuit import Circuit
from edgeprune_fast.commands import prune as prune_command
from edgeprune_fast.errors import UsageError
from edgeprune_fast.formats import load_circuit
from tests.tasks._task_tokenizer import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]
LINES = [
    ("When Mary and John went to the store, John gave a drink to<predict> Mary</predict>",
     "When Mary and John went to the store, Paul gave a drink to Mary"),
    ("When Lisa and Paul went to the store, Paul gave a drink to<predict> Lisa</predict>",
     "When Lisa and Paul went to the store, Mary gave a drink to Lisa"),
    ("When Anna and Mark went to the park, Mark gave a ball to<predict> Anna</predict>",
     "When Anna and Mark went to the park, John gave a ball to Anna"),
]
N_EDGES = 46  # 2 layers, 2 heads, one embeds node: graph.n_edges_closed_form(2, 2)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = save_tiny_model(root / "model")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"clean": c, "corrupted": k}) + "\n" for c, k in LINES))
    return {"root": root, "model": model, "data": data}


@pytest.fixture(scope="module")
def pruned(files):
    """One in-process `prune` run shared by the tests that read its outputs."""
    out = files["root"] / "run"
    code = cli.main(["prune", "--model", str(files["model"]), "--data", str(files["data"]), "--sparsity", "0.9",
                     "--steps", "4", "--quiet", "--picture", "svg", "--out", str(out)])
    assert code == 0
    return out


def run(argv, capsys):
    """(exit code, stdout, stderr) of cli.main (arguments as strings), argparse's SystemExit included."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_prune_writes_an_exact_circuit(pruned, files):
    names = sorted(p.name for p in pruned.iterdir())
    assert names == ["circuit.eap-ig.json", "circuit.json", "circuit.svg", "masks.safetensors"]
    c = Circuit.load(pruned / "circuit.json")
    assert c.n_edges_total == N_EDGES and c.n_edges == round(0.1 * N_EDGES)
    assert c.config["discretisation"]["n_keep"] == c.n_edges
    assert c.config["train"]["steps"] == 4 and c.config["task"] == str(files["data"])
    for key in ("kl", "kl_empty", "metric_circuit", "metric_full", "metric_empty", "faithfulness"):
        assert key in c.metrics
    assert c.metrics["n_examples"] == len(LINES)
    assert load_circuit(pruned / "circuit.eap-ig.json").edges == c.edges
    assert "<svg" in (pruned / "circuit.svg").read_text()
    assert not [p for p in pruned.parent.iterdir() if p.name.startswith(".run.")], "a staging folder was left behind"


def test_eval_both_formats(pruned, files, capsys):
    base = ["--model", str(files["model"]), "--data", str(files["data"])]
    code, out, err = run(["eval", str(pruned / "circuit.json"), *base, "--out", str(files["root"] / "ev.json")],
                         capsys)
    assert code == 0, err
    assert f"edges: {round(0.1 * N_EDGES)} of {N_EDGES}" in out and "faithfulness" in out
    ours = Circuit.load(files["root"] / "ev.json")
    code, out2, err = run(["eval", str(pruned / "circuit.eap-ig.json"), *base], capsys)
    assert code == 0, err
    assert out2.splitlines()[1:4] == out.splitlines()[1:4]  # same circuit, same numbers
    assert ours.metrics["kl"] == pytest.approx(Circuit.load(pruned / "circuit.json").metrics["kl"], rel=1e-5)


def test_draw_and_info(pruned, files, capsys):
    out = files["root"] / "pic.png"
    code, stdout, err = run(["draw", str(pruned / "circuit.eap-ig.json"), "--out", str(out)], capsys)
    assert code == 0, err
    assert out.read_bytes()[:4] == b"\x89PNG"
    code, _, err = run(["draw", str(pruned / "circuit.json"), "--out", str(files["root"] / "pic.jpg")], capsys)
    assert code == 2 and "expected a file name ending in .svg, .png, .pdf" in err
    code, stdout, _ = run(["info"], capsys)
    assert code == 0 and "torch" in stdout and "backend" in stdout


def test_sweep_in_a_subprocess(files):
    out = files["root"] / "sweep"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "edgeprune_fast.cli", "prune", "--model", str(files["model"]),
                           "--data", str(files["data"]), "--sweep", "0.5", "0.95", "--steps", "2", "--quiet",
                           "--picture", "none", "--out", str(out)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((out / "sweep.json").read_text())
    assert [r["n_edges"] for r in rows] == [round(0.5 * N_EDGES), round(0.05 * N_EDGES)]
    assert (out / "kl_vs_sparsity.png").read_bytes()[:4] == b"\x89PNG"
    assert Circuit.load(out / "sparsity_0.5000" / "circuit.json").n_edges == 23


def test_demo_few_steps(tmp_path, capsys):
    out = tmp_path / "demo"
    code, stdout, err = run(["demo", "--steps", "8", "--quiet", "--out", str(out)], capsys)
    assert code == 0, err
    assert "known circuit: 10 edges; matched" in stdout and "ROC AUC" in stdout
    c = Circuit.load(out / "circuit.json")
    assert c.n_edges_total == 77 and 0.0 <= c.metrics["auc"] <= 1.0
    assert (out / "circuit.png").is_file() and (out / "ground_truth.png").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 8 and len(summary["ground_truth"]) == 10


def _unaligned(path: Path) -> Path:
    path.write_text(json.dumps({"clean": LINES[0][0], "corrupted": LINES[0][1]}) + "\n"
                    + json.dumps({"clean": LINES[1][0], "corrupted": "When Lisa went out, Mary gave a drink"}) + "\n")
    return path


@pytest.mark.parametrize("case, message", [
    ("missing model", "argument --model: '/no/such/model' does not exist"),
    ("hub name", "is not a local folder, and models are not downloaded from the hub"),
    ("empty jsonl", "is empty"),
    ("malformed jsonl", "line 2: malformed JSON"),
    ("missing jsonl", "--data: expected a JSONL file"),
    ("unaligned jsonl", "line 2: clean and corrupted prompts must tokenise to the same length"),
    ("sparsity 2", "argument --sparsity: expected a number in [0, 2), got 2.0"),
    ("negative sweep", "argument --sweep: expected a number in [0, 2), got -0.1"),
    ("zero steps", "argument --steps: expected an integer >= 1, got 0"),
    ("unknown task", "task: expected one of"),
    ("truncated weights", "which could not be read: Error while deserializing header"),
    ("no tokenizer", "has no tokenizer files (expected tokenizer.json or vocab.json + merges.txt"),
    ("data is a folder", "which is a directory"),
    ("jsonl not utf-8", "line 2: expected UTF-8 text, got the byte 0xe9 at column 15"),
    ("warm-up too long", "--sparsity-warmup: expected an integer in [0, --steps=2] (a warm-up longer than the run"),
    ("node target without node masks", "--node-sparsity: needs node masks"),
    ("no model", "--model: required (unless --resume OUT continues an interrupted run)"),
])
def test_bad_input(case, message, files, tmp_path, capsys):
    model, data, out = str(files["model"]), str(files["data"]), tmp_path / "in" / "out"
    tmp_path = tmp_path / "in"
    tmp_path.mkdir()
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "latin1.jsonl").write_bytes((json.dumps({"clean": LINES[0][0], "corrupted": LINES[0][1]}) + "\n"
                                             + '{"clean": "caf\xe9", "corrupted": "x"}\n').encode("latin-1"))
    (tmp_path / "bad.jsonl").write_text(json.dumps({"clean": LINES[0][0], "corrupted": LINES[0][1]}) + "\n{oops\n")
    argv = {
        "missing model": ["--model", "/no/such/model", "--data", data],
        "hub name": ["--model", "gpt2", "--data", data],
        "empty jsonl": ["--model", model, "--data", str(tmp_path / "empty.jsonl")],
        "malformed jsonl": ["--model", model, "--data", str(tmp_path / "bad.jsonl")],
        "missing jsonl": ["--model", model, "--data", str(tmp_path / "none.jsonl")],
        "unaligned jsonl": ["--model", model, "--data", str(_unaligned(tmp_path / "u.jsonl"))],
        "sparsity 2": ["--model", model, "--data", data, "--sparsity", "2"],
        "negative sweep": ["--model", model, "--data", data, "--sweep", "0.5", "-0.1"],
        "zero steps": ["--model", model, "--data", data, "--steps", "0"],
        "unknown task": ["--model", model, "--task", "nosuch"],
        "truncated weights": ["--model", str(_damaged_copy(files["model"], tmp_path / "cut", "weights")), "--data", data],
        "no tokenizer": ["--model", str(_damaged_copy(files["model"], tmp_path / "untok", "tokenizer")), "--data", data],
        "data is a folder": ["--model", model, "--data", str(tmp_path)],
        "jsonl not utf-8": ["--model", model, "--data", str(tmp_path / "latin1.jsonl")],
        "warm-up too long": ["--model", model, "--data", data, "--sparsity-warmup", "2500"],
        "node target without node masks": ["--model", model, "--data", data, "--node-sparsity", "0.5",
                                           "--no-node-masks"],
        "no model": ["--data", data],
    }[case]
    code, stdout, err = run(["prune", *argv, "--steps", "2", "--quiet", "--out", str(out)]
                            if case != "zero steps" else ["prune", *argv, "--quiet", "--out", str(out)], capsys)
    assert code == 2
    assert message in err
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def _damaged_copy(model: Path, to: Path, what: str) -> Path:
    """The tiny model saved again, with its weights file cut in half or its tokenizer files gone."""
    import shutil

    shutil.copytree(model, to)
    if what == "weights":
        weights = to / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
            (to / name).unlink(missing_ok=True)
    return to


def test_a_failure_after_training_keeps_the_masks_and_resumes(files, tmp_path, capsys, monkeypatch):
    """A failure once the masks are learned: exit 1, no final output appears, the learned
    masks are kept in OUT/checkpoint with the command that continues; it ends like a run
    that never failed."""
    out, straight = tmp_path / "out", tmp_path / "straight"
    argv = ["prune", "--model", str(files["model"]), "--data", str(files["data"]), "--steps", "6", "--quiet",
            "--picture", "none"]
    assert run([*argv, "--out", str(straight)], capsys)[0] == 0

    def write_then_fail(folder, *args, **kwargs):
        (folder / "circuit.json").write_text("{}")
        raise ValueError("picture: simulated failure after a partial write")

    monkeypatch.setattr(prune_command, "write_circuit_files", write_then_fail)
    code, _, err = run([*argv, "--out", str(out)], capsys)
    assert code == 1 and "simulated failure" in err and f"edgeprune prune --resume {out}" in err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint"]  # no final output in place
    assert (out / "checkpoint" / "outputs" / "masks.safetensors").is_file()  # the learned masks are kept
    monkeypatch.undo()
    code, _, err = run(["prune", "--resume", str(out), "--quiet"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in straight.iterdir())
    assert json.loads((out / "circuit.json").read_text())["edges"] == \
        json.loads((straight / "circuit.json").read_text())["edges"]


def test_bad_input_before_training_leaves_nothing(files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"

    def fail(*args, **kwargs):
        raise ValueError("config: simulated bad setting found while setting up the trainer")

    monkeypatch.setattr("edgeprune_fast.train.Trainer.__init__", fail)
    code, _, err = run(["prune", "--model", str(files["model"]), "--data", str(files["data"]), "--steps", "2",
                        "--quiet", "--out", str(out)], capsys)
    assert code == 2 and "simulated bad setting" in err
    assert list(tmp_path.iterdir()) == []  # neither the output nor its checkpoint


def test_out_folder_rules(tmp_path, capsys):
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="has files in it"):
        staging.check_out_folder(full)
    with pytest.raises(UsageError, match="has files in it"):  # not an earlier run's folder: never replaced
        staging.check_out_folder(full, replace_previous=True)
    prev = tmp_path / "prev"
    prev.mkdir()
    (prev / "circuit.json").write_text("{}")
    with staging.staged_output(prev, replace_previous=True) as stage:
        (stage / "summary.json").write_text("{}")
        assert (prev / "circuit.json").exists()  # the old run stays until the new one is complete
    assert sorted(p.name for p in prev.iterdir()) == ["summary.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "prev"]


def test_staged_outputs_get_the_modes_of_plain_mkdir_and_open(tmp_path):
    # the temporary stage's private modes (0700, 0600) must not stick to the results
    old = os.umask(0o022)
    try:
        with staging.staged_output(tmp_path / "run") as stage:
            (stage / "circuit.json").write_text("{}")
        with staging.staged_file(tmp_path / "masks.safetensors") as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "run").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "masks.safetensors").stat().st_mode & 0o777 == 0o644


def test_plan_delegates(capsys):
    pytest.importorskip("edgeprune_fast.plan")
    code, stdout, err = run(["plan", "--layers", "2", "--heads", "2", "--d-model", "32", "--seq", "16"], capsys)
    assert code == 0, err
    assert "fits" in stdout
    code, _, err = run(["plan"], capsys)  # the planner's own bad-input message, exit 2
    assert code == 2 and "edgeprune plan: error: model: expected --model PATH" in err


def test_node_masks_always_give_the_target_circuit(files, tmp_path, capsys):
    """Seed 0, 40 steps with node masks: every node log_alpha ends below 0 on this model, and
    the old rule (edges of kept writers only) failed with exit 2 and nothing saved. The
    circuit is cut from the ranking by min(edge, node) log_alpha: exactly the target's size."""
    out = tmp_path / "run"
    code, _, err = run(["prune", "--model", str(files["model"]), "--data", str(files["data"]), "--sparsity", "0.9",
                        "--steps", "40", "--quiet", "--picture", "none", "--out", str(out)], capsys)
    assert code == 0, err
    c = json.loads((out / "circuit.json").read_text())
    assert c["n_edges"] == round(0.1 * N_EDGES)
    assert c["config"]["discretisation"]["rule"] == "exact count"
    assert c["config"]["discretisation"]["score"] == "min(edge log_alpha, writer node log_alpha)"


def test_outputs_share_one_file_mode(pruned):
    modes = {p.name: p.stat().st_mode & 0o777 for p in pruned.iterdir()}
    assert len(set(modes.values())) == 1, modes  # masks.safetensors was 0600 (safetensors' own mode)


def test_targets_of_one_or_more_train_and_say_what_circuit_is_taken(files, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run(["prune", "--model", str(files["model"]), "--data", str(files["data"]), "--sparsity", "1.02",
                        "--steps", "4", "--quiet", "--picture", "none", "--out", str(out)], capsys)
    assert code == 0, err
    c = json.loads((out / "circuit.json").read_text())
    assert c["config"]["discretisation"]["rule"] == "non-zero masks (target >= 1)"
    assert f"note: target 1.02 >= 1 keeps no edge by count; the circuit is the {c['n_edges']} edges" in err
    if c["n_edges"] == 0:
        assert "warning: the circuit at target 1.02 is EMPTY" in err


def test_eval_takes_the_circuit_files_settings_and_mean_ablation_works(pruned, files, capsys):
    base = ["--model", str(files["model"]), "--data", str(files["data"])]
    code, out, err = run(["eval", str(pruned / "circuit.json"), *base], capsys)
    assert code == 0 and "corrupted ablation" in out and "overrides" not in err
    code, out, err = run(["eval", str(pruned / "circuit.json"), *base, "--ablation", "mean"], capsys)
    assert code == 0, err
    assert "mean ablation" in out and "note: --ablation mean overrides the circuit file's corrupted" in err
    assert "faithfulness" in out
    code, out, err = run(["eval", str(pruned / "circuit.json"), *base, "--ablation", "zero", "--split-embeds"], capsys)
    assert code == 2 and "overrides the circuit file's False" in err  # a split graph cannot hold this circuit
    assert "is a circuit of a graph with 46 edges; expected this model's graph with 61 edges" in err


def test_circuit_rediscretises_a_finished_run(pruned, files, tmp_path, capsys):
    out = tmp_path / "more"
    code, stdout, err = run(["circuit", str(pruned), "--sparsity", "0.5", "0.9", "--picture", "none",
                             "--out", str(out)], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["sparsity_0.5000", "sparsity_0.9000", "summary.json"]
    c9 = Circuit.load(out / "sparsity_0.9000" / "circuit.json")
    assert c9.edges == Circuit.load(pruned / "circuit.json").edges  # the run's own target: the same circuit
    c5 = Circuit.load(out / "sparsity_0.5000" / "circuit.json")
    assert c5.n_edges == round(0.5 * N_EDGES) and set(c9.edges) <= set(c5.edges)  # prefixes of one ranking
    assert "faithfulness" in c5.metrics and c5.config["source_run"] == str(pruned)
    code, _, err = run(["circuit", str(pruned), "--sparsity", "0.7", "--no-eval", "--out", str(tmp_path / "q")],
                       capsys)
    assert code == 0, err
    assert Circuit.load(tmp_path / "q" / "sparsity_0.7000" / "circuit.json").metrics == {}
    code, _, err = run(["circuit", str(files["root"]), "--sparsity", "0.7", "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and "has no circuit.json" in err and not (tmp_path / "x").exists()


def test_plan_json_into_a_closed_pipe_and_its_hints(capsys):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(f"{sys.executable} -m edgeprune_fast.cli plan --layers 2 --heads 2 --d-model 32 --json "
                          f"| head -1", shell=True, capture_output=True, text=True, env=env, timeout=120)
    assert proc.stdout.strip() == "{" and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr
    code, _, err = run(["plan", "--layers", "2"], capsys)
    assert code == 2 and "--heads, --d-model missing" in err

