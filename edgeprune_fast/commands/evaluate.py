"""`edgeprune eval`: a circuit file (ours or EAP-IG/MIB's graph JSON) on a task: KL to the
full model, the task metric for circuit / full / empty, faithfulness.

The ablation and the embedding mode default to the ones the circuit was made with (our
files store them; EAP-IG/MIB files have one ``input`` node and are taken as corrupted
ablation); an option that overrides the file's setting says so. Mean ablation takes its
means over the task's training batches, as prune does.
"""

from __future__ import annotations

import sys
from argparse import ArgumentParser, Namespace
from pathlib import Path

from ..staging import staged_file
from .common import add_model_options, add_task_source, load_model_for, load_task, load_tokenizer, print_metrics

NAME = "eval"
HELP = "evaluate a circuit file (ours or EAP-IG/MIB) on a task"


def add_arguments(ev: ArgumentParser) -> None:
    ev.add_argument("circuit", type=Path)
    add_model_options(ev, stored=True)
    add_task_source(ev)
    ev.add_argument("--split", choices=["train", "validation"], default="validation")
    ev.add_argument("--out", type=Path, default=None, help="write the circuit with its metrics to this JSON file")


def stored_settings(path: Path) -> tuple[str | None, bool | None]:
    """(ablation, split_embeds) a circuit file was made with; None where it does not say."""
    from ..circuit import read_circuit_json
    from ..formats import is_eap_ig

    d = read_circuit_json(path)
    if is_eap_ig(d):
        return None, False  # their graph has one input node
    graph = d.get("graph") or {}
    return (d.get("config") or {}).get("ablation"), graph.get("split_embeds")


def resolve(args: Namespace, path: Path, err=None) -> tuple[str, bool]:
    """The ablation and embedding mode to use: the options where given (said when they override
    the file's), else the file's, else corrupted / one embeds node."""
    err = sys.stderr if err is None else err
    file_ablation, file_split = stored_settings(path)
    chosen = []
    for flag, given, stored, fallback in (("--ablation", args.ablation, file_ablation, "corrupted"),
                                          ("--split-embeds", args.split_embeds, file_split, False)):
        if given is not None and stored is not None and given != stored:
            print(f"note: {flag} {given} overrides the circuit file's {stored}", file=err)
        chosen.append(given if given is not None else stored if stored is not None else fallback)
    return chosen[0], bool(chosen[1])


def run(args: Namespace) -> int:
    from ..circuit import evaluate_circuit
    from ..formats import load_circuit

    ablation, split = resolve(args, args.circuit)
    tokenizer = load_tokenizer(args.model)
    task = load_task(args, tokenizer)
    batches = task.batches(args.batch_size, args.split)
    model = load_model_for(args, ablation, task.batches(args.batch_size, "train"), split_embeds=split)
    circuit = load_circuit(args.circuit, model.graph)
    circuit = evaluate_circuit(model, circuit, task, batches)
    circuit = circuit.with_metrics({"ablation": ablation})
    print(f"{args.circuit} on {args.data or args.task} ({args.split}, {circuit.metrics['n_examples']} examples, "
          f"{ablation} ablation):")
    print_metrics(circuit)
    if args.out is not None:
        with staged_file(args.out) as tmp:
            circuit.save(tmp)
        print(f"wrote {args.out}")
    return 0
