"""`edgeprune attribute`: EAP / EAP-IG scores of every edge (attribution.py), written as
EAP-IG's graph JSON (its current form, formats.py) on EAP-IG's graph: one ``input`` node, k
and v inputs per query head (MIB's graph; a grouped-query model is attributed on it
directly, so every file edge has its own exact score). ``--top-n N`` marks the N edges with
the largest |score| (``--signed``: the largest scores) in_graph, as EAP-IG's ``apply_topn``;
otherwise every edge is in_graph false: a scores file, which ``edgeprune eval --top-n``,
``edgeprune mib evaluate`` and ``edgeprune prune --init-from`` read. Under torchrun the
processes share every batch (and with ``--shard-weights`` the weights, FSDP2), as prune.
"""

from __future__ import annotations

import json
from argparse import ArgumentParser, Namespace
from pathlib import Path

from ..errors import UsageError
from ..staging import staged_file
from .common import (
    add_model_options,
    add_task_source,
    load_model,
    load_task,
    load_tokenizer,
    non_negative_int,
    positive_int,
)

NAME = "attribute"
HELP = "EAP / EAP-IG scores of every edge, as an EAP-IG scores file"
METHODS = ("eap", "eap-ig", "eap-ig-activations")
METRICS = ("logit-diff", "log-prob", "kl")


def add_arguments(p: ArgumentParser) -> None:
    add_model_options(p)
    add_task_source(p)
    p.add_argument("--method", choices=METHODS, default="eap-ig",
                   help="eap: one gradient at the clean input; eap-ig: EAP-IG-inputs (embeddings interpolated); "
                        "eap-ig-activations: each writer group interpolated in turn (default eap-ig)")
    p.add_argument("--ig-steps", type=positive_int, default=5, help="interpolation steps of the IG methods (default 5)")
    p.add_argument("--metric", choices=METRICS, default=None,
                   help="what the scores are the gradient of (default: logit-diff where the task has a contrasting "
                        "answer, else log-prob; kl is -KL to the full model, for the IG methods only)")
    p.add_argument("--split", choices=["train", "validation"], default="train",
                   help="the task split attributed over (default train, the one prune trains on)")
    p.add_argument("--top-n", type=non_negative_int, default=None,
                   help="mark the N edges with the largest |score| in_graph (default: none, a scores-only file)")
    p.add_argument("--signed", action="store_true", help="--top-n takes the largest scores, not the largest |score|")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--shard-weights", action="store_true",
                   help="under torchrun: shard the frozen weights over the processes (FSDP2), 1/N each")
    p.add_argument("--out", type=Path, required=True, help="the scores file to write (JSON)")


def _check(args: Namespace) -> None:
    if args.ablation != "corrupted":
        raise UsageError(f"--ablation: attribution patches from the corrupted input (EAP-IG's 'patching'); expected "
                         f"corrupted, got {args.ablation}")
    if args.split_embeds:
        raise UsageError("--split-embeds: EAP-IG's graph has one input node, and the position embedding does not "
                         "differ between clean and corrupted inputs (its scores are 0); expected no --split-embeds")
    if args.corrupted_on_cpu:
        raise UsageError("--corrupted-on-cpu: attribution's forward reads no corrupted states (its slot buffer holds "
                         "clean - corrupted, computed before it); expected no --corrupted-on-cpu")
    if args.post_norm == "reader":
        raise UsageError("--post-norm: attribution scores the writer graph (EAP-IG's scores, too, leave out the "
                         "post-norm's Jacobian); expected writer, got reader")
    if args.signed and args.top_n is None:
        raise UsageError("--signed: orders the edges --top-n marks; expected it with --top-n N, got no --top-n")
    if args.out.is_dir():
        raise UsageError(f"--out: expected a file name, got {str(args.out)!r}, which is a folder")


def run(args: Namespace) -> int:
    """Under torchrun (WORLD_SIZE > 1) every process attributes its rows of each batch (weights
    replicated, or FSDP2-sharded with --shard-weights); rank 0 prints and writes --out."""
    _check(args)
    from ..attribution import attribute, check_method_metric, default_metric
    from ..torchrun import torchrun_world
    from .prune import check_processes, join_processes

    rank, world = torchrun_world()
    check_processes(args, world)
    tokenizer = load_tokenizer(args.model)
    task = load_task(args, tokenizer)
    metric = args.metric or default_metric(task)
    try:
        check_method_metric(args.method, metric, task)
    except ValueError as exc:
        raise UsageError(f"--{str(exc)}") from None
    batches = task.batches(args.batch_size, args.split)
    if world > 1 and len(batches[-1]) < world:
        raise UsageError(f"--batch-size: every batch is split over the {world} processes; the last of "
                         f"{sum(len(b) for b in batches)} examples in batches of {args.batch_size} has "
                         f"{len(batches[-1])} rows, expected at least {world}")
    dp = join_processes(args) if world > 1 else None
    try:
        model = load_model(args, None if dp is None else dp.device, kv_per_query_head=True)  # EAP-IG's graph
        n = model.graph.n_edges
        if args.top_n is not None and args.top_n > n:
            raise UsageError(f"--top-n: expected at most the graph's {n} edges, got {args.top_n}")
        if args.shard_weights:
            dp.shard_weights(model)
        scores = attribute(model, task, batches, method=args.method, metric=metric, ig_steps=args.ig_steps,
                           progress=not args.quiet and rank == 0, data_parallel=dp)
        if rank > 0:
            return 0
        d = scores_file(model.graph, scores, d_model=model.adapter.d_model, top_n=args.top_n, signed=args.signed)
    finally:
        if dp is not None:
            dp.close()
    d["attribution"] = {"method": args.method, "metric": metric, "ig_steps": args.ig_steps,
                        "examples": sum(len(b) for b in batches), "split": args.split, "processes": world,
                        "task": str(args.data or args.task), "sign": "d metric / d z (positive: the edge helps)"}
    with staged_file(args.out) as tmp:
        tmp.write_text(json.dumps(d))
    s = scores.abs()
    print(f"{args.method} ({metric}, {args.ig_steps if args.method != 'eap' else 1} steps) over "
          f"{d['attribution']['examples']} examples: {n} edges scored (|score| max {float(s.max()):.4g}, "
          f"mean {float(s.mean()):.4g})" + (f"; top {args.top_n} marked in_graph" if args.top_n is not None else "")
          + (f"; {world} processes" if world > 1 else ""))
    print(f"wrote {args.out}")
    return 0


def scores_file(graph, scores, *, d_model: int, top_n: int | None = None, signed: bool = False) -> dict:
    """The EAP-IG object of ``scores`` [E] on ``graph`` (EAP-IG's own graph: one embedding
    writer, k/v per query head), every edge scored; the top_n edges (by |score|, or by score
    with ``signed``; ties by graph order) in_graph."""
    from ..formats import to_eap_ig
    from ..ranking import top_k

    edges = graph.edges()
    kept = []
    if top_n:
        keep = top_k(scores if signed else scores.abs(), top_n)
        kept = [e for e, k in zip(edges, keep.tolist()) if k]
    return to_eap_ig(graph, kept, dict(zip(edges, scores.tolist())), d_model=d_model)
