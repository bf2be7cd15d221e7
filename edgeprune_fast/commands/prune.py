"""`edgeprune prune`: train the masks of a saved HF model on a task, once per target
sparsity, discretise to exactly round((1 - s) * n_edges) edges, evaluate on the validation
split and write per target ``circuit.json`` (ours), ``circuit.eap-ig.json`` (EAP-IG/MIB),
``masks.safetensors`` and a picture; a sweep adds ``sweep.json`` and ``kl_vs_sparsity.png``.

Under torchrun (WORLD_SIZE > 1): data parallel over the processes
(distributed.DataParallel), optionally with FSDP2-sharded weights (--shard-weights); rank 0
prints and writes. Outputs are staged (staging.py) and appear only when complete.
"""

from __future__ import annotations

import io
import json
import os
import sys
from argparse import ArgumentParser, Namespace
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from ..errors import RunFailed, UsageError
from ..staging import check_out_folder, staged_output
from ..torchrun import torchrun_world
from .common import (
    add_model_options,
    add_task_source,
    device,
    load_model,
    load_task,
    load_tokenizer,
    positive_int,
    print_metrics,
    sparsity,
    write_circuit_files,
)

NAME = "prune"
HELP = "prune a model on a task and write the circuit"


def add_arguments(pr: ArgumentParser) -> None:
    add_model_options(pr)
    add_task_source(pr)
    tgt = pr.add_mutually_exclusive_group()
    tgt.add_argument("--sparsity", type=sparsity, default=0.98, help="target edge sparsity in [0, 2) (default 0.98)")
    tgt.add_argument("--sweep", type=sparsity, nargs="+", help="several target sparsities (one run each)")
    pr.add_argument("--node-sparsity", type=sparsity, default=None, help="target node sparsity (default: none)")
    pr.add_argument("--no-node-masks", action="store_true", help="edge masks only")
    pr.add_argument("--steps", type=positive_int, default=3000)
    pr.add_argument("--lr", type=float, default=0.8, help="learning rate of masks and lambdas (default 0.8)")
    pr.add_argument("--init", type=float, default=10.0, help="initial log_alpha (default 10)")
    pr.add_argument("--sparsity-warmup", type=int, default=None, help="default: 5/6 of --steps")
    pr.add_argument("--lr-warmup", type=int, default=None, help="default: 1/15 of --steps")
    pr.add_argument("--discretise", choices=["exact", "masks"], default="exact",
                    help="exact: keep exactly round((1 - target) * n_edges) edges (default); masks: the edges "
                         "whose deterministic mask is non-zero")
    pr.add_argument("--picture", choices=["svg", "png", "pdf", "none"], default="svg")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    pr.add_argument("--shard-weights", action="store_true",
                    help="under torchrun: shard the frozen weights over the processes (FSDP2), 1/N each")
    pr.add_argument("--out", type=Path, required=True, help="a new (or empty) folder for the outputs")


def scaled_warmups(steps: int) -> tuple[int, int]:
    """The original recipe's warm-ups (2500 and 200 of 3000 steps), scaled to ``steps``."""
    return round(steps * 2500 / 3000), round(steps * 200 / 3000)


# -- torchrun ---------------------------------------------------------------------------------------
def check_processes(args: Namespace, world: int) -> None:
    """The options that depend on the number of processes, checked before anything slow
    (the same on every rank: each checks them and fails alike)."""
    import torch

    if args.shard_weights and world <= 1:
        raise UsageError(f"--shard-weights: shards the weights over the processes of a torchrun launch; expected "
                         f"WORLD_SIZE > 1 (launch with torchrun --nproc_per_node N ...), got "
                         f"WORLD_SIZE={os.environ.get('WORLD_SIZE', 'unset')}")
    if world <= 1:
        return
    if args.batch_size < world:  # every process takes a slice of every global batch
        raise UsageError(f"--batch-size: expected at least one example per process ({world}; the global batch is "
                         f"split over them), got {args.batch_size}")
    dev = device(args.device)
    if dev.type not in ("cpu", "cuda") or dev.index is not None:
        raise UsageError(f"--device: under torchrun each process takes the GPU of its LOCAL_RANK; expected cpu or "
                         f"cuda, got {args.device!r}")
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if dev.type == "cuda" and per_node > torch.cuda.device_count():
        raise UsageError(f"--nproc_per_node: expected at most one process per GPU ({torch.cuda.device_count()} "
                         f"visible), got {per_node} processes on this node")


