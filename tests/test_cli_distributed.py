"""`edgeprune prune` under torchrun: 2 CPU processes (gloo) on the tiny GPT-2 of test_cli.py,
launched as a user would (``python -m torch.distributed.run --standalone --nproc_per_node 2
-m edgeprune_fast.cli prune ...``), replicated and with FSDP2-sharded weights, corrupted and
mean ablation: the output folder is written once (rank 0) and holds the circuit and masks of
one process on the same global batches. The options that need torchrun, and their errors,
are checked in-process (nothing is launched: the errors come before the process group)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from edgeprune_fast import cli
from edgeprune_fast.circuit import Circuit
from edgeprune_fast.commands import prune as prune_command
from edgeprune_fast.errors import UsageError
from tests.tasks._task_tokenizer import save_tiny_model
from tests.test_cli import LINES, ROOT, run

# 4 examples, batches of 2: every training batch splits evenly over 2 processes
DATA = [*LINES, ("When John and Mary went to the park, Mary gave a ball to<predict> John</predict>",
                 "When John and Mary went to the park, Lisa gave a ball to John")]
# --init 1: masks off the hard-concrete clamp, so the task loss (the data each process sees)
# moves them from the first step (at the default 10 only the sparsity terms would)
COMMON = ["--batch-size", "2", "--steps", "4", "--sparsity", "0.9", "--init", "1", "--quiet", "--picture", "none"]
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
RUNS = {  # name: (options of the 2-process run, of the 1-process reference)
    "replicated": ([], []),
    "sharded": (["--shard-weights", "--checkpoint-layers", "--corrupted-on-cpu"], []),
    "sharded-mean": (["--shard-weights", "--checkpoint-layers", "--ablation", "mean"], ["--ablation", "mean"]),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_dp")
    model = save_tiny_model(root / "model")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"clean": c, "corrupted": k}) + "\n" for c, k in DATA))
    return {"root": root, "model": model, "data": data}


def base(files) -> list[str]:
    return ["prune", "--model", str(files["model"]), "--data", str(files["data"]), *COMMON]


@pytest.fixture(scope="module")
def single(files):
    """1-process runs (in-process) of the references RUNS names, and of other batches (the
    control): {options tuple: out folder}."""
    outs = {}
    for ref in [*(ref for _, ref in RUNS.values()), ["--batch-size", "4"]]:
        if tuple(ref) not in outs:
            out = files["root"] / f"single{len(outs)}"
            assert cli.main([*base(files), *ref, "--out", str(out)]) == 0
            outs[tuple(ref)] = out
    return outs


def torchrun(files, options: list[str], out) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "edgeprune_fast.cli", *base(files), *options, "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("name", list(RUNS))
def test_two_processes_write_one_process_circuit(name, files, single):
    options, ref_options = RUNS[name]
    out = files["root"] / name
    proc = torchrun(files, options, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # rank 0 alone reports and writes; nothing is left beside the output
    assert proc.stdout.count("target sparsity 0.9:") == 1 and proc.stdout.count(f"wrote {out}") == 1, proc.stdout
    assert proc.stderr.count("pruning ") == 1 and "2 processes" in proc.stderr
    assert ("weights sharded" in proc.stderr) == ("--shard-weights" in options)
    assert sorted(p.name for p in out.iterdir()) == ["circuit.eap-ig.json", "circuit.json", "masks.safetensors"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{name}.")]
    ref = single[tuple(ref_options)]
    got, want = Circuit.load(out / "circuit.json"), Circuit.load(ref / "circuit.json")
    assert got.config["processes"] == 2 and got.config["ablation"] == want.config["ablation"]
    masks, ref_masks = load_file(str(out / "masks.safetensors")), load_file(str(ref / "masks.safetensors"))
    assert masks.keys() == ref_masks.keys()
    for k, v in ref_masks.items():
        torch.testing.assert_close(masks[k], v, rtol=0, atol=1e-5)
    assert got.edges == want.edges and got.n_edges == round(0.1 * got.n_edges_total)
    assert got.metrics["kl"] == pytest.approx(want.metrics["kl"], rel=1e-4, abs=1e-6)


def test_masks_depend_on_the_batches(single):
    """The control: other batches give other masks, so the 1e-5 agreement above is the data
    parallel run's doing, not masks that the data cannot move."""
    a, b = (load_file(str(single[k] / "masks.safetensors")) for k in ((), ("--batch-size", "4")))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-2


