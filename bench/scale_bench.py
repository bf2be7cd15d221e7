"""Peak memory of one edge-pruning step against model size, beside the planner's prediction.

Run from the repository root::

    python -m bench.scale_bench                      # CPU sweep -> bench/results/scale_cpu.json + .png
    python -m bench.scale_bench --one '{"n_layers": 2, ...}'   # one point, JSON on stdout (tests)
    python -m bench.scale_bench --device cuda        # GPU: the largest Llama shape that fits, step time

Models: LlamaConfig-shaped random models (GQA with n_heads / 2 KV heads, d_mlp = 8/3
d_model rounded to 64, vocab 4096 on the CPU) of growing depth and width, node masks,
corrupted ablation. One step (the planner's scope, edgeprune_fast/plan.py): reference
forwards of the clean input (full logits) and the corrupted input (writer states), the
edge-pruned forward with sampled masks, KL over every position and the vocabulary plus the
sparsity terms, backward, AdamW on the log_alphas.

Memory: a warm-up step first (lazy allocations, AdamW's moments), then the peak of one
step above the level before it (bench/common.py ``PeakMemory``: the RSS high-water mark
with a fixed malloc threshold on the CPU, ``max_memory_allocated`` on CUDA). The weights
and the mask parameters exist before the step; the AdamW moments exist from the warm-up
step; so ``measured`` is compared with the planner's peak minus the weights, the
log_alphas and their moments (``predicted_step``).

CUDA mode (not yet run: no GPU on the machine that wrote this): Llama shapes with 40 heads
and d_model 5120 of growing depth at batch 1, seq 64, bf16, activation checkpointing,
random weights built on the device; for each, the planner's prediction, the measured peak
and the median step time, until a model does not fit.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time

import torch
import torch.nn.functional as F

from bench.common import RESULTS, PeakMemory, machine, median_time, reexec_with_fixed_malloc, write_json

CPU_SWEEP = [  # (layers, heads, d_model): depth, then width
    (2, 8, 256), (4, 8, 256), (8, 8, 256), (12, 8, 256),
    (4, 8, 512), (4, 16, 768), (4, 16, 1024),
]


def llama_shape(n_layers: int, n_heads: int, d_model: int, vocab: int) -> dict:
    d_mlp = max(64, round(8 * d_model / 3 / 64) * 64)
    return {"n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": max(1, n_heads // 2), "d_model": d_model,
            "d_mlp": d_mlp, "vocab": vocab}


def build(point: dict, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    from edgeprune_fast.model import EdgePrunedModel

    if "config" in point:  # a real model's config.json values (bench/gpu_check.py: Llama-3.1-8B)
        cfg = LlamaConfig.from_dict(point["config"])
    else:
        cfg = LlamaConfig(num_hidden_layers=point["n_layers"], num_attention_heads=point["n_heads"],
                          num_key_value_heads=point["n_kv_heads"], hidden_size=point["d_model"],
                          intermediate_size=point["d_mlp"], vocab_size=point["vocab"],
                          max_position_embeddings=max(128, point["seq"]))
    dtype, default = getattr(torch, point["dtype"]), torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)  # built in the model dtype, on the device: no float32 copy of a large model
    try:
        with torch.device(device):
            hf = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    pruned = EdgePrunedModel.from_hf(hf, checkpoint_layers=point.get("checkpoint_layers", False),
                                     corrupted_on_cpu=point.get("corrupted_on_cpu", False),
                                     kv_per_query_head=point.get("kv_per_query_head", False)).train()
    return cfg, pruned


def make_step(pruned, point: dict, device: str):
    V, B, S = point["vocab"], point["batch"], point["seq"]
    ids = torch.randint(0, V, (B, S), device=device)
    cids = torch.randint(0, V, (B, S), device=device)
    opt = torch.optim.AdamW(pruned.edge_log_alpha_parameters() + pruned.node_log_alpha_parameters(), lr=0.1)
    cached = point.get("cache_references", True)

    def step() -> float:
        full_logits = pruned.reference(ids, states=False)[0]  # indexing, not unpacking: nothing else stays alive
        corrupted = pruned.reference(cids, logits=False)[1]
        out = pruned(ids, corrupted_writers=corrupted, training=True)
        kl = F.kl_div(out.logits.float().log_softmax(-1), full_logits.float().log_softmax(-1), log_target=True,
                      reduction="batchmean")
        loss = kl + out.edge_sparsity + out.node_sparsity
        if not cached:  # let go before backward, as the Trainer with cache_references=False
            del corrupted
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(kl.detach())

    return step


def make_attribution(pruned, point: dict, device: str):
    """``point["attribute"]`` (eap-ig or eap-ig-activations): one batch attributed with the KL
    metric at the last position, 2 IG steps, instead of a training step (the plan's claim
    that attribution needs no more than a step)."""
    from edgeprune_fast.attribution import attribute
    from edgeprune_fast.tasks.base import Task, TaskBatch

    class KL(Task):
        name = "kl"

    V, B, S = point["vocab"], point["batch"], point["seq"]
    target = torch.zeros(B, S, dtype=torch.bool, device=device)
    target[:, -1] = True
    batch = TaskBatch(torch.randint(0, V, (B, S), device=device), torch.randint(0, V, (B, S), device=device),
                      None, target)

    def step() -> None:
        attribute(pruned, KL(), [batch], method=point["attribute"], metric="kl", ig_steps=2, progress=False)

    return step


def prediction(cfg, point: dict, device: str):
    from edgeprune_fast.ops import backends
    from edgeprune_fast.plan import ModelShape, PlanSettings, plan

    backend = backends.choose("edge_mix", [torch.zeros(1, 1, device=device)]).name
    settings = PlanSettings(point["batch"], point["seq"], point["dtype"], 1, point.get("checkpoint_layers", False),
                            point.get("corrupted_on_cpu", False), "reference" if backend == "reference" else "fused",
                            point.get("device_gb", 80.0), point.get("cache_references", True))
    shape = ModelShape.from_hf_config(cfg, kv_per_query_head=point.get("kv_per_query_head", False))
    return plan(shape, settings), backend


def measure(point: dict, device: str = "cpu", reps: int = 0) -> dict:
    """One point: measured peak of a step above its start, the planner's prediction."""
    cfg, pruned = build(point, device)
    p, backend = prediction(cfg, point, device)
    step = (make_attribution if "attribute" in point else make_step)(pruned, point, device)
    step()  # warm-up: lazy allocations and AdamW's moments
    pruned.zero_grad(set_to_none=True)
    gc.collect()
    with PeakMemory(device) as pm:
        step()
    weights = p.components[next(k for k in p.components if k.startswith("weights.parameters"))]
    n_masks = p.shape.n_edges + p.shape.n_writers
    predicted_step = p.peak_bytes - weights - 12 * n_masks  # log_alphas and moments exist before the step
    row = {**point, "n_params": p.shape.params(), "n_writers": p.shape.n_writers, "n_edges": p.shape.n_edges,
           "edge_mix_backend": backend, "measured_bytes": pm.peak_bytes, "predicted_step_bytes": predicted_step,
           "predicted_peak_bytes": p.peak_bytes, "predicted_phase": p.peak_phase, "weights_bytes": weights,
           "ratio": pm.peak_bytes / predicted_step}
    if device == "cuda":  # everything allocated at the step's peak (weights included), against the plan's peak
        row.update(measured_total_peak_bytes=pm.total_peak_bytes, total_ratio=pm.total_peak_bytes / p.peak_bytes)
    if reps:
        row["step_seconds"] = median_time(step, warmup=0, reps=reps, device=device)
    return row