def join_processes(args: Namespace):
    """Join the torchrun process group: a distributed.DataParallel on the GPU of LOCAL_RANK
    (--device cuda, nccl) or on the CPU (--device cpu, gloo, even where GPUs are visible)."""
    import torch
    import torch.distributed as dist

    from ..distributed import DataParallel
    from ..torchrun import TORCHRUN_VARS

    if device(args.device).type == "cuda":
        return DataParallel.from_env()
    # DataParallel.from_env takes a GPU whenever one is visible; --device cpu asks for CPU processes
    if missing := [v for v in TORCHRUN_VARS if v not in os.environ]:
        raise UsageError(f"environment: expected the torchrun variables {', '.join(TORCHRUN_VARS)}, missing "
                         f"{', '.join(missing)} (launch with torchrun --nproc_per_node N ...)")
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return DataParallel(dist.get_rank(), dist.get_world_size(), torch.device("cpu"))


def shareable_batches(batches: list, world: int, report: bool) -> list:
    """The training batches with a row for each of ``world`` processes: a short last batch
    with fewer rows than processes is left out (with a note), as they cannot all share it."""
    kept = [b for b in batches if len(b) >= world]
    if not kept:
        raise UsageError(f"--batch-size: expected at least {world} training examples (one per process), got "
                         f"{sum(len(b) for b in batches)}")
    if report and len(kept) < len(batches):
        left = sum(len(b) for b in batches if len(b) < world)
        print(f"note: {left} training example(s) in a short last batch left out (fewer rows than the {world} "
              f"processes)", file=sys.stderr)
    return kept


# -- prune ---------------------------------------------------------------------------------------
def run(args: Namespace) -> int:
    """Under torchrun (WORLD_SIZE > 1) every process runs all of this: training on its slice
    of each global batch (distributed.DataParallel), and the same circuit evaluation (with
    sharded weights every forward gathers collectively, so all ranks must run it); rank 0
    alone prints and writes ``--out``."""
    if args.steps < 1:
        raise UsageError(f"--steps: expected an integer >= 1, got {args.steps}")
    targets = sorted(set(args.sweep)) if args.sweep else [args.sparsity]
    rank, world = torchrun_world()
    check_processes(args, world)
    if rank > 0:  # other ranks stay quiet: no transformers progress bars either
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    check_out_folder(args.out)  # before the slow part
    tokenizer = load_tokenizer(args.model)
    task = load_task(args, tokenizer)  # before the model: data errors come fast
    train_batches = task.batches(args.batch_size, "train")
    eval_batches = task.batches(args.batch_size, "validation")
    if world <= 1:
        return _prune(args, targets, task, train_batches, eval_batches, None, train_batches)
    dp_batches = shareable_batches(train_batches, world, report=rank == 0)
    dp = join_processes(args)
    try:
        return _prune(args, targets, task, dp_batches, eval_batches, dp, train_batches)
    finally:
        dp.close()  # every rank leaves the process group, on success or error


