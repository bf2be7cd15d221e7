"""Peak memory and time of one edge-pruning step of a GPT-2-small-shaped EdgePrunedModel.

Model: GPT2Config() (12 layers, 12 heads, d_model 768, vocab 50257) with random weights,
fp32, split embeddings (158 writers, 32,936 edges), node masks, corrupted ablation;
batch 8, sequence 32 (ARCHITECTURE.md §3's measuring point; the original peaks at 6.3 GB).

Measured, each as the median of ``--reps`` runs after one warm-up:

  step          reference forward of the clean input (full logits) + of the corrupted input
                (writer states) + edge-pruned forward with sampled masks + KL + backward +
                AdamW step on the masks: the same scope as the original's step
                (bench/original_baseline.py ``OriginalGPT2.step``)
  cached_step   the same with the two reference forwards cached (a fixed data set)

Peak memory: the process's resident high-water mark (VmHWM) above the resident size at the
start of the measured call, reset through /proc/self/clear_refs (bench/common.py
``PeakMemory``); glibc's mmap threshold is fixed so freed tensors return to the OS. The
model's weights (~0.5 GB) are loaded before and are not part of the figure (the resident
size before the measurements is reported as rss_before_gb). Results: bench/results/model_memory.json.
Run from the repository root: ``python -m bench.model_memory``.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import PeakMemory, _status_kb, machine, masked_step, median_time, reexec_with_fixed_malloc, write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    reexec_with_fixed_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import GPT2Config, GPT2LMHeadModel

    from edgeprune_fast.model import EdgePrunedModel
    from edgeprune_fast.ops import backends

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config()).eval()
    pruned = EdgePrunedModel.from_hf(hf, split_embeds=True, node_masks=True, ablation="corrupted").train()
    B, S, V = args.batch, args.seq, hf.config.vocab_size
    ids = torch.randint(0, V, (B, S))
    cids = torch.randint(0, V, (B, S))
    opt = torch.optim.AdamW(pruned.edge_log_alpha_parameters() + pruned.node_log_alpha_parameters(), lr=0.1)

    def step():
        full_logits, _ = pruned.reference(ids, states=False)
        _, corrupted = pruned.reference(cids, logits=False)
        return masked_step(pruned, opt, ids, full_logits, corrupted)

    cached = (pruned.reference(ids, states=False)[0], pruned.reference(cids, logits=False)[1])

    def cached_step():
        return masked_step(pruned, opt, ids, *cached)

    rss_before_gb = round(_status_kb("VmRSS") * 1024 / 1e9, 3)  # weights, caches: not in the peaks
    rows = {}
    for name, fn in (("step", step), ("cached_step", cached_step)):
        fn()  # warm-up
        peaks = []
        for _ in range(args.reps):
            with PeakMemory("cpu") as pm:
                fn()
            peaks.append(pm.peak_bytes)
        seconds = median_time(fn, warmup=0, reps=args.reps)
        rows[name] = {"peak_bytes_above_start": int(sorted(peaks)[len(peaks) // 2]), "peak_gb": None,
                      "seconds_median": seconds}
        rows[name]["peak_gb"] = round(rows[name]["peak_bytes_above_start"] / 1e9, 3)
        print(f"{name}: peak {rows[name]['peak_gb']:.3f} GB above start, {seconds:.3f} s", flush=True)

    W = pruned.graph.n_writers
    slot_bytes = B * S * hf.config.n_embd * 4
    payload = {
        "benchmark": "model_memory",
        "what": "one edge-pruning step (forward + backward) of a GPT-2-small-shaped EdgePrunedModel",
        "memory_method": "RSS high-water mark (VmHWM) above RSS at the start, reset via /proc/self/clear_refs; "
                         "MALLOC_MMAP_THRESHOLD_=65536, MALLOC_TRIM_THRESHOLD_=0",
        "config": {"model": "GPT2Config() random weights", "dtype": "float32", "batch": B, "seq": S,
                   "split_embeds": True, "node_masks": True, "ablation": "corrupted",
                   "n_writers": W, "n_edges": pruned.graph.n_edges, "reps": args.reps,
                   "torch_threads": torch.get_num_threads(),
                   "edge_mix_backend": backends.choose("edge_mix", [torch.zeros(1, 1)]).name},
        "writer_buffer_gb": round(W * slot_bytes / 1e9, 3),
        "results": rows,
        "target_peak_gb": 3.0,
        "original_peak_gb_reported": 6.3,
        "rss_before_gb": rss_before_gb,
        "machine": machine(),
        "timestamp": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(write_json("model_memory.json", payload))


if __name__ == "__main__":
    main()
