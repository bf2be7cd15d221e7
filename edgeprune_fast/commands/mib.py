"""`edgeprune mib`: MIB's circuit track (edgeprune_fast/mib/).

    edgeprune mib evaluate SOURCE --model M (--task T | --data D) --out report.json
        faithfulness at MIB's edge budgets (at most 0, 0.1, ..., 50, 100 % of MIB's edge count),
        CPR and CMD, and a picture (report.png beside the report). SOURCE: an EAP-IG/MIB score
        file, or a prune run folder (its masks rank every edge).
    edgeprune mib export RUN [RUN ...] --out DIR [--layout importances|circuits|both]
        each run as MIB's submission folder DIR/{task}_{model}/.
"""

from __future__ import annotations

import json
import sys
import time
from argparse import ArgumentParser, Namespace
from pathlib import Path

from ..errors import UsageError
from ..staging import staged_file, staged_output
from .common import add_model_options, load_model, load_tokenizer, positive_int

NAME = "mib"
HELP = "MIB's circuit track: faithfulness at its edge budgets (CPR, CMD), and its submission layout"


def add_arguments(p: ArgumentParser) -> None:
    sub = p.add_subparsers(dest="mib_command", required=True)
    ev = sub.add_parser("evaluate", help="faithfulness at MIB's edge budgets, CPR and CMD")
    ev.add_argument("source", type=Path, help="an EAP-IG/MIB score file (.json), or a prune run folder")
    add_model_options(ev, post_norm_default="reader for such models under --conventions mib, as MIB's evaluation; "
                                            "else writer")
    src = ev.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", help="a task of ours by name: ioi, greater-than, gendered-pronouns")
    src.add_argument("--data", type=Path, help="a local copy of a MIB data set (file or folder), or a JSONL of ours")
    ev.add_argument("--mib-task", default=None, help="the MIB task of --data (default: found from its columns)")
    ev.add_argument("--split", choices=["train", "validation", "test"], default="validation")
    ev.add_argument("--head", type=positive_int, default=None,
                    help="evaluate the first N examples of the split (MIB's --head)")
    ev.add_argument("--conventions", choices=["mib", "edgeprune"], default="mib",
                    help="MIB's (BOS, prune, what zero ablation keeps, post-norms normed per reader; default) or this "
                         "package's")
    ev.add_argument("--rank", choices=["auto", "abs", "signed"], default="auto",
                    help="score files: by |score|, by score, or auto: both when some score is negative "
                         "(CPR from the signed curve, CMD from the |score| curve, as MIB's print_results)")
    ev.add_argument("--split-embeds-rule", choices=["refuse", "merge"], default="refuse",
                    help="runs with split embeddings: refuse, or merge into MIB's one input node (larger score)")
    ev.add_argument("--out", type=Path, required=True, help="the report (JSON); its picture goes beside it (.png)")
    ex = sub.add_parser("export", help="prune runs as MIB submission folders")
    ex.add_argument("runs", nargs="+", type=Path, help="prune run folders (circuit.json, masks.safetensors)")
    ex.add_argument("--out", type=Path, required=True, help="the submission folder (one subfolder per task/model)")
    ex.add_argument("--layout", choices=["importances", "circuits", "both"], default="importances",
                    help="importances.json (scores), one circuit per budget, or both")
    ex.add_argument("--task", default=None, help="the MIB task (default: from the run's data, when a MIB file)")
    ex.add_argument("--model-name", choices=["gpt2", "qwen2.5", "gemma2", "llama3"], default=None,
                    help="MIB's model name (default: from the run's graph)")
    ex.add_argument("--d-model", type=positive_int, default=None, help="the model width (default: from the run)")
    ex.add_argument("--split-embeds-rule", choices=["refuse", "merge"], default="refuse")


def run(args: Namespace) -> int:
    return _evaluate(args) if args.mib_command == "evaluate" else _export(args)


# -- evaluate -----------------------------------------------------------------------------------------------
def _task(args, tokenizer):
    from ..mib.tasks import is_mib_data, load_mib_task
    from ..tasks import get_task

    if args.data is not None and is_mib_data(args.data):
        return load_mib_task(args.data, tokenizer, task=args.mib_task, conventions=args.conventions,
                             n_examples=args.head), True
    if args.mib_task is not None:
        raise UsageError(f"--mib-task: applies to MIB data files; {str(args.data or args.task)!r} is not one")
    if args.data is not None and not args.data.exists():
        raise UsageError(f"--data: expected a MIB data file or folder, or a JSONL file; {str(args.data)!r} does not exist")
    if args.data is not None:
        return get_task(args.data, tokenizer, n_validation=args.head), False
    task = get_task(args.task, tokenizer, n_examples=args.examples, n_validation=args.head, seed=args.seed)
    return task, False


