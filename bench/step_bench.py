"""One full edge-pruning step, ours against the original algorithm and a plain HF floor.

Run from the repository root::

    python -m bench.step_bench            # CPU, full growth sweep (meant for < 10 min on 2 quiet cores)
    python -m bench.step_bench --quick    # CPU, two small points (< 3 min even on a loaded machine)
    python -m bench.step_bench --device cuda --dtype bfloat16 --batch 32 --seq 64

Model: GPT2Config() width (12 heads, d_model 768, vocab 50257) with random weights and
``n_layer`` layers, split embeddings (W = 2 + 13 n_layer writers), node masks, corrupted
ablation, random clean and corrupted token ids [B, S]. Three steps, on the same weights
and inputs in one process:

  ours       EdgePrunedModel: reference() of the clean input (full logits) and of the
             corrupted input (writer states), both plain no-grad HF forwards; the masked
             forward with sampled masks; loss; backward; AdamW on the log_alphas and
             (maximize=True) on the Lagrange multipliers.
  original   bench/original_baseline.py (the original algorithm, op for op as the original
             code runs it: full (W, B, S, D) clean and corrupted tensors, a new full-size
             tensor per write, reads over all W slots): two extra disentangled no-grad
             passes, the masked pass, the same loss, backward and optimiser steps.
  hf_floor   the plain HF reference point: three forwards and one backward of the unmodified
             model on the same batch (two no-grad forwards of the clean and corrupted input,
             one forward with grad, the same KL, backward). The weights stay frozen, as in a
             pruning step, and the gradient flows to the input embeddings: the least work a
             step needs. ``hf_floor_weight_grads`` is the same with weight gradients too
             (the HF model's default), recorded for comparison.

Loss in all three: KL(p_full || p_model) over every position and the full vocabulary, plus
the Lagrangian l1 (t - s) + l2 (t - s)^2 for edges and nodes (ARCHITECTURE.md §2; t = 0.5).

Time: median wall time of ``--reps`` steps after one warm-up step (fewer where one step is
slow: the timed steps of a method at a point stop at ``--method-seconds``, the original's at
``--baseline-seconds``; at least one). On the CPU each method runs in a fresh process of its
own, with glibc's default malloc, as users run it: in one shared process each method's
speed depended on the allocator state the others left (the same step varied by 30 %).
``--rounds N`` runs those processes N times, the methods in turn, and takes the median of
all their steps: the machine drifts between processes (a method's median moved by up to
20 % from one run to the next), and alternating spreads the drift over every method. On
CUDA the methods share the process and are timed in turn (round robin). Memory:
peak above the level at the start of a step (bench/common.py ``PeakMemory``), after one
warm-up step: ``max_memory_allocated`` on CUDA, in the same process; on the CPU the resident
high-water mark, measured in a child process (``--child peaks``) whose malloc mmap threshold
is fixed, so that every large freed tensor goes back to the OS and cannot hide a later peak
(glibc's default keeps freed memory resident and reuses it, which makes RSS peaks
meaningless). That fixed threshold makes every large allocation fault its pages in anew,
which costs time in every method (most in ours: many large short-lived tensors); the
child's step times are recorded as ``seconds_fixed_malloc`` beside the timed ones. The
weights are loaded before and shared, so they are not part of the peaks. Timing on a shared
machine is noisy: compare methods only within one run.

GPU (``--device cuda``): one point (12 layers unless ``--layers``), peaks from
``torch.cuda.max_memory_allocated``, the GPU's name in the results (``machine.gpu``), target
ours <= 0.1 s per step at batch 32, seq 64, bf16. Not yet run: no GPU was lent when this
was written.

Writer-tensor units. One writer tensor is W*B*S*D*bytes, the original's (W, B, S, D) state.
"The memory that grows with the writer states", per method, is the least-squares slope of
(peak - hf_floor peak) against the batch size over the batch sweep, divided by the writer
tensor's size per batch element (W*S*D*bytes): how many writer-sized tensors the method keeps
beyond what the plain model's own step needs (logits, KL, activations). The raw slope of the
peak alone (without subtracting the floor) is reported beside it; per point,
``excess_writer_units`` = (peak - hf_floor peak) / writer tensor.

Growth sweeps (CPU, seq 32, fp32): batch 1, 4, 8, 16 at 12 layers; depth 2, 4, 8, 12 at
batch 8. The original is skipped where its expected peak (42 writer tensors, its measured
ratio) exceeds ``--baseline-max-gb``; skipped points are listed in the results with the reason.
Results: bench/results/step_<device>[_quick].json and .csv, PNG plots beside them.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

from bench.common import MALLOC_ENV, RESULTS, PeakMemory, machine, reexec_with_fixed_malloc, write_json

TARGET_SPARSITY = 0.5
METHODS = ("hf_floor", "hf_floor_weight_grads", "ours", "ours_checkpointed", "original")
ORIGINAL_WRITER_UNITS = 42  # the original's peak / writer tensor, measured (ARCHITECTURE.md §3: 1.4 GB + 41.5)


@dataclass(frozen=True)
class Point:
    n_layer: int
    batch: int
    seq: int
    sweep: str  # "batch", "depth" or "single"


def kl(logits: torch.Tensor, full_logits: torch.Tensor) -> torch.Tensor:
    return F.kl_div(logits.float().log_softmax(-1), full_logits.float().log_softmax(-1), log_target=True,
                    reduction="batchmean")


def lagrangian(lambdas: torch.Tensor, s_edge: torch.Tensor, s_node: torch.Tensor) -> torch.Tensor:
    ge, gn = TARGET_SPARSITY - s_edge, TARGET_SPARSITY - s_node
    return lambdas[0] * ge + lambdas[1] * ge * ge + lambdas[2] * gn + lambdas[3] * gn * gn


def optimizers(params: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[torch.optim.Optimizer, ...]]:
    lambdas = torch.zeros(4, device=params[0].device, requires_grad=True)
    return lambdas, (torch.optim.AdamW(params, lr=0.1), torch.optim.AdamW([lambdas], lr=0.1, maximize=True))


def ours_step(hf, checkpoint_layers: bool = False):
    from edgeprune_fast.model import EdgePrunedModel

    pruned = EdgePrunedModel.from_hf(hf, split_embeds=True, node_masks=True, ablation="corrupted",
                                     checkpoint_layers=checkpoint_layers).train()
    lambdas, opts = optimizers(pruned.edge_log_alpha_parameters() + pruned.node_log_alpha_parameters())

    def step(ids, cids):
        with record_function("phase: reference passes"):
            full_logits, _ = pruned.reference(ids, states=False)
            _, corrupted = pruned.reference(cids, logits=False)
        with record_function("phase: masked forward"):
            out = pruned(ids, corrupted_writers=corrupted, training=True)
            del corrupted  # backward never reads them; the model let go of them after the forward
        with record_function("phase: loss"):
            loss = kl(out.logits, full_logits) + lagrangian(lambdas, out.edge_sparsity, out.node_sparsity)
        with record_function("phase: backward"):
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            loss.backward()
        with record_function("phase: optimizer"):
            for opt in opts:
                opt.step()
        return float(loss.detach())

    return step, pruned


def original_step(hf):
    from bench.original_baseline import OriginalGPT2

    base = OriginalGPT2(hf)
    dev = hf.device
    # log_alpha ~ N(10, 0.01), as ours (EdgeMasks' default init)
    log_alphas = {r: (10 + 0.01 * torch.randn(base.W, device=dev)).requires_grad_() for r in base.readers}
    node = (10 + 0.01 * torch.randn(base.W, device=dev)).requires_grad_()
    lambdas, opts = optimizers([*log_alphas.values(), node])

    def step(ids, cids):
        return base.step(ids, cids, log_alphas, node, lambdas, TARGET_SPARSITY, opts)

    return step


def hf_floor_step(hf, weight_grads: bool):
    def step(ids, cids):
        with torch.no_grad():
            full_logits = hf(ids).logits
            hf(cids)
        emb = hf.transformer.wte(ids).detach().requires_grad_()
        hf.requires_grad_(weight_grads)
        try:
            loss = kl(hf(inputs_embeds=emb).logits, full_logits)
            loss.backward()
        finally:
            hf.requires_grad_(False)
            hf.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def timed_step(step, ids, cids, device: str) -> tuple[float, int, float]:
    """(wall seconds, peak bytes above the start, process CPU seconds) of one step."""
    gc.collect()
    with PeakMemory(device) as pm:
        if device == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        step(ids, cids)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return seconds, pm.peak_bytes, cpu


def measure(steps: dict, ids, cids, *, reps: int, device: str, budgets: dict[str, float]) -> tuple[dict, dict]:
    """Warm every step up once, then time ``reps`` steps of each, taking the methods in turn
    (round robin: a slow spell of a shared machine falls on all of them, not on one); a method
    whose warm-up took longer than budgets[name] / reps runs fewer (at least one). Returns
    ({name: result}, {name: why it failed})."""
    results, failed, runs, want = {}, {}, {}, {}
    for name, step in steps.items():
        try:
            warm = timed_step(step, ids, cids, device)[0]
        except Exception as exc:  # out of GPU memory, a backend that fails: record, go on with the others
            failed[name] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
            continue
        runs[name], want[name] = [], max(1, min(reps, int(budgets[name] // max(warm, 1e-9))))
        results[name] = {"warmup_seconds": round(warm, 4)}
    for _ in range(reps):
        for name in [n for n in runs if len(runs[n]) < want[n]]:
            runs[name].append(timed_step(steps[name], ids, cids, device))
    for name, rs in runs.items():
        results[name].update(seconds=statistics.median(r[0] for r in rs), seconds_all=[round(r[0], 4) for r in rs],
                             cpu_seconds=round(statistics.median(r[2] for r in rs), 4),
                             peak_bytes=int(statistics.median(r[1] for r in rs)), peak_bytes_max=max(r[1] for r in rs),
                             reps=len(rs))
    return results, failed


def run_child(p: Point, args, methods: list[str], mode: str) -> tuple[list[dict], list[dict]]:
    """Measure ``methods`` at one CPU point in a fresh process: ``mode`` "time" with glibc's
    default malloc, "peaks" with the fixed mmap threshold (one step after the warm-up). A
    child that fails gives a skipped entry per method, with its error."""
    cmd = [sys.executable, "-m", "bench.step_bench", "--child", mode, "--layers", str(p.n_layer), "--batch",
           str(p.batch), "--seq", str(p.seq), "--dtype", args.dtype, "--threads", str(args.threads), "--reps",
           str(args.reps), "--method-seconds", str(args.method_seconds), "--baseline-seconds",
           str(args.baseline_seconds), "--methods", ",".join(methods), "--baseline-max-gb", str(args.baseline_max_gb)]
    cmd += ["--backend", args.backend] if args.backend else []
    cmd += ["--no-baseline"] if args.no_baseline else []
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
    env.update(MALLOC_ENV if mode == "peaks" else {})
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=RESULTS.parent.parent)
    lines = out.stdout.strip().splitlines()
    if out.returncode == 0 and lines:
        got = json.loads(lines[-1])
        for r in got["rows"] + got["skipped"]:
            r["sweep"] = p.sweep  # the child measured it as a single point
        return got["rows"], got["skipped"]
    why = f"the --child {mode} process exited {out.returncode}: {out.stderr.strip()[-300:]}"
    return [], [{"sweep": p.sweep, "n_layer": p.n_layer, "batch": p.batch, "seq": p.seq, "method": m, "reason": why}
                for m in methods]


def measure_point(p: Point, args, dtype: torch.dtype, methods: list[str],
                  config: dict | None = None) -> tuple[list[dict], list[dict]]:
    """``methods`` at one point, in this process (see ``measure``). ``config``: GPT2Config
    arguments beyond n_layer (default: GPT-2 small's width)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from edgeprune_fast.ops import backends

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=p.n_layer, **(config or {}))
    hf = GPT2LMHeadModel(cfg).to(args.device, dtype).eval().requires_grad_(False)
    V, D = hf.config.vocab_size, hf.config.n_embd
    ids = torch.randint(0, V, (p.batch, p.seq), device=args.device)
    cids = torch.randint(0, V, (p.batch, p.seq), device=args.device)
    step, pruned = ours_step(hf)
    W = pruned.graph.n_writers
    writer_bytes = W * p.batch * p.seq * D * hf.dtype.itemsize
    common = {"device": args.device, "dtype": args.dtype, "sweep": p.sweep, "n_layer": p.n_layer, "batch": p.batch, "seq": p.seq, "n_writers": W,
              "n_edges": pruned.graph.n_edges, "writer_tensor_bytes": writer_bytes,
              "edge_mix_backend": backends.choose("edge_mix", [ids.new_zeros(1, dtype=dtype)]).name}
    rows, skipped = [], []
    makers = {"hf_floor": lambda: hf_floor_step(hf, weight_grads=False),
              "hf_floor_weight_grads": lambda: hf_floor_step(hf, weight_grads=True),
              "ours": lambda: step,
              "ours_checkpointed": lambda: ours_step(hf, checkpoint_layers=True)[0],
              "original": lambda: original_step(hf)}
    steps, budgets = {}, {}
    for name in methods:
        if name == "original":
            need_gb = ORIGINAL_WRITER_UNITS * writer_bytes / 1e9
            if args.no_baseline or need_gb > args.baseline_max_gb:
                why = "--no-baseline" if args.no_baseline else (
                    f"expected peak ~{need_gb:.1f} GB ({ORIGINAL_WRITER_UNITS} writer tensors) > --baseline-max-gb "
                    f"{args.baseline_max_gb}")
                skipped.append({**common, "method": name, "reason": why})
                print(f"  {name:<22} skipped: {why}", flush=True)
                continue
        steps[name] = makers[name]()
        budgets[name] = args.baseline_seconds if name == "original" else args.method_seconds
    results, failed = measure(steps, ids, cids, reps=args.reps, device=args.device, budgets=budgets)
    del steps
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    for name, why in failed.items():
        skipped.append({**common, "method": name, "reason": why})
        print(f"  {name:<22} failed: {why}", flush=True)
    for name, r in results.items():
        rows.append({**common, "method": name, **r})
        print(f"  {name:<22} {r['seconds']:8.3f} s ({r['cpu_seconds']:8.3f} s CPU; {r['reps']} reps)", flush=True)
    return rows, skipped