def test_eval_takes_the_memory_options(files, single, capsys):
    ref = single[()]
    code, out, err = run(["eval", str(ref / "circuit.json"), "--model", str(files["model"]), "--data",
                          str(files["data"]), "--checkpoint-layers", "--corrupted-on-cpu"], capsys)
    assert code == 0, err
    assert "faithfulness" in out


@pytest.fixture
def launched(monkeypatch):
    """Pretend to be rank ``rank`` of a torchrun launch of ``world`` processes."""
    for k in TORCHRUN_ENV:
        monkeypatch.delenv(k, raising=False)

    def set_env(rank: int, world: int) -> None:
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
    return set_env


@pytest.mark.parametrize("case, world, extra, message", [
    ("shard without torchrun", None, ["--shard-weights"],
     "--shard-weights: shards the weights over the processes of a torchrun launch; expected WORLD_SIZE > 1 "
     "(launch with torchrun --nproc_per_node N ...), got WORLD_SIZE=unset"),
    ("shard with one process", 1, ["--shard-weights"], "got WORLD_SIZE=1"),
    ("batch smaller than the processes", 4, ["--batch-size", "3"],
     "--batch-size: expected at least one example per process (4; the global batch is split over them), got 3"),
    ("device index", 2, ["--device", "cuda:1"] if torch.cuda.is_available() else ["--device", "meta"],
     "--device: under torchrun each process takes the GPU of its LOCAL_RANK; expected cpu or cuda, got"),
    ("bad world size", "two", [], "environment: expected the integers torchrun sets in WORLD_SIZE and RANK"),
])
def test_clear_errors_before_anything_is_loaded(case, world, extra, message, files, tmp_path, capsys, launched,
                                                 monkeypatch):
    if world is not None:
        launched(0, 2)
        monkeypatch.setenv("WORLD_SIZE", str(world))
    out = tmp_path / "out"
    monkeypatch.setattr(prune_command, "load_tokenizer", lambda path: pytest.fail("loaded the tokenizer"))
    code, stdout, err = run(["prune", "--model", str(files["model"]), "--data", str(files["data"]), "--steps", "2",
                             "--quiet", *extra, "--out", str(out)], capsys)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_other_ranks_stay_quiet_on_usage_errors(files, tmp_path, capsys, launched):
    launched(1, 2)
    code, stdout, err = run(["prune", "--model", str(files["model"]), "--data", str(files["data"]), "--batch-size",
                             "1", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and stdout == "" and err == ""  # rank 0 reports the same error


def test_only_prune_and_attribute_run_under_torchrun(files, single, capsys, launched):
    launched(0, 2)
    code, _, err = run(["eval", str(single[()] / "circuit.json"), "--model", str(files["model"]), "--data",
                        str(files["data"])], capsys)
    assert code == 2
    assert "edgeprune eval: error: expected one process (only `edgeprune prune` and `edgeprune attribute` run " \
           "under torchrun), got WORLD_SIZE=2" in err


def test_short_last_batch_kept_unless_smaller_than_the_processes(capsys):
    from edgeprune_fast.tasks.base import TaskBatch

    def batch(n):
        return TaskBatch(torch.zeros(n, 3, dtype=torch.long), None, None, torch.ones(n, 3, dtype=torch.bool))

    kept = prune_command.shareable_batches([batch(4), batch(4), batch(3)], 2, report=True)
    assert [len(b) for b in kept] == [4, 4, 3]  # 3 rows: 2 + 1
    assert capsys.readouterr().err == ""
    kept = prune_command.shareable_batches([batch(4), batch(4), batch(1)], 2, report=True)
    assert [len(b) for b in kept] == [4, 4]
    assert "note: 1 training example(s) in a short last batch left out (fewer rows than the 2 processes)" in \
        capsys.readouterr().err
    with pytest.raises(UsageError, match="--batch-size: expected at least 4 training examples .* got 3"):
        prune_command.shareable_batches([batch(3)], 4, report=True)
