"""A run of real length: resident memory per training step, to show that it stays flat.

Run from the repository root::

    python -m bench.long_run                  # GPT-2-small shape, batch 8, seq 32, 300 steps (CPU)
    python -m bench.long_run --steps 40 --layers 2 --out-name long_run_quick   # a quick look

Model: GPT2Config() (12 layers, 12 heads, d_model 768, vocab 50257) with random weights;
the CLI's defaults: one embeds node, node masks, corrupted ablation, the original's
learning rates, warm-ups scaled to the run. Data: ``--batches`` distinct batches of random
clean and corrupted token ids [B, S] (the trainer caches each batch's full logits and
corrupted writer states, as it does for a task, so memory rises until every batch has
been seen once: keep ``--batches`` below the step after which growth is judged).
The loop is the Trainer's own (train_step), checkpointing every ``--checkpoint-every``
steps into a temporary folder, as `edgeprune prune` does.

Per step: wall time and the process's resident set (VmRSS, glibc's default malloc, as users
run it). Two growth figures from step ``--judge-after`` (J) on, the target being at most 2 %:
``growth_max`` = (max RSS after J - RSS at J) / RSS at J, the strict reading, which also
counts the allocator's step-to-step swing (glibc keeps freed chunks of the many
short-lived tensors resident, and how much differs from step to step); and
``growth_peaks`` = (max RSS of the last ``--window`` steps - max of the ``--window`` steps
from J) / the latter, the swing's top compared with itself; and ``growth_level``, the same
with medians, the level a leak would raise, with the swing averaged out. A leak of the old
kind (every step's [W, B, S, D] buffers kept) shows in all three at once.
``--fixed-malloc`` restarts the bench with glibc's mmap threshold fixed (bench/common.py), so
that every large freed tensor goes back to the OS: RSS is then the live memory, with no
allocator swing (slower: every large tensor faults its pages in anew). Results: bench/results/<out-name>.json (settings,
machine, verdict), .csv (one row per step) and .png (the curve).
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import torch

from bench.common import RESULTS, _status_kb, machine, write_json


def _batches(n: int, batch: int, seq: int, vocab: int, seed: int):
    from edgeprune_fast.tasks.base import TaskBatch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        target = torch.zeros(batch, seq, dtype=torch.bool)
        target[:, -1] = True
        out.append(TaskBatch(torch.randint(0, vocab, (batch, seq), generator=g),
                             torch.randint(0, vocab, (batch, seq), generator=g), None, target))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--batches", type=int, default=10, help="distinct batches (cached after their first step)")
    p.add_argument("--judge-after", type=int, default=20, help="growth is measured from this step on")
    p.add_argument("--window", type=int, default=30, help="steps per median for growth_level")
    p.add_argument("--checkpoint-every", type=int, default=30)
    p.add_argument("--checkpoint-layers", action="store_true")
    p.add_argument("--fixed-malloc", action="store_true", help="RSS = live memory (see the module docstring)")
    p.add_argument("--out-name", default=None, help="default: long_run_cpu[_fixed_malloc]")
    args = p.parse_args(argv)
    if args.fixed_malloc:
        from bench.common import reexec_with_fixed_malloc

        reexec_with_fixed_malloc()
    args.out_name = args.out_name or ("long_run_cpu_fixed_malloc" if args.fixed_malloc else "long_run_cpu")

    from transformers import GPT2Config, GPT2LMHeadModel

    from edgeprune_fast.model import EdgePrunedModel
    from edgeprune_fast.tasks.base import Task
    from edgeprune_fast.train import TrainConfig, Trainer

    class KL(Task):
        name = "kl"

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=args.layers)).eval()
    model = EdgePrunedModel.from_hf(hf, checkpoint_layers=args.checkpoint_layers)
    data = _batches(args.batches, args.batch, args.seq, hf.config.vocab_size, seed=1)
    rows = []
    with tempfile.TemporaryDirectory() as ckpt:
        trainer = Trainer(model, KL(), data, TrainConfig(steps=args.steps, checkpoint_every=args.checkpoint_every,
                                                          progress=False), out_dir=ckpt)
        start_rss = _status_kb("VmRSS") / 1024
        for step in range(1, args.steps + 1):
            t0 = time.perf_counter()
            row = trainer.train_step()
            if trainer.step % args.checkpoint_every == 0:
                trainer.save_checkpoint()
            seconds = time.perf_counter() - t0
            rows.append({"step": step, "seconds": round(seconds, 4), "rss_mb": round(_status_kb("VmRSS") / 1024, 1),
                         "kl": row["kl"], "edge_sparsity": row["edge_sparsity"]})
            if step % 10 == 0 or step == 1:
                print(f"step {step}: {seconds:.2f} s, RSS {rows[-1]['rss_mb']:.0f} MB", flush=True)
    at = rows[args.judge_after - 1]["rss_mb"]
    after = max(r["rss_mb"] for r in rows[args.judge_after - 1:])
    growth = (after - at) / at
    head = [r["rss_mb"] for r in rows[args.judge_after - 1:args.judge_after - 1 + args.window]]
    tail = [r["rss_mb"] for r in rows[-args.window:]]
    first, last = _median(head), _median(tail)
    level = (last - first) / first
    peaks = (max(tail) - max(head)) / max(head)
    result = {
        "bench": "long_run", "machine": machine(), "settings": vars(args),
        "model": f"GPT2Config(n_layer={args.layers}) random weights, node masks, corrupted ablation",
        "writers": model.graph.n_writers, "edges": model.graph.n_edges,
        "rss_mb_at_start": round(start_rss, 1), "rss_mb_at_judge_step": at, "rss_mb_max_after": after,
        "rss_mb_final": rows[-1]["rss_mb"], "growth_max": round(growth, 5),
        "rss_mb_median_first_window": first, "rss_mb_median_last_window": last, "growth_level": round(level, 5),
        "rss_mb_max_first_window": max(head), "rss_mb_max_last_window": max(tail), "growth_peaks": round(peaks, 5),
        "target_growth": 0.02, "met_max": growth <= 0.02, "met_peaks": peaks <= 0.02, "met_level": level <= 0.02,
        "malloc": "mmap threshold fixed (RSS = live memory)" if args.fixed_malloc else "glibc default",
        "median_step_seconds": _median([r["seconds"] for r in rows]),
        "csv": f"{args.out_name}.csv", "png": f"{args.out_name}.png",
    }
    write_json(f"{args.out_name}.json", result)
    with (RESULTS / f"{args.out_name}.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    _plot(rows, result, RESULTS / f"{args.out_name}.png")
    print(f"RSS at step {args.judge_after}: {at:.0f} MB, max after: {after:.0f} MB: growth_max {100 * growth:.2f} %; "
          f"median of steps {args.judge_after}-{args.judge_after + args.window - 1}: {first:.0f} MB, of the last "
          f"{args.window}: {last:.0f} MB: growth_level {100 * level:.2f} %; window maxima {max(head):.0f} -> "
          f"{max(tail):.0f} MB: growth_peaks {100 * peaks:.2f} % (target <= 2 %)")
    return 0


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def _plot(rows: list[dict], result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot([r["step"] for r in rows], [r["rss_mb"] for r in rows], lw=1.2)
    judge = result["settings"]["judge_after"]
    ax.axvline(judge, color="grey", ls=":", lw=1)
    ax.axhline(result["rss_mb_at_judge_step"] * 1.02, color="red", ls="--", lw=0.8, label="+2 % of step "
               f"{judge}")
    ax.set_xlabel("training step")
    ax.set_ylabel("resident memory, MB")
    s = result["settings"]
    ax.set_title(f"GPT-2 shape, {s['layers']} layers, batch {s['batch']}, seq {s['seq']}, {result['malloc']}:\n"
                 f"after step {judge}: level {100 * result['growth_level']:+.2f} %, window maxima "
                 f"{100 * result['growth_peaks']:+.2f} %, max vs step {judge} {100 * result['growth_max']:+.2f} %",
                 fontsize=8)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
