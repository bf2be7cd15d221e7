"""`edgeprune prune`: train the masks of a saved HF model on a task, once per target
sparsity, discretise, evaluate on the validation split and write per target
``circuit.json`` (ours), ``circuit.eap-ig.json`` (EAP-IG/MIB), ``masks.safetensors`` and a
picture; a sweep adds ``sweep.json`` and ``kl_vs_sparsity.png``.

Long runs: the trainer checkpoints into ``OUT/checkpoint/`` every ``--checkpoint-every``
steps (default: every 10 % of the steps; runs.py has the layout), the learned masks are
written before they are discretised, and the outputs are staged there until every target
is done. ``edgeprune prune --resume OUT`` continues a run killed at any point, SIGKILL
included, with the settings stored in OUT (a sweep at its first unfinished target), and
ends with the masks of the uninterrupted run. SIGINT / SIGTERM stop after the current step
with a checkpoint, print the resume command and exit with 130 / 143.

Tracr exports (``--model`` in the shared tracr format) are pruned on their own example
sets with the tracr recipe (tasks.tracr.TRACR_DEFAULTS) for every option left unset, and
the circuit is compared with the export's ground truth; options given explicitly win.

Under torchrun (WORLD_SIZE > 1): data parallel over the processes
(distributed.DataParallel), optionally with FSDP2-sharded weights (--shard-weights); rank 0
prints and writes (the run folder must be on a file system every process sees, to resume).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from argparse import ArgumentParser, Namespace
from pathlib import Path
from typing import Any

from ..errors import RunFailed, UsageError
from ..interrupts import StopOnSignal
from ..staging import check_out_folder
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
    tracr_export,
    write_circuit_files,
)

NAME = "prune"
HELP = "prune a model on a task and write the circuit"
# settings that are files: stored as text in run.json, Paths again on resume
_PATHS = ("model", "data", "out", "init_from")


def add_arguments(pr: ArgumentParser) -> None:
    add_model_options(pr, required=False, recipe=True)
    add_task_source(pr, required=False)
    tgt = pr.add_mutually_exclusive_group()
    tgt.add_argument("--sparsity", type=sparsity, default=None, help="target edge sparsity in [0, 2) (default 0.98; "
                     "tracr exports: 1.02; targets >= 1 keep pushing in training and take the edges with non-zero "
                     "masks)")
    tgt.add_argument("--sweep", type=sparsity, nargs="+", help="several target sparsities (one run each)")
    pr.add_argument("--node-sparsity", type=sparsity, default=None, help="target node sparsity (default: none)")
    pr.add_argument("--no-node-masks", action="store_true", help="edge masks only (tracr exports: always, unless "
                    "--node-sparsity is given)")
    pr.add_argument("--steps", type=positive_int, default=None, help="default 3000 (tracr exports: 4000)")
    pr.add_argument("--lr", type=float, default=None, help="learning rate of masks and lambdas (default 0.8; tracr "
                    "exports: TRACR_DEFAULTS' lr_edge 0.05, lr_lambda 0.01, no weight decay)")
    pr.add_argument("--init", type=float, default=None, help="initial log_alpha (default 10; tracr exports: 3)")
    pr.add_argument("--init-from", type=Path, default=None, metavar="SCORES",
                    help="start the edge masks from an EAP-IG scores file (edgeprune attribute): by rank, the "
                         "target's top edges by |score| kept, the others below the threshold (warm_start.py)")
    pr.add_argument("--sparsity-warmup", type=int, default=None, help="default: 5/6 of --steps (tracr exports: "
                    "2700 of 4000, scaled to --steps)")
    pr.add_argument("--lr-warmup", type=int, default=None, help="default: 1/15 of --steps (tracr exports: 250 of "
                    "4000, scaled)")
    pr.add_argument("--discretise", choices=["exact", "masks"], default="exact",
                    help="exact: keep exactly round((1 - target) * n_edges) edges (default); masks: the edges "
                         "whose deterministic mask is non-zero")
    pr.add_argument("--picture", choices=["svg", "png", "pdf", "none"], default="svg")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    pr.add_argument("--shard-weights", action="store_true",
                    help="under torchrun: shard the frozen weights over the processes (FSDP2), 1/N each")
    pr.add_argument("--checkpoint-every", type=positive_int, default=None,
                    help="write a checkpoint into OUT/checkpoint every N steps (default: every 10 %% of --steps)")
    pr.add_argument("--out", type=Path, default=None, help="a new (or empty) folder for the outputs")
    pr.add_argument("--resume", type=Path, default=None, metavar="OUT",
                    help="continue the interrupted run in OUT with the settings stored there (no other options "
                         "but --quiet)")


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
    if args.batch_size is not None and args.batch_size < world:  # every process takes a slice of every global batch
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


# -- settings ------------------------------------------------------------------------------------
HF_RECIPE = {"sparsity": 0.98, "steps": 3000, "lr": 0.8, "init": 10.0, "ablation": "corrupted", "batch_size": 8}


def apply_recipe(args: Namespace) -> None:
    """Fill the options left unset (None) from the model kind's recipe: HF_RECIPE, or for a
    tracr export TRACR_DEFAULTS (warm-ups scaled to --steps as prune_tracr does; ``lr`` stays
    None: the recipe's separate edge / lambda rates; edge masks only unless --node-sparsity)."""
    if tracr_export(args.model) is None:
        for k, v in HF_RECIPE.items():
            if getattr(args, k) is None:
                setattr(args, k, v)
        return
    from ..tasks.tracr import TRACR_DEFAULTS as D

    scale = 1.0 if args.steps is None else args.steps / D.steps
    fill = {"sparsity": D.target_edge_sparsity, "steps": D.steps, "init": D.init, "ablation": "zero",
            "batch_size": D.batch_size, "sparsity_warmup": round(D.sparsity_warmup * scale),
            "lr_warmup": round(D.lr_warmup * scale)}
    for k, v in fill.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if not D.node_masks and args.node_sparsity is None:
        args.no_node_masks = True


def _check_new_run(args: Namespace) -> None:
    """What argparse cannot check because --resume makes it optional."""
    for name, flag in (("model", "--model"), ("out", "--out")):
        if getattr(args, name) is None:
            raise UsageError(f"{flag}: required (unless --resume OUT continues an interrupted run)")
    apply_recipe(args)
    if args.task is None and args.data is None and tracr_export(args.model) is None:
        raise UsageError("--task or --data: expected one of them (unless --resume OUT continues an interrupted run)")
    if args.node_sparsity is not None and args.no_node_masks:
        raise UsageError(f"--node-sparsity: needs node masks; expected it without --no-node-masks, got "
                         f"--node-sparsity {args.node_sparsity} --no-node-masks")
    for name in ("sparsity_warmup", "lr_warmup"):
        value = getattr(args, name)
        if value is not None and not 0 <= value <= args.steps:
            raise UsageError(f"--{name.replace('_', '-')}: expected an integer in [0, --steps={args.steps}] (a "
                             f"warm-up longer than the run never ends), got {value}")


def _settings(args: Namespace) -> dict[str, Any]:
    return {k: (str(v) if k in _PATHS and v is not None else v) for k, v in vars(args).items()
            if k not in ("resume", "command", "quiet")}


def _resumed_args(args: Namespace, stored: dict[str, Any]) -> Namespace:
    """The stored settings, with --quiet from the command line; UsageError if other options came too."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = vars(parser.parse_args(["--resume", str(args.resume)]))
    given = [k for k, v in vars(args).items() if k not in ("resume", "quiet", "command") and v != defaults.get(k)]
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise UsageError(f"--resume: continues with the settings stored in {args.resume / 'checkpoint' / 'run.json'}; "
                         f"expected no other options but --quiet, got {flags}")
    resumed = Namespace(**{k: (Path(v) if k in _PATHS and v is not None else v) for k, v in stored.items()})
    resumed.out, resumed.quiet, resumed.resume, resumed.command = args.resume, args.quiet, args.resume, args.command
    return resumed


def checkpoint_every(args: Namespace) -> int:
    return args.checkpoint_every or max(1, args.steps // 10)


# -- prune ---------------------------------------------------------------------------------------
def run(args: Namespace) -> int:
    """Tracr exports (``--model`` in the shared tracr format) are pruned on their own example
sets with the tracr recipe (tasks.tracr.TRACR_DEFAULTS) for every option left unset, and
the circuit is compared with the export's ground truth; options given explicitly win.

Under torchrun (WORLD_SIZE > 1) every process runs all of this: training on its slice
    of each global batch (distributed.DataParallel), and the same circuit evaluation (with
    sharded weights every forward gathers collectively, so all ranks must run it); rank 0
    alone prints and writes ``--out``."""
    from ..runs import RunFolder

    folder = None
    if args.resume is not None:
        if RunFolder.is_finished_run(args.resume):
            print(f"nothing to resume: {args.resume} holds a finished run")
            return 0
        folder = RunFolder.open(args.resume)
        args = _resumed_args(args, folder.settings)
        targets = folder.targets
    else:
        _check_new_run(args)
        targets = sorted(set(args.sweep)) if args.sweep else [args.sparsity]  # apply_recipe filled it
    rank, world = torchrun_world()
    check_processes(args, world)
    if rank > 0:  # other ranks stay quiet: no transformers progress bars either
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if folder is None:
        check_out_folder(args.out)  # before the slow part
    tokenizer = load_tokenizer(args.model)
    task = load_task(args, tokenizer)  # before the model: data errors come fast
    train_batches = task.batches(args.batch_size, "train")
    eval_batches = task.batches(args.batch_size, "validation")
    with StopOnSignal() as stop:
        if world <= 1:
            return _prune(args, targets, task, train_batches, eval_batches, None, train_batches, folder, stop)
        dp_batches = shareable_batches(train_batches, world, report=rank == 0)
        dp = join_processes(args)
        try:
            return _prune(args, targets, task, dp_batches, eval_batches, dp, train_batches, folder, stop)
        finally:
            dp.close()  # every rank leaves the process group, on success or error


def _prune(args: Namespace, targets: list[float], task, train_batches, eval_batches, dp, mean_batches, folder,
           stop: StopOnSignal) -> int:
    """Load, train per target, evaluate, write; ``dp``: a DataParallel under torchrun, else None.
    ``mean_batches``: every training batch (mean ablation's means), ``train_batches`` may
    leave out a short last one under torchrun (shareable_batches). ``folder``: the run
    folder being resumed, or None for a new run."""
    import torch

    from ..runs import RunFolder
    from ..train import NonFiniteLoss, TrainingInterrupted

    is_main = dp is None or dp.is_main
    out, err = (sys.stdout, sys.stderr) if is_main else (io.StringIO(), io.StringIO())  # other ranks stay quiet
    torch.manual_seed(args.seed)
    kw = dict(split_embeds=args.split_embeds, node_masks=not args.no_node_masks, init=args.init,
              checkpoint_layers=args.checkpoint_layers, corrupted_on_cpu=args.corrupted_on_cpu)
    model = load_model(args, None if dp is None else dp.device,
                       ablation="zero" if args.ablation == "mean" else args.ablation, **kw)
    if args.ablation == "mean":
        # each process takes the means over all the training batches, before any sharding: the
        # same values on every rank with no communication, and the same as one process's
        model.use_mean_ablation(mean_batches)
    init_scores = None
    if getattr(args, "init_from", None) is not None:  # before anything is written: a bad file leaves nothing
        from ..warm_start import read_scores

        try:
            init_scores = read_scores(args.init_from, model.graph)
        except ValueError as exc:
            raise UsageError(f"--{str(exc).replace('_', '-', 1)}") from None
    if args.shard_weights:
        dp.shard_weights(model)  # collective; after the model is on its device, in its dtype
    def stop_now() -> bool:  # the processes agree, so that none is left waiting for the others
        return stop.requested() if dp is None else dp.any_process(stop.requested())

    if stop_now():
        raise KeyboardInterrupt  # before anything was written: the plain message is the right one
    if folder is None:
        folder = RunFolder.create(args.out, _settings(args), targets) if is_main else RunFolder(args.out, {
            "targets": targets, "done": {}})
        if dp is not None:
            dp.barrier()  # the folder exists before any process looks into it
    elif is_main:
        print(f"resuming {args.out} ({len(folder.state['done'])} of {len(targets)} targets done)", file=err)
    resume = f"edgeprune prune --resume {args.out}"
    rows: list[dict[str, Any]] = []
    try:
        for i, target in enumerate(targets):
            if (row := folder.done(target)) is not None:
                rows.append(row)
                continue
            rows.append(_one_target(args, target, task, model, train_batches, eval_batches, dp, folder, stop,
                                    is_main, out, err, init_scores))
            if is_main:
                folder.mark_done(target, rows[-1])
            if i + 1 < len(targets) and stop_now():
                raise TrainingInterrupted(-1, folder.root)
        if is_main:
            if len(targets) > 1:
                from ..draw import plot_sweep

                stage = folder.outputs()
                (stage / "sweep.json").write_text(json.dumps(rows, indent=1) + "\n")
                plot_sweep(rows, stage / "kl_vs_sparsity.png", title=f"{Path(str(args.model)).name} on "
                           f"{_source(args)}")
            folder.finish()
    except (TrainingInterrupted, KeyboardInterrupt):
        if is_main:
            print(f"edgeprune prune: interrupted by {stop.name or 'SIGINT'}; the checkpoint is in {folder.root}; "
                  f"resume with: {resume}", file=sys.stderr)
        return stop.exit_code if stop.requested() else 130
    except NonFiniteLoss as exc:
        raise RunFailed(f"{exc}; the run is kept in {folder.root}") from None
    except Exception as exc:
        if is_main and not folder.has_progress():  # nothing learned yet: leave nothing behind
            folder.discard()
            raise
        if isinstance(exc, (UsageError, RunFailed)):
            raise
        raise RunFailed(f"{type(exc).__name__}: {exc}; the run so far is kept in {folder.root} (the learned masks "
                        f"included); after fixing the cause, continue it with: {resume}") from exc
    if is_main:
        print(f"wrote {args.out}")
    return 0


def _source(args: Namespace) -> str:
    if args.data is not None:
        return str(args.data)
    return args.task or "its example sets"


def _one_target(args, target, task, model, train_batches, eval_batches, dp, folder, stop, is_main, out, err,
                init_scores=None) -> dict:
    """Train (or continue training) one target, then write its masks, discretise, evaluate
    and write its files into the staged outputs; the summary row. ``init_scores`` [E]: the
    edge masks start from them (warm_start.py) instead of ``--init``."""
    import torch

    from ..circuit import Circuit, evaluate_circuit
    from ..train import NonFiniteLoss, TrainConfig, Trainer

    processes = "" if dp is None else (f", {dp.world_size} processes on {dp.device.type}" +
                                       (", weights sharded" if args.shard_weights else ""))
    torch.manual_seed(args.seed)
    model.clear_circuit()
    model.masks.reset(args.init, 0.01)  # every target starts from the same masks
    if init_scores is not None:
        from ..warm_start import warm_start

        n_keep = warm_start(model.masks, init_scores, target)
        print(f"target {target}: edge masks start from {args.init_from} (its top {n_keep} edges by |score| kept)",
              file=err)
    if args.lr is None:  # a tracr export without --lr: the tracr recipe's rates (apply_recipe)
        from ..tasks.tracr import TRACR_DEFAULTS as D

        rates = dict(lr_edge=D.lr_edge, lr_node=D.lr_node, lr_lambda=D.lambda_lr(model.graph.n_edges),
                     weight_decay=D.weight_decay)
    else:
        rates = dict(lr_edge=args.lr, lr_node=args.lr, lr_lambda=args.lr)
    config = TrainConfig(target_edge_sparsity=target, target_node_sparsity=args.node_sparsity, steps=args.steps,
                         sparsity_warmup=args.sparsity_warmup, lr_warmup=args.lr_warmup, **rates, seed=args.seed,
                         checkpoint_every=checkpoint_every(args), progress=is_main and not args.quiet)
    trainer = Trainer(model, task, train_batches, config, data_parallel=dp, out_dir=folder.trainer_dir(target))
    saved = folder.trainer_dir(target) / "checkpoint"
    if saved.with_suffix(".safetensors").is_file():
        trainer.load_checkpoint(saved)
        print(f"target {target}: resuming at step {trainer.step} of {args.steps}", file=err)
    else:
        print(f"pruning {args.model} on {_source(args)} to edge sparsity {target} ({args.steps} steps{processes})",
              file=err)
    try:
        history = trainer.run(should_stop=stop.requested)
    except NonFiniteLoss as exc:
        raise NonFiniteLoss(f"target {target}: {exc}") from None
    model.eval()
    stage = folder.stage(target) if is_main else None
    if stage is not None:  # the learned masks first: whatever happens next, they are kept
        model.save_masks(stage / "masks.safetensors")
    circuit = Circuit.from_masks(model, target if args.discretise == "exact" else None,
                                 config={"model": str(args.model), "task": _source(args), "ablation": args.ablation,
                                         "post_norm": model.post_norm, "dtype": args.dtype, "split_embeds": args.split_embeds,
                                         "node_masks": not args.no_node_masks, "train": config.to_dict(),
                                         "batch_size": args.batch_size,
                                         "processes": 1 if dp is None else dp.world_size,
                                         "final_train_kl": history[-1]["kl"] if history else None,
                                         "run": _settings(args)})
    _say_which_circuit(circuit, target, err)
    circuit = evaluate_circuit(model, circuit, task, eval_batches)  # on every rank: see run
    if (export := tracr_export(args.model)) is not None:
        from ..tasks.tracr import compare_with_ground_truth

        truth = compare_with_ground_truth(circuit.edge_list(), *export, split_embeds=args.split_embeds)
        if truth is not None:
            circuit = circuit.with_metrics({"ground_truth": truth})
    if stage is not None:
        write_circuit_files(stage, circuit, model.masks, model.adapter.d_model, args.picture, save_masks=False)
    print(f"target sparsity {target}:", file=out)
    print_metrics(circuit, out)
    return {"target": target, "sparsity": circuit.sparsity, "n_edges": circuit.n_edges,
            **{k: v for k, v in circuit.metrics.items() if isinstance(v, (int, float, str))}}


def _say_which_circuit(circuit, target: float, err) -> None:
    """A note where the circuit is not the target's exact count: targets >= 1, empty circuits."""
    d = circuit.config["discretisation"]
    if d["rule"] == "non-zero masks (target >= 1)":
        print(f"note: target {target} >= 1 keeps no edge by count; the circuit is the {circuit.n_edges} edges whose "
              f"deterministic masks are non-zero (sparsity {circuit.sparsity:.6f})", file=err)
    if circuit.n_edges == 0:
        print(f"warning: the circuit at target {target} is EMPTY: no edge has a non-zero mask ({d['rule']})", file=err)
