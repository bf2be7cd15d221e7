"""What each `edgeprune` subcommand does (cli.py parses the arguments and handles errors).

prune   load a saved HF model and its tokenizer (local folder only), build the task
        (tasks.get_task: a name or a JSONL file), train the masks once per target sparsity
        (train.Trainer), discretise to exactly round((1 - s) * n_edges) edges
        (circuit.Circuit.from_masks), evaluate on the validation split, and write per target
        ``circuit.json`` (ours), ``circuit.eap-ig.json`` (EAP-IG/MIB), ``masks.safetensors``
        and a picture; a sweep adds ``sweep.json`` and ``kl_vs_sparsity.png``. Under torchrun
        (WORLD_SIZE > 1): data parallel over the processes (distributed.DataParallel),
        optionally with FSDP2-sharded weights (--shard-weights); rank 0 prints and writes.
eval    a circuit file (ours or EAP-IG/MIB) on a task: KL, metric, faithfulness.
draw    a circuit file as a picture (.svg/.png/.pdf).
info    `python -m edgeprune_fast.info`.
demo    prune the shipped tracr `reverse` model (tasks.tracr.prune_tracr, TRACR_DEFAULTS)
        and compare the circuit with its known one.
plan    the memory planner (edgeprune_fast.plan), when installed.

Every output goes through ``cli.staged_output`` / ``cli.staged_file``: written to a
temporary sibling and moved into place only when complete.
"""

from __future__ import annotations

import io
import json
import os
import sys
from argparse import Namespace
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from .cli import RunFailed, UsageError, check_out_folder, staged_file, staged_output, torchrun_world

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PICTURE_NAME = "circuit"


# -- shared loading ---------------------------------------------------------------------------------
def _device(text: str) -> torch.device:
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise UsageError(f"--device: expected cpu, cuda or cuda:N, got {text!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device: {text!r} asked for, but no CUDA GPU is available (torch.cuda.is_available() is "
                         "False); use --device cpu")
    return dev


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise UsageError(f"--model: could not load a tokenizer from {str(path)!r} (save one next to the model with "
                         f"tokenizer.save_pretrained): {str(exc).splitlines()[0]}") from None


def load_task(args: Namespace, tokenizer):
    from .tasks import get_task

    if args.data is not None:
        if not args.data.is_file():
            raise UsageError(f"--data: expected a JSONL file, {str(args.data)!r} does not exist")
        return get_task(args.data, tokenizer)
    return get_task(args.task, tokenizer, n_examples=getattr(args, "examples", None), seed=args.seed)


def load_model(args: Namespace, device: torch.device | None = None, **kwargs):
    """The model of ``--model`` on ``device`` (default: ``--device``), in ``--dtype``, with
    ``--checkpoint-layers`` and ``--corrupted-on-cpu``; ``kwargs`` go to from_pretrained."""
    from .model import EdgePrunedModel

    device = _device(args.device) if device is None else device
    dtype = DTYPES[getattr(args, "dtype", "float32")]
    kwargs.setdefault("checkpoint_layers", getattr(args, "checkpoint_layers", False))
    kwargs.setdefault("corrupted_on_cpu", getattr(args, "corrupted_on_cpu", False))
    try:
        return EdgePrunedModel.from_pretrained(args.model, dtype=dtype, device=device, **kwargs)
    except OSError as exc:
        raise UsageError(f"--model: could not load a causal LM from {str(args.model)!r}: "
                         f"{str(exc).splitlines()[0]}") from None


def _scaled_warmups(steps: int) -> tuple[int, int]:
    """The original recipe's warm-ups (2500 and 200 of 3000 steps), scaled to ``steps``."""
    return round(steps * 2500 / 3000), round(steps * 200 / 3000)


def _effective_scores(model) -> torch.Tensor:
    """min(edge log_alpha, its writer's node log_alpha): a per-edge importance for export."""
    scores, nodes = model.edge_scores(), model.node_scores()
    return scores if nodes is None else torch.minimum(scores, nodes[model.edge_writer_index()])


def _print_metrics(circuit, out=None) -> None:
    out = sys.stdout if out is None else out
    m = circuit.metrics
    name = m.get("metric_name", "metric")
    print(f"  edges: {circuit.n_edges} of {circuit.n_edges_total} (sparsity {circuit.sparsity:.6f})", file=out)
    if "kl" in m:
        print(f"  KL(full || circuit): {m['kl']:.6g}   (empty circuit: {m['kl_empty']:.6g})", file=out)
    if "metric_circuit" in m:
        print(f"  {name}: circuit {m['metric_circuit']:.4f}, full {m['metric_full']:.4f}, "
              f"empty {m['metric_empty']:.4f}; faithfulness {m['faithfulness']:.4f}", file=out)
    for other, row in (m.get("measures") or {}).items():
        if other != name:
            print(f"  {other}: circuit {row['circuit']:.4f}, full {row['full']:.4f}, empty {row['empty']:.4f}",
                  file=out)


