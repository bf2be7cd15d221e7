"""Kill and resume: `edgeprune prune` killed at several points of a run, then `--resume`d,
against the same run uninterrupted.

Run from the repository root (inside .venv)::

    python -m bench.resume_bench                  # -> bench/results/resume_cpu.json

Model: a GPT-2-shaped random model (4 layers, 4 heads, width 128) with the tests' tokenizer,
saved with ``save_pretrained``; ``--task ioi``, ``--steps`` 200, ``--checkpoint-every`` 20,
node masks (the CLI's defaults otherwise). The uninterrupted run first; then, for each
interruption, a fresh run sent the signal once its output folder holds the n-th checkpoint
(SIGKILL after the 1st, 5th and 9th checkpoint, i.e. at steps 20, 100 and 180, or later if
the signal lands while the next steps run; SIGTERM and SIGINT after the 3rd), and resumed
with ``edgeprune prune --resume OUT`` until it ends. Per case: the exit status of the
interrupted process, the step it resumed at, the largest |difference| of every tensor in
masks.safetensors against the uninterrupted run's, whether the circuit's edges are the
same, the largest relative difference of circuit.json's metrics, and whether a staging or
checkpoint folder is left behind. The bench fails (exit 1) if any case differs by more than
1e-6 or changes the circuit.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from bench.common import machine, write_json

ROOT = Path(__file__).resolve().parents[1]
CASES = [("SIGKILL", 1), ("SIGKILL", 5), ("SIGKILL", 9), ("SIGTERM", 3), ("SIGINT", 3)]


def _save_model(folder: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.tasks._task_tokenizer import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=4, n_head=4, n_embd=128, n_positions=64, vocab_size=len(tok),
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    GPT2LMHeadModel(cfg).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def _prune_argv(model: Path, out: Path, steps: int, every: int) -> list[str]:
    return [sys.executable, "-m", "edgeprune_fast.cli", "prune", "--model", str(model), "--task", "ioi",
            "--steps", str(steps), "--checkpoint-every", str(every), "--quiet", "--picture", "none", "--out", str(out)]


def _checkpoint_count(out: Path, seen: set) -> int:
    """Distinct checkpoints written so far (each write replaces the file: its mtime changes)."""
    for p in (out / "checkpoint").glob("train-*/checkpoint.safetensors"):
        try:
            seen.add(p.stat().st_mtime_ns)
        except FileNotFoundError:  # replaced while we looked
            pass
    return len(seen)


def _interrupted(argv: list[str], out: Path, sig: str, after: int) -> tuple[int, float]:
    proc = subprocess.Popen(argv, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen: set = set()
    t0 = time.monotonic()
    while _checkpoint_count(out, seen) < after:
        if proc.poll() is not None:
            raise RuntimeError(f"the run ended before its checkpoint {after}: exit {proc.returncode}\n"
                               f"{proc.stderr.read()[-2000:]}")
        time.sleep(0.02)
    proc.send_signal(getattr(signal, sig))
    proc.communicate(timeout=600)
    return proc.returncode, time.monotonic() - t0


def _compare(out: Path, want: Path) -> dict:
    diffs, metric_rel = [], 0.0
    for masks in want.rglob("masks.safetensors"):
        got, ref = load_file(str(out / masks.relative_to(want))), load_file(str(masks))
        assert got.keys() == ref.keys(), (sorted(got), sorted(ref))
        diffs += [(got[k].double() - ref[k].double()).abs().max().item() for k in ref]
    same_edges = True
    for circuit in want.rglob("circuit.json"):
        got, ref = (json.loads(p.read_text()) for p in (out / circuit.relative_to(want), circuit))
        same_edges &= got["edges"] == ref["edges"]
        for k, v in ref["metrics"].items():
            if isinstance(v, float) and isinstance(got["metrics"].get(k), float):
                metric_rel = max(metric_rel, abs(got["metrics"][k] - v) / max(abs(v), 1e-12))
    files_equal = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == \
        sorted(p.relative_to(want).as_posix() for p in want.rglob("*"))
    return {"max_abs_mask_difference": max(diffs), "same_circuit_edges": same_edges,
            "max_rel_metric_difference": metric_rel, "same_files": files_equal,
            "left_behind": sorted(p.name for p in out.iterdir() if p.name == "checkpoint" or p.name.startswith("."))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--checkpoint-every", type=int, default=20)
    ap.add_argument("--out-name", default="resume_cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = _save_model(root / "model")
        t0 = time.monotonic()
        straight = root / "straight"
        done = subprocess.run(_prune_argv(model, straight, args.steps, args.checkpoint_every), cwd=ROOT, env=_env(),
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"the uninterrupted run failed: {done.stderr[-2000:]}")
        straight_seconds = time.monotonic() - t0
        rows = []
        for i, (sig, after) in enumerate(CASES):
            out = root / f"case{i}"
            code, seconds = _interrupted(_prune_argv(model, out, args.steps, args.checkpoint_every), out, sig, after)
            resumed = subprocess.run([sys.executable, "-m", "edgeprune_fast.cli", "prune", "--resume", str(out),
                                      "--quiet"], cwd=ROOT, env=_env(), capture_output=True, text=True)
            at = re.search(r"resuming at step (\d+)", resumed.stderr)
            row = {"signal": sig, "after_checkpoint": after, "interrupted_exit": code,
                   "seconds_to_signal": round(seconds, 2), "resume_exit": resumed.returncode,
                   "resumed_at_step": int(at.group(1)) if at else None}
            if resumed.returncode == 0:
                row.update(_compare(out, straight))
            else:
                row["resume_stderr"] = resumed.stderr[-1000:]
            print(json.dumps(row), flush=True)
            rows.append(row)
    ok = all(r["resume_exit"] == 0 and r["max_abs_mask_difference"] <= 1e-6 and r["same_circuit_edges"]
             and r["same_files"] and not r["left_behind"] for r in rows)
    payload = {"bench": "resume", "machine": machine(), "what": __doc__.split("\n")[0],
               "settings": {"model": "GPT2Config(n_layer=4, n_head=4, n_embd=128), random weights, the tests' tokenizer",
                            "task": "ioi", "steps": args.steps, "checkpoint_every": args.checkpoint_every},
               "uninterrupted_seconds": round(straight_seconds, 2), "cases": rows,
               "tolerance": 1e-6, "all_equal": ok}
    print(write_json(f"{args.out_name}.json", payload))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