def time_in_rounds(p: Point, args, methods: list[str]) -> tuple[list[dict], list[dict]]:
    """CPU step times: every method in a fresh process of its own, the methods taken in turn,
    ``--rounds`` times over, so that a slow spell of the shared machine falls on all of them.
    Per method, ``seconds`` is the median of all timed steps of all rounds; ``seconds_rounds``
    keeps each round's median, ``seconds_all`` every step."""
    got: dict[str, list[dict]] = {}
    skipped: list[dict] = []
    for rnd in range(args.rounds):
        for name in [m for m in methods if m not in {x["method"] for x in skipped}]:
            r, s = run_child(p, args, [name], "time")
            skipped += s
            for x in r:
                got.setdefault(name, []).append(x)
                print(f"  {name:<22} {x['seconds']:8.3f} s ({x['cpu_seconds']:8.3f} s CPU; {x['reps']} reps"
                      f"{f'; round {rnd + 1}' if args.rounds > 1 else ''})", flush=True)
            for x in s:
                print(f"  {name:<22} skipped: {x['reason']}", flush=True)
    rows = []
    for runs in got.values():
        row = dict(runs[0])
        steps = [t for x in runs for t in x["seconds_all"]]
        row.update(seconds=statistics.median(steps), seconds_all=steps,
                   seconds_rounds=[round(x["seconds"], 4) for x in runs],
                   cpu_seconds=round(statistics.median(x["cpu_seconds"] for x in runs), 4),
                   reps=len(steps), rounds=len(runs))
        rows.append(row)
    return rows, skipped