def cpu_sweep(args) -> None:
    rows = []
    for layers, heads, d in CPU_SWEEP:
        for ckpt in (False, True):
            point = {**llama_shape(layers, heads, d, args.vocab), "batch": args.batch, "seq": args.seq,
                     "dtype": "float32", "checkpoint_layers": ckpt}
            row = _subprocess(point, args.threads)
            rows.append(row)
            print(f"L{layers} H{heads} D{d} ckpt={ckpt}: {row['n_params'] / 1e6:.1f} M params, measured "
                  f"{row['measured_bytes'] / 1e6:.1f} MB, predicted {row['predicted_step_bytes'] / 1e6:.1f} MB "
                  f"(ratio {row['ratio']:.3f}, {row['predicted_phase']})", flush=True)
    from edgeprune_fast.ops import backends

    payload = {"benchmark": "scale_cpu", "what": __doc__.split("\n")[0], "device": "cpu",
               "edge_mix_backend": backends.choose("edge_mix", [torch.zeros(1, 1)]).name,
               "batch": args.batch, "seq": args.seq, "vocab": args.vocab, "torch_threads": args.threads or "default",
               "memory_method": "VmHWM above VmRSS at the start of the step, MALLOC_MMAP_THRESHOLD_=65536, "
                                "one process per point", "rows": rows, "machine": machine(),
               "timestamp": time.strftime("%Y-%m-%d %H:%M:%S")}
    path = write_json("scale_cpu.json", payload)
    print(path)
    plot(rows, path.with_suffix(".png"))


