"""EAP / EAP-IG attribution: ours (edgeprune_fast.attribution, the fused forward with a tap
per reader group) against EAP-IG's formulation op for op (bench/eap_ig_baseline.py), on
random-weight models of GPT-2 small's shape and a small Llama shape (GQA), float32, CPU.

Per model and method: the median wall time (reps interleaved between the two, so that a busy
spell of the shared machine hits both) of a whole attribution of one batch (captures,
every IG step's forward and backward, the scores) and its peak resident memory above the
level before it (bench/common.py: VmHWM, fixed malloc thresholds); the largest difference
between the two implementations' scores (EAP-IG's 1 / batch size undone), so that both
computed the same thing. Writes bench/results/attribution_cpu.json and .md.

    python -m bench.attribution_bench [--threads 1] [--reps 2] [--batch 4] [--seq 24]
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch

from bench.common import RESULTS, PeakMemory, machine, reexec_with_fixed_malloc, write_json
from bench.eap_ig_baseline import EapIgBaseline


class Toy:
    name, contrast_key = "toy", "other"


def models() -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    return {
        "gpt2-small shape (12 layers, 12 heads, d 768)": lambda: GPT2LMHeadModel(GPT2Config()),
        "llama shape (8 layers, 8 heads / 2 KV, d 512)": lambda: LlamaForCausalLM(LlamaConfig(
            num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, hidden_size=512,
            intermediate_size=1376, vocab_size=32000, max_position_embeddings=256)),
    }


def batch_for(vocab: int, B: int, S: int):
    from edgeprune_fast.tasks.base import TaskBatch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (B, S), generator=g)
    cids = ids.clone()
    cids[:, S // 3] = torch.randint(0, vocab, (B,), generator=g)
    cids[:, S // 2] = torch.randint(0, vocab, (B,), generator=g)
    target = torch.zeros(B, S, dtype=torch.bool)
    target[:, -1] = True
    labels, other = torch.randint(0, vocab, (B,), generator=g), torch.randint(0, vocab, (B,), generator=g)
    return TaskBatch(ids, cids, None, target, None, labels, {"other": other})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=24)
    ap.add_argument("--ig-steps", type=int, default=5)
    args = ap.parse_args()
    reexec_with_fixed_malloc()
    torch.set_num_threads(args.threads)
    from edgeprune_fast.attribution import attribute
    from edgeprune_fast.formats import eap_matrix_position, edge_to_eap
    from edgeprune_fast.model import EdgePrunedModel

    rows = []
    t_start = time.time()
    for name, make in models().items():
        torch.manual_seed(0)
        hf = make().eval()
        batch = batch_for(hf.config.vocab_size, args.batch, args.seq)
        model = EdgePrunedModel.from_hf(hf, kv_per_query_head=True)
        base = EapIgBaseline(hf)
        graph = model.graph
        pos = torch.tensor([eap_matrix_position(base.L, base.H, edge_to_eap(graph, e)[0]) for e in graph.edges()])
        for method in ("eap", "eap-ig"):
            ours = partial(attribute, model, Toy(), [batch], method=method, metric="logit-diff",
                           ig_steps=args.ig_steps, progress=False)
            theirs = partial(base.scores, batch.input_ids, batch.corrupted_input_ids, batch.labels,
                             batch.extras["other"], method=method, steps=args.ig_steps)

            result, peaks, times = {}, {}, {"ours": [], "eap-ig formulation": []}
            impls = (("ours", ours), ("eap-ig formulation", theirs))
            for impl, fn in impls:
                with PeakMemory() as mem:
                    result[impl] = fn()
                peaks[impl] = mem.peak_bytes
            for _ in range(args.reps):  # interleaved, so that a busy spell of the machine hits both
                for impl, fn in impls:
                    t0 = time.perf_counter()
                    fn()
                    times[impl].append(time.perf_counter() - t0)
            for impl, _ in impls:
                seconds = statistics.median(times[impl])
                rows.append({"model": name, "method": method, "impl": impl, "seconds": seconds,
                             "times": times[impl], "peak_mib": peaks[impl] / 2**20, "batch": args.batch,
                             "seq": args.seq, "ig_steps": args.ig_steps if method != "eap" else 1,
                             "n_edges": graph.n_edges})
                print(f"{name} {method} {impl}: {seconds:.2f} s, peak {peaks[impl] / 2**20:.0f} MiB", flush=True)
            a, b = result["ours"], result["eap-ig formulation"].flatten()[pos] * args.batch
            rows[-1]["max_abs_diff_vs_ours"] = rows[-2]["max_abs_diff_vs_ours"] = float((a - b).abs().max())
            rows[-1]["max_abs_score"] = rows[-2]["max_abs_score"] = float(a.abs().max())
    ratios = []
    for r in rows:
        if r["impl"] == "ours":
            other = next(x for x in rows if x["model"] == r["model"] and x["method"] == r["method"] and x is not r)
            ratios.append({"model": r["model"], "method": r["method"], "speedup": other["seconds"] / r["seconds"],
                           "peak_memory_ratio": r["peak_mib"] / other["peak_mib"]})
    payload = {"machine": machine(), "threads": args.threads, "rows": rows, "ratios": ratios,
               "wall_seconds": time.time() - t_start,
               "note": "ours: edgeprune_fast.attribution (fused forward, masks exactly 1, reader-gradient tap and "
                       "one [R, BSD] x [BSD, n] product per reader group); eap-ig formulation: "
                       "bench/eap_ig_baseline.py (TransformerLens-style split q/k/v inputs per query head, "
                       "activation_difference [B, S, n_forward, D], an einsum per reader hook)"}
    path = write_json("attribution_cpu.json", payload)
    lines = ["# Attribution on CPU: ours vs EAP-IG's formulation", "",
             f"{payload['machine'].get('cpu_model')}, {args.threads} thread(s), batch {args.batch}, seq "
             f"{args.seq}, float32, random weights; IG steps {args.ig_steps}. From bench/attribution_bench.py.", "",
             "| model | method | impl | time (s) | peak (MiB) | max abs diff / max abs score |",
             "|---|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['impl']} | {r['seconds']:.2f} | {r['peak_mib']:.0f} | "
                     f"{r['max_abs_diff_vs_ours']:.2e} / {r['max_abs_score']:.2e} |")
    lines += ["", "| model | method | speed-up (theirs / ours time) | peak memory (ours / theirs) |", "|---|---|---:|---:|"]
    lines += [f"| {x['model']} | {x['method']} | {x['speedup']:.2f}x | {x['peak_memory_ratio']:.2f} |" for x in ratios]
    (RESULTS / "attribution_cpu.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {path} and {RESULTS / 'attribution_cpu.md'}")


if __name__ == "__main__":
    main()