def run_point(p: Point, args, dtype: torch.dtype, main_point: bool) -> tuple[list[dict], list[dict]]:
    """All methods at one point (hf_floor_weight_grads only at the main point, for comparison).
    CUDA: in this process. CPU: each method timed in a fresh process of its own (so that no
    method runs on the allocator state another left), then all peaks in one more (``run_child``)."""
    methods = [m for m in args.methods if m != "hf_floor_weight_grads" or main_point]
    if args.device == "cuda":
        rows, skipped = measure_point(p, args, dtype, methods)
    else:
        rows, skipped = time_in_rounds(p, args, methods)
        if rows:
            peaks, s = run_child(p, args, [r["method"] for r in rows], "peaks")
            by_method = {r["method"]: r for r in peaks}
            for r in list(rows):
                got = by_method.get(r["method"])
                if got is None:
                    skipped += [x for x in s if x["method"] == r["method"]] or [
                        {**{k: r[k] for k in ("sweep", "n_layer", "batch", "seq")}, "method": r["method"],
                         "reason": "peak not measured"}]
                    rows.remove(r)
                    continue
                r.update(peak_bytes=got["peak_bytes"], peak_bytes_max=got["peak_bytes_max"],
                         seconds_fixed_malloc=round(got["seconds"], 4))
    for r in rows:
        print(f"  {r['method']:<22} peak {r['peak_bytes'] / 1e9:6.3f} GB "
              f"({r['peak_bytes'] / r['writer_tensor_bytes']:5.1f} writer tensors)", flush=True)
    floor = next((r for r in rows if r["method"] == "hf_floor"), None)
    for r in rows:
        if floor is not None:
            r["excess_writer_units"] = round((r["peak_bytes"] - floor["peak_bytes"]) / r["writer_tensor_bytes"], 2)
            r["time_over_hf_floor"] = round(r["seconds"] / floor["seconds"], 3)
            r["cpu_time_over_hf_floor"] = round(r["cpu_seconds"] / floor["cpu_seconds"], 3)
    return rows, skipped


