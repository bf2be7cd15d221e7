"""`edgeprune prune` killed and resumed, in subprocesses on the tiny GPT-2 of test_cli.py:
SIGKILL after the first checkpoint, SIGTERM and SIGINT (a checkpoint, the resume command,
exit 143 / 130), a sweep killed between its targets; every resumed run ends with the masks
and the circuit of the uninterrupted run. And `--resume`'s own bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.tasks._task_tokenizer import save_tiny_model
from tests.test_cli import LINES, ROOT, run

STEPS = 60


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"clean": c, "corrupted": k}) + "\n" for c, k in LINES))
    return {"root": root, "model": save_tiny_model(root / "model"), "data": data}


def _argv(files, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "edgeprune_fast.cli", "prune", "--model", str(files["model"]), "--data",
            str(files["data"]), "--steps", str(STEPS), "--checkpoint-every", "10", "--quiet", "--picture", "none",
            *extra, "--out", str(out)]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def _start_and_signal(argv: list[str], ready, sig: int) -> subprocess.CompletedProcess:
    """Start the run, send ``sig`` once ``ready()`` holds, wait for it to end."""
    proc = subprocess.Popen(argv, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"the run ended (or hung) before it could be interrupted: {proc.returncode}\n{err[-2000:]}")
        time.sleep(0.01)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=240)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _resume(out: Path) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "edgeprune_fast.cli", "prune", "--resume", str(out), "--quiet"]
    return subprocess.run(argv, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)


def _checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoint").glob("train-*/checkpoint.safetensors"))


@pytest.fixture(scope="module")
def straight(files, tmp_path_factory):
    """The uninterrupted runs: one target, and a sweep of two."""
    root = tmp_path_factory.mktemp("straight")
    for name, extra in (("one", []), ("sweep", ["--sweep", "0.8", "0.9"])):
        done = subprocess.run(_argv(files, root / name, *extra), cwd=ROOT, env=_env(), capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr
    return root


def _assert_same_run(out: Path, want: Path) -> None:
    assert sorted(p.name for p in out.rglob("*")) == sorted(p.name for p in want.rglob("*"))
    for masks in want.rglob("masks.safetensors"):
        got, ref = load_file(str(out / masks.relative_to(want))), load_file(str(masks))
        assert got.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=0, msg=k)
    for circuit in want.rglob("circuit.json"):
        got, ref = (json.loads(p.read_text()) for p in (out / circuit.relative_to(want), circuit))
        assert got["edges"] == ref["edges"]
        _assert_close_numbers(got["metrics"], ref["metrics"])


def _assert_close_numbers(got, want, where="metrics") -> None:
    if isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for k in want:
            _assert_close_numbers(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7), where
    else:
        assert got == want, where


def test_sigkill_after_the_first_checkpoint_then_resume(files, straight, tmp_path):
    out = tmp_path / "run"
    done = _start_and_signal(_argv(files, out), lambda: bool(_checkpoints(out)), signal.SIGKILL)
    assert done.returncode == -signal.SIGKILL
    assert not (out / "circuit.json").exists()  # no final output before the run is complete
    resumed = _resume(out)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step" in resumed.stderr
    assert not (out / "checkpoint").exists()  # nothing left behind
    _assert_same_run(out, straight / "one")


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_checkpoint_and_say_how_to_resume(files, straight, tmp_path, sig, code):
    out = tmp_path / "run"
    done = _start_and_signal(_argv(files, out), lambda: bool(_checkpoints(out)), sig)
    assert done.returncode == code, done.stderr
    assert f"interrupted by {signal.Signals(sig).name}" in done.stderr
    assert f"resume with: edgeprune prune --resume {out}" in done.stderr
    assert "Traceback" not in done.stderr
    resumed = _resume(out)
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(out, straight / "one")


def test_a_sweep_resumes_at_its_first_unfinished_target(files, straight, tmp_path):
    out = tmp_path / "sweep"

    def first_target_done() -> bool:
        try:
            return len(json.loads((out / "checkpoint" / "run.json").read_text())["done"]) == 1
        except (OSError, ValueError):
            return False

    done = _start_and_signal(_argv(files, out, "--sweep", "0.8", "0.9"), first_target_done, signal.SIGKILL)
    assert done.returncode == -signal.SIGKILL
    resumed = _resume(out)
    assert resumed.returncode == 0, resumed.stderr
    assert "(1 of 2 targets done)" in resumed.stderr and "pruning" in resumed.stderr  # the second one from scratch
    _assert_same_run(out, straight / "sweep")
    _assert_close_numbers(json.loads((out / "sweep.json").read_text()),
                          json.loads((straight / "sweep" / "sweep.json").read_text()))


def test_resume_bad_input(files, straight, tmp_path, capsys):
    code, _, err = run(["prune", "--resume", str(tmp_path / "nope")], capsys)
    assert code == 2 and "--resume: expected the folder of an interrupted `edgeprune prune` run" in err
    assert "does not exist" in err
    code, out, _ = run(["prune", "--resume", str(straight / "one")], capsys)
    assert code == 0 and "nothing to resume" in out
    half = tmp_path / "half"
    (half / "checkpoint").mkdir(parents=True)
    (half / "checkpoint" / "run.json").write_text(json.dumps({"format": "edgeprune_fast.run", "settings": {},
                                                              "targets": [0.9], "done": {}}))
    code, _, err = run(["prune", "--resume", str(half), "--steps", "5"], capsys)
    assert code == 2 and "expected no other options but --quiet, got --steps" in err
    assert not list(tmp_path.glob("nope*"))
