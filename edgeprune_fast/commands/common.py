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
ABLATIONS = ("corrupted", "zero", "mean")
POST_NORMS = ("writer", "reader")  # post_norm.py
POST_NORM_HELP = ("models whose attention output is normed before the residual (Gemma-2, OLMo-2): writer: head h "
                  "writes its share g*o_h/rms(o) of the normed output; reader: head h writes its pre-norm output "
                  "and each reader norms its own mix of the layer's heads (MIB / EAP-IG's graph)")
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
    """--model: a folder written by save_pretrained, or a tracr export (a folder with one
    ``<name>.config.json`` of the shared tracr format, ``dir/<name>`` or ``dir/<name>.config.json``)."""
    from ..tracr import find_tracr_export

    path = Path(text).expanduser()
    try:
        if find_tracr_export(path) is not None:
            return path
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--model: ")) from None
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise argparse.ArgumentTypeError(f"{text!r} is a folder but has no config.json (not a saved HF model) "
                                             f"and no <name>.config.json of a tracr export")
        return path
    if path.exists():
        raise argparse.ArgumentTypeError(f"{text!r} is a file; expected a folder written by save_pretrained")
    if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", text) and not text.startswith("."):  # looks like a hub id
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a local folder, and models are not downloaded from the hub (no network here): "
            "pass a folder written by `save_pretrained`")
    raise argparse.ArgumentTypeError(f"{text!r} does not exist")