def profile_ours(p: Point, args, dtype: torch.dtype, stem: str) -> str:
    """torch.profiler over one step of ours (after a warm-up): time per phase and the top ops."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=p.n_layer)).to(args.device, dtype).eval().requires_grad_(False)
    ids = torch.randint(0, hf.config.vocab_size, (p.batch, p.seq), device=args.device)
    cids = torch.randint(0, hf.config.vocab_size, (p.batch, p.seq), device=args.device)
    lines = profile_lines(ours_step(hf)[0], ids, cids, args.device,
                          f"ours, one step: {p.n_layer} layers, batch {p.batch}, seq {p.seq}, {args.dtype}, "
                          f"{args.device}")
    path = RESULTS / f"{stem}_profile.txt"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:9]), flush=True)
    return str(path.relative_to(RESULTS.parent.parent))


def profile_lines(step, ids, cids, device: str, title: str, row_limit: int = 30) -> list[str]:
    """One warm-up step, then one under torch.profiler: the time per labelled phase and the
    top ops (by CUDA time on the GPU, CPU time otherwise), as text lines."""
    from edgeprune_fast.ops import backends

    step(ids, cids)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        step(ids, cids)
    events = prof.key_averages()
    phases = sorted((e for e in events if e.key.startswith("phase: ")), key=lambda e: -e.cpu_time_total)
    total = sum(e.cpu_time_total for e in phases)
    backend = backends.choose("edge_mix", [ids.new_zeros(1, dtype=torch.float32)]).name
    lines = [f"{title}, edge_mix backend {backend}", "", "wall time per phase (CPU time of the labelled ranges):"]
    lines += [f"  {e.key[7:]:<18} {e.cpu_time_total / 1e6:8.3f} s  {100 * e.cpu_time_total / total:5.1f} %" for e in phases]
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    return lines + ["", events.table(sort_by=sort, row_limit=row_limit)]


def slope(xs: list[float], ys: list[float]) -> float | None:
    if len(set(xs)) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def writer_growth(rows: list[dict]) -> dict:
    """Per method: slope of peak (and of peak - hf_floor peak) against batch over the batch
    sweep, in writer tensors (see the module docstring)."""
    sweep = [r for r in rows if r["sweep"] == "batch"]
    floor = {r["batch"]: r["peak_bytes"] for r in sweep if r["method"] == "hf_floor"}
    out = {}
    for method in sorted({r["method"] for r in sweep}):
        pts = sorted((r["batch"], r["peak_bytes"], r["writer_tensor_bytes"] / r["batch"]) for r in sweep
                     if r["method"] == method and r["batch"] in floor)
        if len(pts) < 2:
            continue
        per_b = pts[0][2]
        raw = slope([b for b, _, _ in pts], [p for _, p, _ in pts])
        excess = slope([b for b, _, _ in pts], [p - floor[b] for b, p, _ in pts])
        out[method] = {"batches": [b for b, _, _ in pts], "raw_writer_units": round(raw / per_b, 2),
                       "excess_over_hf_floor_writer_units": round(excess / per_b, 2)}
    return out


def targets(rows: list[dict], growth: dict, at: tuple[int, int]) -> dict:
    """The issue's targets at (n_layer, batch) = ``at``, for ours and ours_checkpointed."""
    pick = {r["method"]: r for r in rows if (r["n_layer"], r["batch"]) == at and r["sweep"] != "depth"}
    out: dict = {"at": {"n_layer": at[0], "batch": at[1]}}
    for name in ("ours", "ours_checkpointed"):
        if name not in pick:
            continue
        ours, t = pick[name], {}
        if "original" in pick:
            base = pick["original"]
            t["speedup_vs_original"] = {"value": round(base["seconds"] / ours["seconds"], 2), "target": ">= 6"}
            t["peak_ratio_vs_original"] = {"value": round(ours["peak_bytes"] / base["peak_bytes"], 3),
                                           "target": "<= 0.5"}
        if "original" in pick and "cpu_seconds" in ours:  # process CPU time: less sensitive to other load
            t["speedup_vs_original_cpu_time"] = {"value": round(base["cpu_seconds"] / ours["cpu_seconds"], 2),
                                                 "target": ">= 6"}
        if "hf_floor" in pick:
            floor = pick["hf_floor"]
            t["time_over_hf_floor"] = {"value": round(ours["seconds"] / floor["seconds"], 3), "target": "<= 1.5"}
            if "cpu_seconds" in ours:
                t["time_over_hf_floor_cpu_time"] = {"value": round(ours["cpu_seconds"] / floor["cpu_seconds"], 3),
                                                    "target": "<= 1.5"}
        if name in growth:
            t["writer_growth"] = {"value": growth[name]["excess_over_hf_floor_writer_units"], "target": "<= 4"}
        if ours["device"] == "cuda":
            t["step_seconds"] = {"value": round(ours["seconds"], 4), "target": "<= 0.1"}
        for v in t.values():
            op, bound = v["target"].split()
            v["met"] = v["value"] >= float(bound) if op == ">=" else v["value"] <= float(bound)
        out[name] = t
    if "original" in growth:
        out["original"] = {"writer_growth": {"value": growth["original"]["excess_over_hf_floor_writer_units"],
                                             "reported_for_the_original_code": "about 41 (peak - 1.4 GB)"}}
    return out