def _post_norm(args, model) -> str:
    """--post-norm, or by default: "reader" for models with post-attention norms under MIB's
    conventions (as MIB's evaluation, post_norm.py), else "writer"; said when it matters."""
    from ..post_norm import has_post_norms

    if not has_post_norms(model.adapter):
        return model.post_norm  # writer (load_model refused --post-norm reader)
    if args.post_norm is not None:
        return args.post_norm
    chosen = "reader" if args.conventions == "mib" else "writer"
    print(f"note: {model.adapter.architecture} norms its attention output before the residual; "
          + ("each reader norms its own mix of a layer's heads, as MIB's evaluation (--post-norm reader)"
             if chosen == "reader" else "head h writes its share of the normed output (--post-norm writer)"),
          file=sys.stderr)
    return chosen


def _model(args, batches):
    from ..mib.evaluate import mib_zero_writers
    from ..model import EdgePrunedModel

    if args.split_embeds:
        raise UsageError("--split-embeds: MIB's graph has one input node; expected no --split-embeds")
    if args.ablation == "mean" and args.conventions == "mib":
        raise UsageError("--ablation mean: not under --conventions mib (EAP-IG's compute_mean_activations averages "
                         "over nodes and the last position, on CUDA only); use --conventions edgeprune for our mean "
                         "ablation, or corrupted / zero")
    model = load_model(args, split_embeds=False, ablation="corrupted" if args.ablation == "corrupted" else "zero",
                       kv_per_query_head=True)
    post_norm = _post_norm(args, model)
    if post_norm != model.post_norm:
        model = EdgePrunedModel.from_hf(model.hf, ablation=model.ablation, kv_per_query_head=True, post_norm=post_norm,
                                        checkpoint_layers=model.checkpoint_layers,
                                        corrupted_on_cpu=model.corrupted_on_cpu)
    kw = dict(ablation="mean", kv_per_query_head=True, checkpoint_layers=False, post_norm=post_norm)
    if args.ablation == "zero" and args.conventions == "mib":
        S = max(b.input_ids.shape[1] for b in batches)
        model = EdgePrunedModel.from_hf(model.hf, mean_writers=mib_zero_writers(model, S), **kw)
    elif args.ablation == "mean":
        import torch

        total, count = None, 0
        for b in batches:
            n = int(b.attention_mask.sum()) if b.attention_mask is not None else b.input_ids.numel()
            m = model.compute_mean_writers(b.input_ids, b.attention_mask).float() * n
            total, count = (m if total is None else total + m), count + n
        model = EdgePrunedModel.from_hf(model.hf, mean_writers=(total / count).to(torch.float32), **kw)
    return model


def _orders(args, graph):
    from ..circuit import read_circuit_json
    from ..mib.evaluate import order_from_file, order_from_masks

    src = args.source
    if src.is_dir():
        masks = src / "masks.safetensors"
        if not masks.is_file():
            raise UsageError(f"source: expected an EAP-IG/MIB score file or a prune run folder with "
                             f"masks.safetensors, {str(src)!r} has none")
        return {"masks": order_from_masks(masks, graph, split_embeds=args.split_embeds_rule)[0]}
    d = read_circuit_json(src)
    negative = any(isinstance(v, dict) and isinstance(v.get("score"), (int, float)) and v["score"] < 0
                   for v in (d.get("edges") or {}).values()) if isinstance(d, dict) else False
    kinds = {"auto": ["signed", "abs"] if negative else ["abs"], "abs": ["abs"], "signed": ["signed"]}[args.rank]
    return {k: order_from_file(d, graph, absolute=k == "abs") for k in kinds}


