"""Time and peak memory of one edge-pruning step of a Gemma-2-shaped model, post_norm "writer"
(the default) against "reader" (MIB's graph for post-norms, edgeprune_fast/post_norm.py).

Model: Gemma2Config with random weights, ``--layers`` layers (default 8), d_model 512, 8 query
heads, 4 KV heads, head_dim 64, MLP 1024, vocab 2048, float32; node masks, corrupted ablation,
k/v readers per KV head; batch ``--batch`` (4), sequence ``--seq`` (32). The step: the
edge-pruned forward with sampled masks on cached reference states (full logits, corrupted
writer states, each mode its own), KL to the full model + the expected sparsity, backward,
AdamW on the masks. Each mode: median wall time of ``--reps`` steps after one warm-up, and
the median peak memory above the start of the step (RSS high-water mark, bench/common.py
``PeakMemory``; glibc's mmap threshold fixed so freed tensors return to the OS). Both modes
in one process, in turn. Results: bench/results/post_norm.json.

Run from the repository root: ``python -m bench.post_norm_bench`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import PeakMemory, machine, masked_step, median_time, reexec_with_fixed_malloc, write_json


def _measure(hf, mode: str, ids, cids, reps: int) -> dict:
    from edgeprune_fast.model import EdgePrunedModel

    torch.manual_seed(1)
    pruned = EdgePrunedModel.from_hf(hf, node_masks=True, ablation="corrupted", post_norm=mode).train()
    opt = torch.optim.AdamW(pruned.edge_log_alpha_parameters() + pruned.node_log_alpha_parameters(), lr=0.1)
    full = pruned.reference(ids, states=False)[0]
    corrupted = pruned.place_corrupted_writers(pruned.reference(cids, logits=False)[1])

    def step():
        masked_step(pruned, opt, ids, full, corrupted)

    step()  # warm-up
    peaks = []
    for _ in range(reps):
        with PeakMemory("cpu") as pm:
            step()
        peaks.append(pm.peak_bytes)
    seconds = median_time(step, warmup=0, reps=reps)
    peak = int(sorted(peaks)[len(peaks) // 2])
    return {"seconds_median": seconds, "peak_bytes_above_start": peak, "peak_mb": round(peak / 1e6, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args()
    reexec_with_fixed_malloc()
    torch.set_num_threads(args.threads)
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from edgeprune_fast.model import EdgePrunedModel

    torch.manual_seed(0)
    cfg = Gemma2Config(num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4, hidden_size=512,
                       head_dim=64, intermediate_size=1024, vocab_size=2048, max_position_embeddings=256,
                       sliding_window=16, query_pre_attn_scalar=64)
    cfg._attn_implementation = "eager"
    hf = Gemma2ForCausalLM(cfg).eval()
    B, S = args.batch, args.seq
    ids = torch.randint(0, cfg.vocab_size, (B, S))
    cids = torch.randint(0, cfg.vocab_size, (B, S))
    rows = {}
    for mode in ("writer", "reader"):
        rows[mode] = _measure(hf, mode, ids, cids, args.reps)
        print(f"{mode}: {rows[mode]['seconds_median']:.3f} s, peak {rows[mode]['peak_mb']:.1f} MB above start",
              flush=True)
    W = EdgePrunedModel.from_hf(hf).graph.n_writers
    payload = {
        "benchmark": "post_norm",
        "what": "one edge-pruning step (sampled masks, cached references, forward + backward + AdamW) of a "
                "Gemma-2-shaped EdgePrunedModel, post_norm writer vs reader",
        "memory_method": "RSS high-water mark (VmHWM) above RSS at the start of the step, reset via "
                         "/proc/self/clear_refs; MALLOC_MMAP_THRESHOLD_=65536, MALLOC_TRIM_THRESHOLD_=0",
        "config": {"model": "Gemma2Config random weights", "layers": args.layers, "d_model": 512, "heads": 8,
                   "kv_heads": 4, "head_dim": 64, "vocab": 2048, "dtype": "float32", "batch": B, "seq": S,
                   "node_masks": True, "ablation": "corrupted", "reps": args.reps,
                   "torch_threads": torch.get_num_threads(), "n_writers": W},
        "slot_buffer_mb": round(W * B * S * 512 * 4 / 1e6, 1),
        "results": rows,
        "reader_over_writer_time": rows["reader"]["seconds_median"] / rows["writer"]["seconds_median"],
        "machine": machine(),
        "timestamp": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(write_json("post_norm.json", payload))


if __name__ == "__main__":
    main()