def _prune(args: Namespace, targets: list[float], task, train_batches, eval_batches, dp, mean_batches) -> int:
    """Load, train per target, evaluate, write; ``dp``: a DataParallel under torchrun, else None.
    ``mean_batches``: every training batch (mean ablation's means), ``train_batches`` may
    leave out a short last one under torchrun (shareable_batches)."""
    import torch

    from ..circuit import Circuit, evaluate_circuit
    from ..train import NonFiniteLoss, TrainConfig, Trainer

    is_main = dp is None or dp.is_main
    out, err = (sys.stdout, sys.stderr) if is_main else (io.StringIO(), io.StringIO())  # other ranks stay quiet
    torch.manual_seed(args.seed)
    kw = dict(split_embeds=args.split_embeds, node_masks=not args.no_node_masks, init=args.init,
              checkpoint_layers=args.checkpoint_layers, corrupted_on_cpu=args.corrupted_on_cpu)
    model = load_model(args, None if dp is None else dp.device,
                       ablation="zero" if args.ablation == "mean" else args.ablation, **kw)
    if args.ablation == "mean":  # mean writer outputs over the training tokens, then rewrap the same HF model
        from ..model import EdgePrunedModel

        # each process takes the means over all the training batches, before any sharding: the
        # same values on every rank with no communication, and the same as one process's
        total, count = None, 0.0
        for b in mean_batches:
            mask = torch.ones_like(b.input_ids) if b.attention_mask is None else b.attention_mask
            n = float(mask.sum())
            mean = model.compute_mean_writers(b.input_ids, b.attention_mask).float() * n
            total, count = (mean if total is None else total + mean), count + n
        model = EdgePrunedModel.from_hf(model.hf, ablation="mean", mean_writers=total / count, **kw)
    if args.shard_weights:
        dp.shard_weights(model)  # collective; after the model is on its device, in its dtype
    s_warm, lr_warm = scaled_warmups(args.steps)
    s_warm = s_warm if args.sparsity_warmup is None else args.sparsity_warmup
    lr_warm = lr_warm if args.lr_warmup is None else args.lr_warmup
    rows: list[dict[str, Any]] = []
    source = str(args.data) if args.data is not None else args.task
    processes = "" if dp is None else (f", {dp.world_size} processes on {dp.device.type}" +
                                       (", weights sharded" if args.shard_weights else ""))
    with (staged_output(args.out) if is_main else nullcontext()) as stage:
        for target in targets:
            torch.manual_seed(args.seed)
            model.clear_circuit()
            model.masks.reset(args.init, 0.01)  # every target starts from the same masks
            config = TrainConfig(target_edge_sparsity=target, target_node_sparsity=args.node_sparsity,
                                 steps=args.steps, sparsity_warmup=s_warm, lr_warmup=lr_warm, lr_edge=args.lr,
                                 lr_node=args.lr, lr_lambda=args.lr, seed=args.seed,
                                 progress=is_main and not args.quiet)
            print(f"pruning {args.model} on {source} to edge sparsity {target} ({args.steps} steps{processes})",
                  file=err)
            try:
                history = Trainer(model, task, train_batches, config, data_parallel=dp).run()
            except NonFiniteLoss as exc:
                raise RunFailed(f"target {target}: {exc}") from None
            model.eval()
            circuit = Circuit.from_masks(model, target if args.discretise == "exact" else None,
                                         config={"model": str(args.model), "task": source,
                                                 "ablation": args.ablation, "dtype": args.dtype,
                                                 "train": config.to_dict(), "batch_size": args.batch_size,
                                                 "processes": 1 if dp is None else dp.world_size,
                                                 "final_train_kl": history[-1]["kl"] if history else None})
            circuit = evaluate_circuit(model, circuit, task, eval_batches)  # on every rank: see prune
            if stage is not None:
                folder = stage / f"sparsity_{target:.4f}" if len(targets) > 1 else stage
                write_circuit_files(folder, model, circuit, args.picture)
            print(f"target sparsity {target}:", file=out)
            print_metrics(circuit, out)
            rows.append({"target": target, "sparsity": circuit.sparsity, "n_edges": circuit.n_edges,
                         **{k: v for k, v in circuit.metrics.items() if isinstance(v, (int, float, str))}})
        if len(targets) > 1 and stage is not None:
            from ..draw import plot_sweep

            (stage / "sweep.json").write_text(json.dumps(rows, indent=1) + "\n")
            plot_sweep(rows, stage / "kl_vs_sparsity.png", title=f"{Path(str(args.model)).name} on {source}")
    if is_main:
        print(f"wrote {args.out}")
    return 0