def _write_circuit_files(folder: Path, model, circuit, picture: str) -> list[Path]:
    from .draw import draw_circuit
    from .formats import save_eap_ig

    folder.mkdir(parents=True, exist_ok=True)
    files = [circuit.save(folder / "circuit.json")]
    scores = dict(zip(model.graph.edges(), torch.sigmoid(_effective_scores(model)).tolist()))
    try:
        files.append(save_eap_ig(folder / "circuit.eap-ig.json", model.graph, circuit.edge_list(), scores,
                                 d_model=model.adapter.d_model))
    except ValueError as exc:  # per-layer head counts: the EAP-IG format cannot hold the graph
        print(f"note: no EAP-IG file: {exc}", file=sys.stderr)
    model.save_masks(folder / "masks.safetensors")
    files.append(folder / "masks.safetensors")
    if picture != "none":
        if circuit.n_edges:
            target = folder / f"{PICTURE_NAME}.{picture}"
            draw_circuit(circuit.edge_list(), target, title=f"{circuit.n_edges} edges, sparsity {circuit.sparsity:.4f}")
            files.append(target)
        else:
            print("note: the circuit has no edges; no picture drawn", file=sys.stderr)
    return files


# -- torchrun ---------------------------------------------------------------------------------------
def check_processes(args: Namespace, world: int) -> None:
    """The options that depend on the number of processes, checked before anything slow
    (the same on every rank: each checks them and fails alike)."""
    if args.shard_weights and world <= 1:
        raise UsageError(f"--shard-weights: shards the weights over the processes of a torchrun launch; expected "
                         f"WORLD_SIZE > 1 (launch with torchrun --nproc_per_node N ...), got "
                         f"WORLD_SIZE={os.environ.get('WORLD_SIZE', 'unset')}")
    if world <= 1:
        return
    if args.batch_size < world:  # every process takes a slice of every global batch
        raise UsageError(f"--batch-size: expected at least one example per process ({world}; the global batch is "
                         f"split over them), got {args.batch_size}")
    dev = _device(args.device)
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
    import torch.distributed as dist

    from .distributed import TORCHRUN_VARS, DataParallel

    if _device(args.device).type == "cuda":
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


# -- prune ------------------------------------------------------------------------------------------
def prune(args: Namespace) -> int:
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
    from .circuit import Circuit, evaluate_circuit
    from .train import NonFiniteLoss, TrainConfig, Trainer

    is_main = dp is None or dp.is_main
    out, err = (sys.stdout, sys.stderr) if is_main else (io.StringIO(), io.StringIO())  # other ranks stay quiet
    torch.manual_seed(args.seed)
    kw = dict(split_embeds=args.split_embeds, node_masks=not args.no_node_masks, init=args.init,
              checkpoint_layers=args.checkpoint_layers, corrupted_on_cpu=args.corrupted_on_cpu)
    model = load_model(args, None if dp is None else dp.device,
                       ablation="zero" if args.ablation == "mean" else args.ablation, **kw)
    if args.ablation == "mean":  # mean writer outputs over the training tokens, then rewrap the same HF model
        from .model import EdgePrunedModel

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
    s_warm, lr_warm = _scaled_warmups(args.steps)
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
                _write_circuit_files(folder, model, circuit, args.picture)
            print(f"target sparsity {target}:", file=out)
            _print_metrics(circuit, out)
            rows.append({"target": target, "sparsity": circuit.sparsity, "n_edges": circuit.n_edges,
                         **{k: v for k, v in circuit.metrics.items() if isinstance(v, (int, float, str))}})
        if len(targets) > 1 and stage is not None:
            from .draw import plot_sweep

            (stage / "sweep.json").write_text(json.dumps(rows, indent=1) + "\n")
            plot_sweep(rows, stage / "kl_vs_sparsity.png", title=f"{Path(str(args.model)).name} on {source}")
    if is_main:
        print(f"wrote {args.out}")
    return 0