# -- argument groups ------------------------------------------------------------------------------------
def add_task_source(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    src = p.add_mutually_exclusive_group(required=required)
    src.add_argument("--task", help="a task name: ioi, greater-than, gendered-pronouns (tracr exports: their own "
                     "example sets, the ones marked for the ground truth; --task tracr or nothing)")
    src.add_argument("--data", type=Path, help="JSONL of {\"clean\": ..., \"corrupted\": ...} lines with the "
                     "predicted span in <predict>...</predict> (optional \"split\"), or a local copy of a MIB data "
                     "set (its rows, file or folder)")


def add_model_options(p: argparse.ArgumentParser, *, required: bool = True, stored: bool = False,
                      post_norm_default: str = "writer (default)", recipe: bool = False) -> None:
    """The model and how to run it. ``stored``: for commands that read a circuit file, whose
    ablation and embedding mode are the defaults (None here: the file's). ``post_norm_default``:
    "writer (default)", or a sentence saying what the command chooses (--post-norm None).
    ``recipe``: the ablation and batch size default to None, filled in by the command from the
    model kind's recipe (prune: HF models corrupted / 8, tracr exports TRACR_DEFAULTS' zero / per length)."""
    p.add_argument("--model", type=model_dir, required=required, default=None,
                   help="folder of a saved HF causal LM and its tokenizer, or a tracr export (the shared format: "
                        "a folder with one <name>.config.json, or dir/<name>)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="the model's weights (masks stay float32)")
    if stored:
        p.add_argument("--ablation", choices=ABLATIONS, default=None,
                       help="what a removed edge carries (default: the circuit file's, else corrupted)")
        p.add_argument("--split-embeds", action=argparse.BooleanOptionalAction, default=None,
                       help="separate token and position embedding nodes (default: as in the circuit file)")
        p.add_argument("--kv-per-query-head", action=argparse.BooleanOptionalAction, default=None,
                       help="grouped-query models: one k and one v reader per query head (MIB's graph) instead of "
                            "per KV head (default: as in the circuit file; EAP-IG/MIB files: per KV head)")
        p.add_argument("--post-norm", choices=POST_NORMS, default=None,
                       help=POST_NORM_HELP + " (default: as in the circuit file, else writer)")
    else:
        p.add_argument("--ablation", choices=ABLATIONS, default=None if recipe else "corrupted",
                       help="what a removed edge carries: the corrupted run's value (default; tracr exports: zero), "
                            "zero, or the mean")
        p.add_argument("--split-embeds", action="store_true", help="separate token and position embedding nodes")
        p.add_argument("--kv-per-query-head", action="store_true",
                       help="grouped-query models: one k and one v reader per query head (MIB's graph) instead of "
                            "per KV head")
        chooses = post_norm_default != "writer (default)"
        p.add_argument("--post-norm", choices=POST_NORMS, default=None if chooses else "writer",
                       help=f"{POST_NORM_HELP} (default: {post_norm_default.removesuffix(' (default)')})")
    p.add_argument("--batch-size", type=positive_int, default=None if recipe else 8,
                   help="default 8 (tracr exports under prune: one batch per sequence length)")
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


# The files a tokenizer saved with save_pretrained leaves: any one of these sets is enough
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",), ("vocab.txt",))


def tracr_export(path: Path | None) -> tuple[Path, str] | None:
    """(directory, name) when ``--model`` is a tracr export, else None."""
    from ..tracr import find_tracr_export

    return None if path is None else find_tracr_export(path)


def load_tokenizer(path: Path):
    """The HF tokenizer saved beside the model; None for a tracr export (it has its own encoding)."""
    if tracr_export(path) is not None:
        return None
    from transformers import AutoTokenizer

    if not any(all((path / f).is_file() for f in group) for group in TOKENIZER_FILES):
        found = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
        wanted = " or ".join(" + ".join(g) for g in TOKENIZER_FILES)
        raise UsageError(f"--model: {str(path)!r} has no tokenizer files (expected {wanted}; found {found}); save "
                         f"the model's tokenizer beside it: AutoTokenizer.from_pretrained(<its name>)"
                         f".save_pretrained({str(path)!r})")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise UsageError(f"--model: could not load the tokenizer in {str(path)!r} (re-save it with "
                         f"tokenizer.save_pretrained): {str(exc).splitlines()[0]}") from None


def load_task(args: Namespace, tokenizer):
    from ..tasks import get_task

    if (export := tracr_export(getattr(args, "model", None))) is not None:
        return load_tracr_task(args, export)
    if args.data is not None:
        if not args.data.exists():
            raise UsageError(f"--data: expected a JSONL file (or a local copy of a MIB data set), {str(args.data)!r} "
                             f"does not exist")
        if args.data.is_dir():
            from ..mib.tasks import is_mib_data

            if not is_mib_data(args.data):
                raise UsageError(f"--data: expected a JSONL file or a local copy of a MIB data set, got "
                                 f"{str(args.data)!r}, which is a directory without MIB rows")
        return get_task(args.data, tokenizer)
    return get_task(args.task, tokenizer, n_examples=getattr(args, "examples", None), seed=args.seed)


def load_tracr_task(args: Namespace, export: tuple[Path, str]):
    """The TracrTask of a tracr export: its example sets marked for the ground truth (else all)."""
    from ..tasks.tracr import TracrTask

    if args.data is not None:
        raise UsageError(f"--data: a tracr export brings its own example sets ({export[1]}.examples.json); expected "
                         f"no --data, got {str(args.data)!r}")
    if args.task is not None and args.task != "tracr":
        raise UsageError(f"--task: a tracr export brings its own example sets; expected 'tracr' or no --task, got "
                         f"{args.task!r}")
    return TracrTask.load(*export)


def load_model_for(args: Namespace, ablation: str, mean_batches, **kwargs):
    """load_model under ``ablation``; mean ablation takes its means over ``mean_batches``
    (the task's training batches, as prune does)."""
    model = load_model(args, ablation="zero" if ablation == "mean" else ablation, **kwargs)
    return model.use_mean_ablation(mean_batches) if ablation == "mean" else model


def load_model(args: Namespace, on_device=None, **kwargs):
    """The model of ``--model`` on ``on_device`` (default: ``--device``), in ``--dtype``, with
    ``--checkpoint-layers`` and ``--corrupted-on-cpu``; ``kwargs`` go to from_pretrained."""
    from ..model import EdgePrunedModel

    on_device = device(args.device) if on_device is None else on_device
    dtype = torch_dtype(getattr(args, "dtype", "float32"))
    kwargs.setdefault("checkpoint_layers", getattr(args, "checkpoint_layers", False))
    kwargs.setdefault("corrupted_on_cpu", getattr(args, "corrupted_on_cpu", False))
    kwargs.setdefault("kv_per_query_head", bool(getattr(args, "kv_per_query_head", False)))
    kwargs.setdefault("post_norm", getattr(args, "post_norm", None) or "writer")
    from safetensors import SafetensorError

    if (export := tracr_export(args.model)) is not None:
        from ..tracr import load_tracr

        try:
            tracr = load_tracr(*export).to(device=on_device, dtype=dtype)
        except SafetensorError as exc:
            raise UsageError(f"--model: expected readable weights {export[1]}.safetensors in {str(export[0])!r}, "
                             f"which could not be read: {_first_line(exc)}") from None
        return EdgePrunedModel.from_hf(tracr, **kwargs)
    try:
        return EdgePrunedModel.from_pretrained(args.model, dtype=dtype, device=on_device, **kwargs)
    except ValueError as exc:  # the library names its keyword; the user gave the option
        if str(exc).startswith("post_norm: "):
            raise UsageError("--post-norm: " + str(exc).removeprefix("post_norm: ").replace("'writer'", "writer")
                             .replace("'reader'", "reader")) from None
        raise
    except SafetensorError as exc:  # a cut or damaged weights file
        weights = sorted(p.name for p in Path(args.model).glob("*.safetensors")) or ["no *.safetensors"]
        raise UsageError(f"--model: expected readable weights in {str(args.model)!r}, got {', '.join(weights)}, "
                         f"which could not be read: {_first_line(exc)}; the file is truncated or corrupt (save the "
                         f"model again with save_pretrained)") from None
    except OSError as exc:
        raise UsageError(f"--model: could not load a causal LM from {str(args.model)!r}: "
                         f"{_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


# -- results --------------------------------------------------------------------------------------------
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
    if (gt := m.get("ground_truth")) is not None:  # tracr exports
        print(f"  ground truth: {gt['n_expected']} edges; matched {gt['matched']}, missing {len(gt['missing'])}, "
              f"extra {len(gt['extra'])}; exact recovery: {'yes' if gt['exact'] else 'no'}", file=out)
    for other, row in (m.get("measures") or {}).items():
        if other != name:
            print(f"  {other}: circuit {row['circuit']:.4f}, full {row['full']:.4f}, empty {row['empty']:.4f}",
                  file=out)


def write_circuit_files(folder: Path, circuit, masks, d_model: int, picture: str, *,
                        save_masks: bool = True) -> list[Path]:
    """circuit.json, circuit.eap-ig.json (scores from the effective log_alphas, the ranking
    the circuit was cut from: ranking.export_scores), masks.safetensors (unless
    ``save_masks=False``: written already) and the picture, into ``folder``. ``masks``: the
    EdgeMasks."""
    import torch

    from ..draw import draw_circuit
    from ..formats import mib_eap_ig, save_eap_ig
    from ..ranking import export_scores

    folder.mkdir(parents=True, exist_ok=True)
    files = [circuit.save(folder / "circuit.json")]
    target = folder / "circuit.eap-ig.json"
    graph = masks.graph
    try:  # scores that rank the circuit's edges first, then every other edge by its effective score
        if graph.config.split_embeds:  # EAP-IG's one input node: refused where tok and pos disagree
            edges = graph.edges()
            first = torch.zeros(len(edges), dtype=torch.bool)
            index = {e: i for i, e in enumerate(edges)}
            first[[index[e] for e in circuit.edge_list()]] = True
            scores = dict(zip(edges, export_scores(masks.effective_scores(), first).tolist()))
            files.append(save_eap_ig(target, graph, circuit.edge_list(), scores, d_model=d_model))
        else:  # on MIB's graph (k/v readers per query head): every file edge has its own score
            d = mib_eap_ig(graph, circuit.edge_list(), masks.effective_scores(), d_model=d_model)
            target.write_text(json.dumps(d))
            files.append(target)
    except ValueError as exc:  # per-layer head counts, or split embeddings the one input node cannot hold
        print(f"note: no EAP-IG file: {exc}", file=sys.stderr)
    if save_masks:
        masks.save(folder / "masks.safetensors")
        files.append(folder / "masks.safetensors")
    if picture != "none":
        if circuit.n_edges:
            target = folder / f"{PICTURE_NAME}.{picture}"
            draw_circuit(circuit.edge_list(), target, title=f"{circuit.n_edges} edges, sparsity {circuit.sparsity:.4f}")
            files.append(target)
        else:
            print("note: the circuit has no edges; no picture drawn", file=sys.stderr)
    return files
