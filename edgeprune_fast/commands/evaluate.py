"""`edgeprune eval`: a circuit file (ours or EAP-IG/MIB's graph JSON) on a task: KL to the
full model, the task metric for circuit / full / empty, faithfulness. A score file (every
edge in_graph false, MIB's importances) needs ``--top-n`` or ``--top-percent``; a MIB file
of a grouped-query model loads into the per-query-head graph (``--kv-per-query-head``) as it
is, or into the grouped one by ``--gqa``."""

from __future__ import annotations

from argparse import ArgumentParser, Namespace
from pathlib import Path

from ..staging import staged_file
from .common import (
    add_model_options,
    add_selection_options,
    add_task_source,
    load_model,
    load_task,
    load_tokenizer,
    print_metrics,
)

NAME = "eval"
HELP = "evaluate a circuit file (ours or EAP-IG/MIB) on a task"


def add_arguments(ev: ArgumentParser) -> None:
    ev.add_argument("circuit", type=Path)
    add_model_options(ev)
    add_task_source(ev)
    add_selection_options(ev)
    ev.add_argument("--split", choices=["train", "validation"], default="validation")
    ev.add_argument("--out", type=Path, default=None, help="write the circuit with its metrics to this JSON file")


def run(args: Namespace) -> int:
    from ..circuit import evaluate_circuit
    from ..formats import load_circuit

    tokenizer = load_tokenizer(args.model)
    task = load_task(args, tokenizer)
    batches = task.batches(args.batch_size, args.split)
    model = load_model(args, split_embeds=args.split_embeds, ablation=args.ablation)
    circuit = load_circuit(args.circuit, model.graph, gqa=args.gqa, top_n=args.top_n, top_percent=args.top_percent)
    circuit = evaluate_circuit(model, circuit, task, batches)
    print(f"{args.circuit} on {args.data or args.task} ({args.split}, {circuit.metrics['n_examples']} examples):")
    print_metrics(circuit)
    if args.out is not None:
        with staged_file(args.out) as tmp:
            circuit.save(tmp)
        print(f"wrote {args.out}")
    return 0