def _evaluate(args: Namespace) -> int:
    from tqdm import tqdm

    from ..circuit import _json_safe
    from ..mib.evaluate import budgets, curve_percents, evaluate_budgets, plot_curve, summarise
    from ..post_norm import has_post_norms

    if args.out.suffix != ".json":
        raise UsageError(f"--out: expected a .json report path, got {str(args.out)!r}")
    tokenizer = load_tokenizer(args.model)
    task, mib_data = _task(args, tokenizer)
    if args.conventions == "mib" and not mib_data:
        print("note: MIB's conventions prepend BOS to MIB data only; this task keeps its own tokenisation",
              file=sys.stderr)
    batches = task.batches(args.batch_size, args.split)
    model = _model(args, batches)
    graph = model.graph
    orders = _orders(args, graph)
    started = time.perf_counter()
    curves = {}
    n_total = sum(len(b) for b in batches) * len(orders)
    with tqdm(total=n_total, desc="mib evaluate", unit="ex", disable=not sys.stderr.isatty()) as bar:
        for kind, order in orders.items():
            circuits = budgets(graph, order, curve_percents(), pruned=args.conventions == "mib")
            result = evaluate_budgets(model, circuits, batches, task.metric, progress=bar.update)
            curves[kind] = {**result, **summarise(result["points"])}
    seconds = time.perf_counter() - started
    main = curves.get("signed") or next(iter(curves.values()))
    report = {
        "source": str(args.source), "model": str(args.model), "task": getattr(task, "name", None),
        "data": None if args.data is None else str(args.data), "split": args.split, "ablation": args.ablation,
        "conventions": args.conventions, "post_norm": model.post_norm if has_post_norms(model.adapter) else None, "metric": getattr(task, "metric_name", "metric"),
        "n_edges_total": graph.n_edges, "graph": json.loads(graph.signature()), "n_examples": main["n_examples"],
        "metric_full": main["metric_full"], "metric_empty": main["metric_empty"], "points": main["points"],
        "cpr": main["cpr"], "cmd": curves.get("abs", main)["cmd"], "average": main["average"],
        "curves": {k: {"points": c["points"], "cpr": c["cpr"], "cmd": c["cmd"], "average": c["average"]}
                   for k, c in curves.items()},
        "seconds": seconds,
    }
    picture = args.out.with_suffix(".png")
    with staged_file(args.out) as tmp_report, staged_file(picture) as tmp_picture:
        tmp_report.write_text(json.dumps(_json_safe(report), indent=1, allow_nan=False) + "\n")
        plot_curve({k: c["points"] for k, c in curves.items()}, tmp_picture,
                   title=f"{Path(str(args.model)).name} on {report['task']} ({args.ablation})")
    _print(report)
    print(f"wrote {args.out} and {picture}")
    return 0


def _print(report: dict) -> None:
    print(f"{report['source']} on {report['task']} ({report['split']}, {report['n_examples']} examples, "
          f"{report['ablation']}, {report['conventions']} conventions"
          + (f", post-norm {report['post_norm']}" if report.get("post_norm") else "")
          + f"); {report['n_edges_total']} edges (MIB's count)")
    print(f"  {report['metric']}: full {report['metric_full']:.4f}, empty {report['metric_empty']:.4f}")
    print("  % edges   at most   kept   faithfulness")
    for p in report["points"]:
        print(f"  {p['percent']:>7g}  {p['n_edges']:>8d}  {p['n_edges_kept']:>5d}   {p['faithfulness']:.4f}")
    print(f"  CPR {report['cpr']:.4f}   CMD {report['cmd']:.4f}")


# -- export -------------------------------------------------------------------------------------------------
def _export(args: Namespace) -> int:
    from ..mib.evaluate import masks_graph
    from ..mib.export import d_model_of, export_run, model_name_of, submission_name, task_of

    plans = []
    for run in args.runs:
        if not (run / "masks.safetensors").is_file():
            raise UsageError(f"runs: expected prune run folders with masks.safetensors, {str(run)!r} has none")
        graph = masks_graph(run / "masks.safetensors")
        task = args.task or task_of(run)
        model_name = args.model_name or model_name_of(graph)
        if task is None:
            raise UsageError(f"--task: {str(run)!r} was not pruned on a MIB data file; expected --task, one of ioi, "
                             f"mcqa, arithmetic-addition, arithmetic-subtraction, arc-easy, arc-challenge")
        if model_name is None:
            raise UsageError(f"--model-name: the graph of {str(run)!r} is not one of MIB's models; expected "
                             f"--model-name gpt2, qwen2.5, gemma2 or llama3")
        d_model = args.d_model or d_model_of(run)
        if d_model is None:
            raise UsageError(f"--d-model: cannot read the model width of {str(run)!r} (no circuit.eap-ig.json and "
                             f"no model config); expected --d-model")
        plans.append((run, submission_name(task, model_name), d_model))
    names = [name for _, name, _ in plans]
    if len(set(names)) != len(names):
        raise UsageError(f"runs: two runs would both be {sorted({n for n in names if names.count(n) > 1})}; "
                         f"expected one run per task and model")
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out: expected a folder, got {str(args.out)!r}, which is a file")
    for run, name, d_model in plans:
        with staged_output(args.out / name) as stage:
            files = export_run(run, stage, d_model=d_model, layout=args.layout, split_embeds=args.split_embeds_rule)
        print(f"{run} -> {args.out / name}: {', '.join(f.name for f in files)}")
    return 0