# -- eval / draw / info ------------------------------------------------------------------------------
def eval(args: Namespace) -> int:  # noqa: A001 (the subcommand's name)
    from .circuit import evaluate_circuit
    from .formats import load_circuit

    tokenizer = load_tokenizer(args.model)
    task = load_task(args, tokenizer)
    batches = task.batches(args.batch_size, args.split)
    model = load_model(args, split_embeds=args.split_embeds, ablation=args.ablation)
    circuit = load_circuit(args.circuit, model.graph)
    circuit = evaluate_circuit(model, circuit, task, batches)
    print(f"{args.circuit} on {args.data or args.task} ({args.split}, {circuit.metrics['n_examples']} examples):")
    _print_metrics(circuit)
    if args.out is not None:
        with staged_file(args.out) as tmp:
            circuit.save(tmp)
        print(f"wrote {args.out}")
    return 0


def draw(args: Namespace) -> int:
    from .draw import _suffix, draw_circuit
    from .formats import load_circuit

    _suffix(args.out)  # a bad suffix fails before anything is read
    circuit = load_circuit(args.circuit)
    if not circuit.n_edges:
        raise UsageError(f"circuit: {str(args.circuit)!r} has no edges; nothing to draw")
    with staged_file(args.out) as tmp:
        engine = draw_circuit(circuit.edge_list(), tmp.with_suffix(args.out.suffix), title=args.title or
                              f"{args.circuit.name}: {circuit.n_edges} edges, sparsity {circuit.sparsity:.4f}")
        tmp.with_suffix(args.out.suffix).replace(tmp)
    print(f"wrote {args.out} ({engine})")
    return 0


def info(args: Namespace) -> int:
    from .info import main as info_main

    info_main()
    return 0


def plan(args: Namespace) -> int:
    try:
        from . import plan as planner
    except ImportError:
        raise UsageError("the memory planner (edgeprune_fast.plan) is not part of this installation") from None
    return int(planner.run(args) or 0)


# -- demo --------------------------------------------------------------------------------------------
def demo(args: Namespace) -> int:
    from .circuit import Circuit
    from .draw import draw_circuit
    from .tasks.tracr import TRACR_DEFAULTS, prune_tracr

    steps = args.steps
    if steps is not None and steps < 1:
        raise UsageError(f"--steps: expected an integer >= 1, got {steps}")
    print(f"demo: pruning the shipped tracr `reverse` model ({'split' if args.split_embeds else 'one'} embedding "
          f"node{'s' if args.split_embeds else ''}, {steps or TRACR_DEFAULTS.steps} steps, seed {TRACR_DEFAULTS.seed}, "
          "zero ablation)", file=sys.stderr)
    check_out_folder(args.out, replace_previous=True)
    with staged_output(args.out, replace_previous=True) as stage:
        result = prune_tracr(split_embeds=args.split_embeds, steps=steps, out_dir=stage / "checkpoints",
                             progress=not args.quiet)
        summary = result.summary()
        truth = {tuple(e) for e in result.ground_truth or []}
        found = set(result.edges)
        metrics = {"accuracy": result.accuracy, "auc": result.auc, "exact": result.exact,
                   "matched": len(found & truth), "missing": summary["missing"], "extra": summary["extra"],
                   "seconds": summary["seconds"], "final_kl": summary["final_kl"]}
        circuit = Circuit.from_edges(result.model.graph, result.edges, metrics=metrics,
                                     config={"model": "tracr reverse (shipped)", "split_embeds": args.split_embeds,
                                             "settings": summary["settings"], "discretise": "z_det > 0"})
        circuit.save(stage / "circuit.json")
        if circuit.n_edges:
            draw_circuit(circuit.edge_list(), stage / f"{PICTURE_NAME}.{args.picture}",
                         title=f"tracr reverse: {circuit.n_edges} edges found")
        if truth:
            draw_circuit(sorted(truth), stage / f"ground_truth.{args.picture}",
                         title=f"tracr reverse: known circuit ({len(truth)} edges)")
        (stage / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\nfound {len(found)} edges of {result.model.graph.n_edges} in {summary['seconds']:.1f} s "
          f"({result.steps} steps); accuracy of the circuit on the examples: {result.accuracy:.3f}")
    if truth:
        print(f"known circuit: {len(truth)} edges; matched {len(found & truth)}, missing {len(truth - found)}, "
              f"extra {len(found - truth)}; exact recovery: {'yes' if result.exact else 'no'}; "
              f"ROC AUC of the edge scores: {result.auc:.4f}")
        for label, edges in (("missing", truth - found), ("extra", found - truth)):
            listed = sorted(edges)
            for w, r in listed[:12]:
                print(f"  {label}: {w}->{r}")
            if len(listed) > 12:
                print(f"  ... and {len(listed) - 12} more {label} edges (all in summary.json)")
    print(f"wrote {args.out}/circuit.json and {args.out}/{PICTURE_NAME}.{args.picture}")
    return 0
