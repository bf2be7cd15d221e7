"""bench/step_bench.py: its three steps run on a tiny GPT-2, and its writer-growth and target
arithmetic does what its docstring defines (the timings themselves are never tested)."""

from __future__ import annotations

import math

import torch

from bench.step_bench import hf_floor_step, original_step, ours_step, targets, writer_growth
from tests.models._tiny import VOCAB, tiny_model


def test_every_step_runs_and_moves_its_parameters():
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    cids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    hf = tiny_model("gpt2").requires_grad_(False)
    for make in (lambda: ours_step(hf)[0], lambda: ours_step(hf, checkpoint_layers=True)[0],
                 lambda: original_step(hf), lambda: hf_floor_step(hf, False), lambda: hf_floor_step(hf, True)):
        loss = make()(ids, cids)
        assert math.isfinite(loss)
    assert not any(p.requires_grad or p.grad is not None for p in hf.parameters())  # the floor restores its model
    # the second step's loss reaches every mask parameter (the first moved the Lagrange multipliers)
    step, pruned = ours_step(hf)
    step(ids, cids)
    step(ids, cids)
    params = pruned.edge_log_alpha_parameters() + pruned.node_log_alpha_parameters()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params)


def _row(method, batch, peak, W=10, S=4, D=8):
    return {"method": method, "sweep": "batch", "n_layer": 12, "batch": batch, "seconds": 1.0, "device": "cpu",
            "peak_bytes": peak, "writer_tensor_bytes": W * batch * S * D * 4}


def test_writer_growth_is_the_excess_slope_in_writer_tensors():
    unit = 10 * 4 * 8 * 4  # writer tensor bytes per batch element
    rows = []
    for b in (1, 4, 8):
        rows += [_row("hf_floor", b, 1000 + 3 * unit * b), _row("ours", b, 5000 + 5 * unit * b),
                 _row("original", b, 9000 + 40 * unit * b)]
    g = writer_growth(rows)
    assert g["ours"]["excess_over_hf_floor_writer_units"] == 2.0 and g["ours"]["raw_writer_units"] == 5.0
    assert g["original"]["excess_over_hf_floor_writer_units"] == 37.0
    t = targets(rows, g, (12, 8))
    assert t["ours"]["writer_growth"] == {"value": 2.0, "target": "<= 4", "met": True}
    assert t["ours"]["peak_ratio_vs_original"]["met"] is True
    assert t["ours"]["speedup_vs_original"] == {"value": 1.0, "target": ">= 6", "met": False}


def test_rounds_alternate_the_methods_and_pool_their_steps(monkeypatch):
    """--rounds: each method's child runs once per round, the methods in turn; seconds is the
    median of every step of every round, seconds_rounds each round's median. A method whose
    child fails is skipped, with its reason, and not run again."""
    from types import SimpleNamespace

    from bench import step_bench

    calls, times = [], {"ours": iter([[3.0, 3.2], [2.0, 2.1]]), "original": iter([[20.0, 21.0], [18.0, 19.0]])}

    def fake_child(p, args, methods, mode):
        (name,) = methods
        calls.append(name)
        if name == "hf_floor":
            return [], [{"method": name, "reason": "the --child time process exited 1"}]
        steps = next(times[name])
        return [{"method": name, "seconds": sorted(steps)[len(steps) // 2], "seconds_all": steps,
                 "cpu_seconds": 2 * steps[0], "reps": len(steps)}], []

    monkeypatch.setattr(step_bench, "run_child", fake_child)
    point = step_bench.Point(12, 8, 32, "single")
    rows, skipped = step_bench.time_in_rounds(point, SimpleNamespace(rounds=2), ["hf_floor", "ours", "original"])
    assert calls == ["hf_floor", "ours", "original", "ours", "original"]
    assert [s["method"] for s in skipped] == ["hf_floor"]
    by = {r["method"]: r for r in rows}
    assert by["ours"]["seconds"] == 2.55 and by["ours"]["seconds_all"] == [3.0, 3.2, 2.0, 2.1]
    assert by["ours"]["seconds_rounds"] == [3.2, 2.1] and by["ours"]["reps"] == 4 and by["ours"]["rounds"] == 2
    assert by["original"]["seconds"] == 19.5 and by["original"]["cpu_seconds"] == 38.0
