"""What several subcommands share: argument types and groups, loading the model, tokenizer
and task named on the command line, printing metrics and writing a circuit's files.

Every user error is raised as errors.UsageError (or a ValueError from the library) with
one message naming the argument, what was expected and what came; cli.py prints it and
exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from argparse import Namespace
from pathlib import Path

from ..errors import UsageError

DTYPE_NAMES = ("float32", "bfloat16", "float16")
PICTURE_NAME = "circuit"


# -- argument types -----------------------------------------------------------------------------------
def _bounded(name: str, convert, ok, expected: str):
    """An argparse type: ``convert(text)`` when ``ok`` of it, else one message saying what was expected."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    parse.__name__ = name
    return parse


sparsity = _bounded("sparsity", float, lambda v: 0.0 <= v < 2.0, "a number in [0, 2)")
percent = _bounded("percent", float, lambda v: 0.0 <= v <= 100.0, "a percentage in [0, 100]")
positive_int = _bounded("positive_int", int, lambda v: v >= 1, "an integer >= 1")
non_negative_int = _bounded("non_negative_int", int, lambda v: v >= 0, "an integer >= 0")


def add_selection_options(p: argparse.ArgumentParser) -> None:
    """How an EAP-IG/MIB file becomes a circuit of the model: top-n of a score file, grouped k/v."""
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--top-n", type=non_negative_int, default=None,
                     help="score files: keep the N edges with the largest |score| (EAP-IG's apply_topn, then prune)")
    sel.add_argument("--top-percent", type=percent, default=None,
                     help="score files: keep P %% of the file's edges (floor) with the largest |score|")
    p.add_argument("--gqa", choices=["strict", "union", "intersection"], default="strict",
                   help="a per-query-head file (MIB's) on a grouped graph: refuse heads of a KV group that disagree "
                        "(default), or keep a grouped edge if any / all of its heads have it")


def model_dir(text: str) -> Path:
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise argparse.ArgumentTypeError(f"{text!r} is a folder but has no config.json (not a saved HF model)")
        return path
    if path.exists():
        raise argparse.ArgumentTypeError(f"{text!r} is a file; expected a folder written by save_pretrained")
    if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", text) and not text.startswith("."):  # looks like a hub id
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a local folder, and models are not downloaded from the hub (no network here): "
            "pass a folder written by `save_pretrained`")
    raise argparse.ArgumentTypeError(f"{text!r} does not exist")


# -- argument groups ------------------------------------------------------------------------------------
def add_task_source(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", help="a task name: ioi, greater-than, gendered-pronouns")
    src.add_argument("--data", type=Path, help="JSONL of {\"clean\": ..., \"corrupted\": ...} lines with the "
                     "predicted span in <predict>...</predict> (optional \"split\"), or a local copy of a MIB data "
                     "set (its rows, file or folder)")


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=model_dir, required=True, help="folder of a saved HF causal LM and its tokenizer")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="the model's weights (masks stay float32)")
    p.add_argument("--ablation", choices=["corrupted", "zero", "mean"], default="corrupted",
                   help="what a removed edge carries: the corrupted run's value (default), zero, or the mean")
    p.add_argument("--split-embeds", action="store_true", help="separate token and position embedding nodes")
    p.add_argument("--kv-per-query-head", action="store_true",
                   help="grouped-query models: one k and one v reader per query head (MIB's graph) instead of per KV head")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--examples", type=positive_int, default=256, help="examples to generate (generated tasks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-layers", action="store_true",
                   help="recompute each layer in backward (activation checkpointing): less memory, more time")
    p.add_argument("--corrupted-on-cpu", action="store_true",
                   help="keep the corrupted run's writer states in host memory, copied to the device per read")


# -- loading --------------------------------------------------------------------------------------------
def device(text: str):
    import torch

    try:
        dev = torch.device(text)
    except RuntimeError:
        raise UsageError(f"--device: expected cpu, cuda or cuda:N, got {text!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device: {text!r} asked for, but no CUDA GPU is available (torch.cuda.is_available() is "
                         "False); use --device cpu")
    return dev


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise UsageError(f"--model: could not load a tokenizer from {str(path)!r} (save one next to the model with "
                         f"tokenizer.save_pretrained): {str(exc).splitlines()[0]}") from None


def load_task(args: Namespace, tokenizer):
    from ..tasks import get_task

    if args.data is not None:
        if not args.data.exists():
            raise UsageError(f"--data: expected a JSONL file (or a local copy of a MIB data set), {str(args.data)!r} "
                             f"does not exist")
        return get_task(args.data, tokenizer)
    return get_task(args.task, tokenizer, n_examples=getattr(args, "examples", None), seed=args.seed)


def load_model(args: Namespace, on_device=None, **kwargs):
    """The model of ``--model`` on ``on_device`` (default: ``--device``), in ``--dtype``, with
    ``--checkpoint-layers`` and ``--corrupted-on-cpu``; ``kwargs`` go to from_pretrained."""
    from ..model import EdgePrunedModel

    on_device = device(args.device) if on_device is None else on_device
    dtype = torch_dtype(getattr(args, "dtype", "float32"))
    kwargs.setdefault("checkpoint_layers", getattr(args, "checkpoint_layers", False))
    kwargs.setdefault("corrupted_on_cpu", getattr(args, "corrupted_on_cpu", False))
    kwargs.setdefault("kv_per_query_head", getattr(args, "kv_per_query_head", False))
    try:
        return EdgePrunedModel.from_pretrained(args.model, dtype=dtype, device=on_device, **kwargs)
    except OSError as exc:
        raise UsageError(f"--model: could not load a causal LM from {str(args.model)!r}: "
                         f"{str(exc).splitlines()[0]}") from None


# -- results --------------------------------------------------------------------------------------------
def effective_scores(model):
    """min(edge log_alpha, its writer's node log_alpha): a per-edge importance for export."""
    from ..ranking import effective_scores as scores_of

    return scores_of(model.masks)


def print_metrics(circuit, out=None) -> None:
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


def write_circuit_files(folder: Path, model, circuit, picture: str) -> list[Path]:
    import torch

    from ..draw import draw_circuit
    from ..formats import mib_eap_ig, save_eap_ig
    from ..ranking import export_scores

    folder.mkdir(parents=True, exist_ok=True)
    files = [circuit.save(folder / "circuit.json")]
    target = folder / "circuit.eap-ig.json"
    try:  # scores that rank the circuit's edges first, then every other edge by its effective score
        if model.graph.config.split_embeds:  # EAP-IG's one input node: refused where tok and pos disagree
            edges = model.graph.edges()
            first = torch.zeros(len(edges), dtype=torch.bool)
            index = {e: i for i, e in enumerate(edges)}
            first[[index[e] for e in circuit.edge_list()]] = True
            scores = dict(zip(edges, export_scores(effective_scores(model), first).tolist()))
            files.append(save_eap_ig(target, model.graph, circuit.edge_list(), scores, d_model=model.adapter.d_model))
        else:  # on MIB's graph (k/v readers per query head): every file edge has its own score
            d = mib_eap_ig(model.graph, circuit.edge_list(), effective_scores(model), d_model=model.adapter.d_model)
            target.write_text(json.dumps(d))
            files.append(target)
    except ValueError as exc:  # per-layer head counts, or split embeddings the one input node cannot hold
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
