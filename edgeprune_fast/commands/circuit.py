"""`edgeprune circuit RUN --sparsity S [S ...]`: the circuits of a finished prune run at other
sparsities, from its learned masks (RUN/masks.safetensors), without training again.

Each target gets the same treatment as in prune: the exact count cut from the ranking by
min(edge, writer node) log_alpha (circuit.py), evaluated on the validation split with the
run's model, task and ablation (stored in RUN/circuit.json; ``--model``/``--task``/
``--data``/``--device`` override them, e.g. after moving the model), and written into
``OUT/sparsity_<s>/`` (circuit.json, circuit.eap-ig.json, a picture) with ``summary.json``;
``--no-eval`` skips the evaluation (no model weights are then needed beyond the graph).
"""

from __future__ import annotations

import json
import sys
from argparse import ArgumentParser, Namespace
from pathlib import Path

from ..errors import UsageError
from ..runs import target_key
from ..staging import check_out_folder, staged_output
from .common import (
    load_model_for,
    load_task,
    load_tokenizer,
    model_dir,
    positive_int,
    print_metrics,
    sparsity,
    tracr_export,
    write_circuit_files,
)

NAME = "circuit"
HELP = "the circuits of a finished prune run at other sparsities (no training)"


def add_arguments(p: ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="a prune run's folder (circuit.json and masks.safetensors), or a sweep's "
                   "sparsity_<s> folder")
    p.add_argument("--sparsity", type=sparsity, nargs="+", required=True, help="target edge sparsities in [0, 2)")
    p.add_argument("--out", type=Path, required=True, help="a new (or empty) folder for the circuits")
    p.add_argument("--no-eval", action="store_true", help="write the circuits without evaluating them")
    p.add_argument("--picture", choices=["svg", "png", "pdf", "none"], default="svg")
    p.add_argument("--model", type=model_dir, default=None, help="default: the run's")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--task", default=None, help="default: the run's")
    src.add_argument("--data", type=Path, default=None, help="default: the run's")
    p.add_argument("--device", default=None, help="default: the run's")
    p.add_argument("--batch-size", type=positive_int, default=None, help="default: the run's")


def _run_settings(args: Namespace) -> Namespace:
    """The run's stored settings with this command's overrides."""
    from ..circuit import read_circuit_json

    for name in ("circuit.json", "masks.safetensors"):
        if not (args.run / name).is_file():
            raise UsageError(f"run: expected the folder of a finished prune run (with circuit.json and "
                             f"masks.safetensors), got {str(args.run)!r}, which has no {name}"
                             + (" (a sweep: pass one of its sparsity_<s> folders)" if (args.run / "sweep.json").is_file()
                                else ""))
    stored = (read_circuit_json(args.run / "circuit.json").get("config") or {}).get("run")
    if not isinstance(stored, dict):
        raise UsageError(f"run: {str(args.run / 'circuit.json')!r} holds no run settings (made by an earlier "
                         f"version); expected a circuit.json written by `edgeprune prune`")
    settings = Namespace(**stored)
    for path_key in ("model", "data"):
        if getattr(settings, path_key, None) is not None:
            setattr(settings, path_key, Path(getattr(settings, path_key)))
    if args.task is not None or args.data is not None:
        settings.task, settings.data = args.task, args.data
    for key in ("model", "device", "batch_size"):
        if getattr(args, key) is not None:
            setattr(settings, key, getattr(args, key))
    return settings


def run(args: Namespace) -> int:
    from ..circuit import Circuit, evaluate_circuit

    settings = _run_settings(args)
    check_out_folder(args.out)
    if not (Path(settings.model) / "config.json").is_file() and tracr_export(Path(settings.model)) is None:
        raise UsageError(f"--model: the run's model {str(settings.model)!r} is not there any more (no config.json); "
                         f"expected --model with the folder it was moved to")
    tokenizer = task = None
    if not args.no_eval:
        tokenizer = load_tokenizer(settings.model)
        task = load_task(settings, tokenizer)
    model, masks = _model(settings, task)
    masks.load(args.run / "masks.safetensors")  # ValueError naming another graph's masks
    model.eval()
    rows = []
    with staged_output(args.out) as stage:
        for target in sorted(set(args.sparsity)):
            circuit = Circuit.from_masks(masks, target, config={"source_run": str(args.run), "post_norm": model.post_norm,
                                                                 "run": vars(settings)
                                                                 | {"model": str(settings.model),
                                                                    "data": settings.data and str(settings.data)}})
            if task is not None:
                circuit = evaluate_circuit(model, circuit, task, task.batches(settings.batch_size, "validation"))
            write_circuit_files(stage / target_key(target), circuit, masks, model.adapter.d_model, args.picture,
                                save_masks=False)
            print(f"target sparsity {target} ({circuit.config['discretisation']['rule']}):")
            print_metrics(circuit)
            rows.append({"target": target, "sparsity": circuit.sparsity, "n_edges": circuit.n_edges,
                         **{k: v for k, v in circuit.metrics.items() if isinstance(v, (int, float, str))}})
        (stage / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _model(settings: Namespace, task):
    """(the run's model, its masks): with weights for evaluation; without (``task`` None) the
    model is built on the meta device for its graph, and the masks live on the CPU."""
    kw = dict(split_embeds=settings.split_embeds, node_masks=not settings.no_node_masks,
              kv_per_query_head=bool(getattr(settings, "kv_per_query_head", False)),
              post_norm=getattr(settings, "post_norm", None) or "writer")
    if task is not None:
        model = load_model_for(settings, settings.ablation, task.batches(settings.batch_size, "train"), **kw)
        return model, model.masks
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..masks import EdgeMasks
    from ..model import EdgePrunedModel

    if (export := tracr_export(Path(settings.model))) is not None:  # tiny: loaded as it is
        from ..tracr import load_tracr

        model = EdgePrunedModel.from_hf(load_tracr(*export), ablation="zero", **kw)
        return model, EdgeMasks(model.graph, node_masks=kw["node_masks"], device="cpu")
    config = AutoConfig.from_pretrained(str(settings.model), local_files_only=True)
    with torch.device("meta"):
        model = EdgePrunedModel.from_hf(AutoModelForCausalLM.from_config(config), ablation="zero", **kw)
    return model, EdgeMasks(model.graph, node_masks=kw["node_masks"], device="cpu")