def _subprocess(point: dict, threads: int) -> dict:
    """Each point in a fresh process: no allocator state carried between points."""
    import os
    import subprocess

    from bench.common import MALLOC_ENV

    env = dict(os.environ, **MALLOC_ENV)
    cmd = [sys.executable, "-m", "bench.scale_bench", "--threads", str(threads), "--one", json.dumps(point)]
    out = subprocess.run(cmd, env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(rows: list[dict], path) -> None:
    """Measured against predicted, one point per model (the diagonal: exact; the band: 15 %)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    hi = max(max(r["measured_bytes"], r["predicted_step_bytes"]) for r in rows) / 1e6 * 1.2
    lo = min(min(r["measured_bytes"], r["predicted_step_bytes"]) for r in rows) / 1e6 / 1.2
    ax.plot([lo, hi], [lo, hi], "k-", lw=0.8, label="measured = predicted")
    ax.fill_between([lo, hi], [lo / 1.15, hi / 1.15], [lo * 1.15, hi * 1.15], color="0.9", label="within 15 %")
    for ckpt, marker in ((False, "o"), (True, "s")):
        rs = [r for r in rows if r["checkpoint_layers"] == ckpt]
        ax.scatter([r["predicted_step_bytes"] / 1e6 for r in rs], [r["measured_bytes"] / 1e6 for r in rs],
                   marker=marker, label="checkpointed layers" if ckpt else "plain", zorder=3)
        for r in rs:
            ax.annotate(f"L{r['n_layers']} D{r['d_model']}", (r["predicted_step_bytes"] / 1e6, r["measured_bytes"] / 1e6),
                        fontsize=6, xytext=(3, -8), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("planner's prediction (MB)")
    ax.set_ylabel("measured peak of one step above its start (MB)")
    ax.set_title("Llama-shaped random models, CPU fp32, batch 4 x seq 32")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(path)


def cuda_sweep(args) -> None:
    """The largest Llama shape whose step fits the GPU, growing depth at 40 heads x 5120."""
    total = torch.cuda.get_device_properties(0).total_memory
    rows = []
    from transformers import LlamaConfig

    for layers in (8, 16, 24, 32, 40, 48, 60, 80):  # 40 layers: the 13B shape
        point = {"n_layers": layers, "n_heads": 40, "n_kv_heads": 40, "d_model": 5120, "d_mlp": 13824, "vocab": 32000,
                 "batch": 1, "seq": 64, "dtype": "bfloat16", "checkpoint_layers": True, "device_gb": total / 1e9}
        cfg = LlamaConfig(num_hidden_layers=layers, num_attention_heads=40, num_key_value_heads=40,
                          hidden_size=5120, intermediate_size=13824, vocab_size=32000)
        p, _ = prediction(cfg, point, "cuda")
        if not p.fits:
            rows.append({**point, "predicted_peak_bytes": p.peak_bytes, "skipped": "the planner says it does not fit"})
            break
        try:
            rows.append(measure(point, "cuda", reps=3))
        except torch.cuda.OutOfMemoryError as exc:
            rows.append({**point, "predicted_peak_bytes": p.peak_bytes, "error": f"out of memory: {exc}"[:300]})
            break
        finally:
            gc.collect()
            torch.cuda.empty_cache()
        print(rows[-1], flush=True)
    write_json("scale_cuda.json", {"benchmark": "scale_cuda", "rows": rows, "machine": machine(),
                                   "timestamp": time.strftime("%Y-%m-%d %H:%M:%S")})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--one", help="measure one point given as JSON and print the row as JSON")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--plot", action="store_true", help="redraw the PNG from bench/results/scale_cpu.json")
    args = ap.parse_args()
    if args.plot:
        path = RESULTS / "scale_cpu.json"
        plot(json.loads(path.read_text())["rows"], path.with_suffix(".png"))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        if args.device == "cpu":
            reexec_with_fixed_malloc()
        print(json.dumps(measure(json.loads(args.one), args.device)))
    elif args.device == "cuda":
        cuda_sweep(args)
    else:
        cpu_sweep(args)


if __name__ == "__main__":
    main()
