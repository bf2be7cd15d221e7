"""`edgeprune eval`: a circuit file (ours or EAP-IG/MIB's graph JSON) on a task: KL to the
full model, the task metric for circuit / full / empty, faithfulness.

The ablation, the embedding mode, the k/v readers and the post-norm mode (``--post-norm``,
Gemma-2 / OLMo-2: post_norm.py) default to the ones the circuit was made with (our files store them; EAP-IG/MIB files have one ``input`` node and are taken as
corrupted ablation on the grouped graph); an option that overrides the file's setting says
so. Mean ablation takes its means over the task's training batches, as prune does. A score
file (every edge in_graph false, MIB's importances) needs ``--top-n`` or ``--top-percent``;
a tracr export (``--model`` in the shared tracr format) is evaluated on its own example
sets (accuracy on the program) and compared with its ground truth; a MIB file of a
grouped-query model loads into the per-query-head graph
(``--kv-per-query-head``) as it is, or into the grouped one by ``--gqa``.
"""

from __future__ import annotations

import sys
from argparse import ArgumentParser, Namespace
from pathlib import Path

from ..errors import UsageError
from ..staging import staged_file
from .common import (
    add_model_options,
    add_selection_options,
    add_task_source,
    load_model_for,
    load_task,
    load_tokenizer,
    print_metrics,
    tracr_export,
)

NAME = "eval"
HELP = "evaluate a circuit file (ours or EAP-IG/MIB) on a task"


def add_arguments(ev: ArgumentParser) -> None:
    ev.add_argument("circuit", type=Path)
    add_model_options(ev, stored=True)
    add_task_source(ev, required=False)  # one of them, unless --model is a tracr export
    add_selection_options(ev)
    ev.add_argument("--split", choices=["train", "validation"], default="validation")
    ev.add_argument("--out", type=Path, default=None, help="write the circuit with its metrics to this JSON file")


def stored_settings(path: Path) -> dict[str, object | None]:
    """{ablation, split_embeds, kv_per_query_head, post_norm} a circuit file was made with; None where it
    does not say."""
    from ..circuit import read_circuit_json
    from ..formats import is_eap_ig

    d = read_circuit_json(path)
    if is_eap_ig(d):  # their graph: one input node; the k/v question is --gqa's
        return {"ablation": None, "split_embeds": False, "kv_per_query_head": None, "post_norm": None}
    graph, config = d.get("graph") or {}, d.get("config") or {}
    return {"ablation": config.get("ablation"), "split_embeds": graph.get("split_embeds"),
            "kv_per_query_head": graph.get("kv_per_query_head"), "post_norm": config.get("post_norm")}


DEFAULTS = {"ablation": "corrupted", "split_embeds": False, "kv_per_query_head": False, "post_norm": "writer"}


def resolve(args: Namespace, path: Path, err=None) -> dict[str, object]:
    """The settings to use: the options where given (said when they override the file's),
    else the file's, else DEFAULTS."""
    err = sys.stderr if err is None else err
    chosen = {}
    for name, stored in stored_settings(path).items():
        given = getattr(args, name)
        if given is not None and stored is not None and given != stored:
            print(f"note: --{name.replace('_', '-')} {given} overrides the circuit file's {stored}", file=err)
        chosen[name] = given if given is not None else stored if stored is not None else DEFAULTS[name]
    return chosen


def run(args: Namespace) -> int:
    from ..circuit import evaluate_circuit, read_circuit_json
    from ..formats import is_eap_ig, load_circuit
    from ..post_norm import has_post_norms

    if args.task is None and args.data is None and tracr_export(args.model) is None:
        raise UsageError("--task or --data: expected one of them (a tracr export --model brings its own examples)")
    settings = resolve(args, args.circuit)
    tokenizer = load_tokenizer(args.model)
    task = load_task(args, tokenizer)
    batches = task.batches(args.batch_size, args.split)
    ablation = settings["ablation"]
    model = load_model_for(args, ablation, task.batches(args.batch_size, "train"),
                           split_embeds=bool(settings["split_embeds"]),
                           kv_per_query_head=bool(settings["kv_per_query_head"]), post_norm=settings["post_norm"])
    circuit = load_circuit(args.circuit, model.graph, gqa=args.gqa, top_n=args.top_n, top_percent=args.top_percent)
    circuit = evaluate_circuit(model, circuit, task, batches)
    circuit = circuit.with_metrics({"ablation": ablation, "post_norm": model.post_norm})
    if (export := tracr_export(args.model)) is not None:  # a tracr export: its examples and its ground truth
        from ..tasks.tracr import compare_with_ground_truth

        truth = compare_with_ground_truth(circuit.edge_list(), *export, split_embeds=bool(settings["split_embeds"]))
        if truth is not None:
            circuit = circuit.with_metrics({"ground_truth": truth})
    if settings["post_norm"] == "writer" and has_post_norms(model.adapter) and is_eap_ig(read_circuit_json(args.circuit)):
        print("note: an EAP-IG/MIB file on a model with post-attention norms, evaluated with --post-norm writer (ours); "
              "MIB's evaluation norms each reader's mix of a layer's heads: --post-norm reader", file=sys.stderr)
    post = f", post-norm {settings['post_norm']}" if has_post_norms(model.adapter) else ""
    source = args.data or args.task or "the export's example sets"
    print(f"{args.circuit} on {source} ({args.split}, {circuit.metrics['n_examples']} examples, "
          f"{ablation} ablation{post}):")
    print_metrics(circuit)
    if args.out is not None:
        with staged_file(args.out) as tmp:
            circuit.save(tmp)
        print(f"wrote {args.out}")
    return 0