def plot(rows: list[dict], stem: str) -> list[str]:
    """Two PNGs (time, memory), each with the batch sweep and the depth sweep side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_batch = [r for r in rows if r["sweep"] == "batch"]
    # the depth sweep shares its batch-8 point with the batch sweep
    by_depth = [r for r in rows if r["sweep"] == "depth"]
    by_depth += [r for r in by_batch if by_depth and r["batch"] == by_depth[0]["batch"]]
    sweeps = [(x, label, pts) for x, label, pts in (
        ("batch", f"batch ({by_batch[0]['n_layer'] if by_batch else '?'} layers)", by_batch),
        ("n_layer", f"layers (batch {by_depth[0]['batch'] if by_depth else '?'})", by_depth)) if pts]
    paths = []
    for key, label, scale, name in (("seconds", "seconds per step", 1.0, "time"),
                                    ("peak_bytes", "peak memory above start (GB)", 1e-9, "memory")):
        fig, axes = plt.subplots(1, len(sweeps), figsize=(5.5 * len(sweeps), 4), squeeze=False)
        axes = axes[0]
        for ax, (x, xlabel, pts) in zip(axes, sweeps):
            for method in METHODS:
                mp = sorted((r[x], r[key] * scale) for r in pts if r["method"] == method)
                if mp:
                    ax.plot(*zip(*mp), marker="o", label=method)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"one edge-pruning step, GPT-2-small width, seq {rows[0]['seq']}, fp32, CPU")
        fig.tight_layout()
        path = RESULTS / f"{stem}_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(str(path.relative_to(RESULTS.parent.parent)))
    return paths


def points(args) -> list[Point]:
    if args.device == "cuda" or args.batch is not None:
        return [Point(args.layers, args.batch or 32, args.seq, "single")]
    if args.quick:
        return [Point(2, 1, args.seq, "batch"), Point(2, 4, args.seq, "batch")]
    # the targets' point (12 layers, batch 8) first, so that an interrupted run has it
    return [Point(12, b, args.seq, "batch") for b in (8, 1, 4, 16)] + \
        [Point(n, 8, args.seq, "depth") for n in (2, 4, 8)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="two small CPU points (2 layers, batch 1 and 4)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=None, help="one point at this batch (default on CUDA: 32)")
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--layers", type=int, default=12, help="layers of the single point (--batch or CUDA)")
    ap.add_argument("--reps", type=int, default=None, help="timed steps after warm-up (default 3 on CPU, 10 on CUDA)")
    ap.add_argument("--method-seconds", type=float, default=30.0,
                    help="time budget per point and method for the timed steps after warm-up (at least one runs)")
    ap.add_argument("--baseline-seconds", type=float, default=60.0,
                    help="the same for the original")
    ap.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS),
                    help=f"comma-separated subset of {','.join(METHODS)}")
    ap.add_argument("--out", default=None, help="results file stem (default step_<device>[_quick])")
    ap.add_argument("--baseline-max-gb", type=float, default=None,
                    help="skip the original where its expected peak is larger (default: 8 on CPU, 80%% of the GPU)")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--profile", action="store_true", help="also profile one step of ours at the first point")
    ap.add_argument("--backend", default=None, choices=["triton", "cpp", "reference"],
                    help="force the ops' backend for the whole run (default: the automatic choice)")
    ap.add_argument("--child", choices=("time", "peaks"), default=None,
                    help="(internal) CPU: measure one point in this process and print its rows as JSON: 'time' "
                         "with the default malloc, 'peaks' (one step after the warm-up) with a fixed mmap threshold")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="CPU: time every method this many times, in turn, each in a fresh process (default 1)")
    args = ap.parse_args()
    if unknown := set(args.methods) - set(METHODS):
        ap.error(f"--methods: expected names from {', '.join(METHODS)}, got {', '.join(sorted(unknown))}")
    if args.child:
        if args.device != "cpu" or args.batch is None:
            ap.error("--child: expected --device cpu and --batch (one point)")
        if args.child == "peaks":
            reexec_with_fixed_malloc()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rounds < 1:
        ap.error(f"--rounds: expected a positive integer, got {args.rounds}")
    if args.reps is None:
        args.reps = 10 if args.device == "cuda" else 2 if args.quick else 3
    if args.baseline_max_gb is None:
        args.baseline_max_gb = 8.0 if args.device == "cpu" else \
            round(0.8 * torch.cuda.get_device_properties(0).total_memory / 1e9, 1)
    from edgeprune_fast.ops import use_backend

    dtype = getattr(torch, args.dtype)
    if args.child:  # run_child's process: JSON on the last line
        if args.child == "peaks":
            args.reps, args.method_seconds, args.baseline_seconds = 1, 0.0, 0.0
        with use_backend(args.backend):
            rows, skipped = measure_point(Point(args.layers, args.batch, args.seq, "single"), args, dtype,
                                          args.methods)
        print(json.dumps({"rows": rows, "skipped": skipped}))
        return
    started = time.time()
    stem = args.out or f"step_{args.device}" + ("_quick" if args.quick else "")
    pts = points(args)
    at = (12, 8) if any((p.n_layer, p.batch) == (12, 8) for p in pts) else (pts[-1].n_layer, pts[-1].batch)
    cmd = "python -m bench.step_bench " + " ".join(sys.argv[1:])  # exactly as run
    payload = {
        "benchmark": "step_bench",
        "what": "one full edge-pruning step (reference passes + masked forward + KL/Lagrangian + backward + "
                "AdamW) for ours, the original algorithm, and the plain HF floor; see bench/step_bench.py",
        "command": cmd,
        "complete": False,
        "config": {"model": "GPT2Config() width, random weights", "dtype": args.dtype, "device": args.device,
                   "split_embeds": True, "node_masks": True, "ablation": "corrupted", "reps": args.reps,
                   "forced_backend": args.backend, "method_seconds": args.method_seconds,
                   "baseline_seconds": args.baseline_seconds, "baseline_max_gb": args.baseline_max_gb,
                   "torch_threads": torch.get_num_threads()},
        "memory_method": ("torch.cuda.max_memory_allocated above the allocation at the start" if args.device == "cuda"
                          else "RSS high-water mark (VmHWM) above RSS at the start of a step after one warm-up, reset "
                               "via /proc/self/clear_refs, in a child process with MALLOC_MMAP_THRESHOLD_=65536, "
                               "MALLOC_TRIM_THRESHOLD_=0 (its step times: seconds_fixed_malloc)"),
        "time_method": "median wall time after one warm-up step" + (
            "" if args.device == "cuda" else ", glibc's default malloc (as users run)"),
        "writer_units": "writer tensor = W*B*S*D*bytes; growth = slope of (peak - hf_floor peak) vs batch / "
                        "(W*S*D*bytes); raw = slope of peak vs batch / (W*S*D*bytes)",
        "machine": machine(),
    }
    rows, skipped = [], []

    def save() -> None:  # after every point, so that an interrupted run keeps what it measured
        growth = writer_growth(rows)
        payload.update(targets=targets(rows, growth, at), writer_growth=growth, rows=rows, skipped=skipped,
                       wall_seconds=round(time.time() - started, 1))
        write_json(f"{stem}.json", payload)
        keys = ["method", "sweep", "n_layer", "batch", "seq", "n_writers", "seconds", "cpu_seconds", "peak_bytes",
                "writer_tensor_bytes", "excess_writer_units", "time_over_hf_floor", "reps", "edge_mix_backend"]
        with open(RESULTS / f"{stem}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    with use_backend(args.backend):
        for p in pts:
            print(f"{p.sweep}: {p.n_layer} layers, batch {p.batch}, seq {p.seq}, {args.dtype}, {args.device}",
                  flush=True)
            r, s = run_point(p, args, dtype, main_point=(p.n_layer, p.batch) == at or args.quick)
            rows += r
            skipped += s
            save()
        if args.profile:
            payload["profile"] = profile_ours(next(p for p in pts if (p.n_layer, p.batch) == at), args, dtype, stem)
    if args.device == "cpu" and any(r["sweep"] != "single" for r in rows):
        payload["plots"] = plot(rows, stem)
    payload["complete"] = True
    save()
    print(f"targets: {json.dumps(payload['targets'], indent=1)}\nwriter growth: {payload['writer_growth']}\n"
          f"{RESULTS / (stem + '.json')}", flush=True)


if __name__ == "__main__":
    main()
