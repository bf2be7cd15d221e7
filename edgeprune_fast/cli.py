"""The `edgeprune` command line: prune, eval, draw, info, demo.

Every user error (a missing model path, a hub name with no network, an empty or
malformed JSONL, a target sparsity outside [0, 2)) prints one clear message and exits
with code 2; outputs are written to a temporary folder and moved into place only when
complete, so nothing is left half-written.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

EXIT_USAGE = 2


class UsageError(Exception):
    """A user error: printed without a traceback, exit code 2."""


class RunFailed(Exception):
    """The run itself failed (e.g. a non-finite loss): printed without a traceback, exit code 1."""


def sparsity(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 2), got {text!r}") from None
    if not 0.0 <= value < 2.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 2), got {value}")
    return value


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


def _looks_like_ours(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("circuit.json", "sweep.json", "summary.json"))


def check_out_folder(out: Path, *, replace_previous: bool = False) -> bool:
    """UsageError unless ``out`` can take a run's outputs; True when an earlier run's are there."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: expected a folder, got {str(out)!r}, which is a file")
    old = out.exists() and any(out.iterdir())
    if old and not (replace_previous and _looks_like_ours(out)):
        raise UsageError(f"--out: expected a new or empty folder, got {str(out)!r} which has files in it")
    return old


def _umask() -> int:
    """This process's umask (reading it means setting it; set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def staged_output(out: Path, *, replace_previous: bool = False):
    """Write into a temporary sibling folder; move it to ``out`` only on success.

    ``out`` must be new or empty; with ``replace_previous`` a folder holding an earlier
    run's outputs (circuit.json, sweep.json or summary.json) is replaced, only once the new
    one is complete."""
    out = Path(out)
    old = check_out_folder(out, replace_previous=replace_previous)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700 is for the stage, not the result
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old:
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        out.rename(trash / out.name)
        tmp.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        if out.exists():
            out.rmdir()
        tmp.rename(out)


@contextmanager
def staged_file(out: Path):
    """Yield a temporary path beside ``out``; rename it to ``out`` only on success."""
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"--out: expected a file name, got {str(out)!r}, which is a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=out.suffix, dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.chmod(0o666 & ~_umask())  # mkstemp's 0600 is for the stage, not the result
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)


def torchrun_world() -> tuple[int, int]:
    """(rank, number of processes) of a ``torchrun`` launch, from the environment it sets;
    (0, 1) outside one (or under ``torchrun --nproc_per_node 1``)."""
    world, rank = os.environ.get("WORLD_SIZE", "1"), os.environ.get("RANK", "0")
    try:
        n = int(world)
        return (int(rank) if n > 1 else 0), n
    except ValueError:
        raise UsageError(f"environment: expected the integers torchrun sets in WORLD_SIZE and RANK, got "
                         f"WORLD_SIZE={world!r}, RANK={rank!r}") from None


def _launched_rank() -> int | None:
    """This process's rank in a torchrun launch of several processes; None outside one."""
    try:
        rank, world = torchrun_world()
    except UsageError:  # reported by the command itself
        return None
    return rank if world > 1 else None


def steps(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _task_source(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", help="a task name: ioi, greater-than, gendered-pronouns")
    src.add_argument("--data", type=Path, help="JSONL of {\"clean\": ..., \"corrupted\": ...} lines with the "
                     "predicted span in <predict>...</predict> (optional \"split\")")


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=model_dir, required=True, help="folder of a saved HF causal LM and its tokenizer")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="the model's weights (masks stay float32)")
    p.add_argument("--ablation", choices=["corrupted", "zero", "mean"], default="corrupted",
                   help="what a removed edge carries: the corrupted run's value (default), zero, or the mean")
    p.add_argument("--split-embeds", action="store_true", help="separate token and position embedding nodes")
    p.add_argument("--batch-size", type=steps, default=8)
    p.add_argument("--examples", type=steps, default=256, help="examples to generate (generated tasks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-layers", action="store_true",
                   help="recompute each layer in backward (activation checkpointing): less memory, more time")
    p.add_argument("--corrupted-on-cpu", action="store_true",
                   help="keep the corrupted run's writer states in host memory, copied to the device per read")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgeprune", description="Find circuits in transformers with Edge Pruning.")
    sub = p.add_subparsers(dest="command", required=True)

    pr = sub.add_parser("prune", help="prune a model on a task and write the circuit")
    _model_options(pr)
    _task_source(pr)
    tgt = pr.add_mutually_exclusive_group()
    tgt.add_argument("--sparsity", type=sparsity, default=0.98, help="target edge sparsity in [0, 2) (default 0.98)")
    tgt.add_argument("--sweep", type=sparsity, nargs="+", help="several target sparsities (one run each)")
    pr.add_argument("--node-sparsity", type=sparsity, default=None, help="target node sparsity (default: none)")
    pr.add_argument("--no-node-masks", action="store_true", help="edge masks only")
    pr.add_argument("--steps", type=steps, default=3000)
    pr.add_argument("--lr", type=float, default=0.8, help="learning rate of masks and lambdas (default 0.8)")
    pr.add_argument("--init", type=float, default=10.0, help="initial log_alpha (default 10)")
    pr.add_argument("--sparsity-warmup", type=int, default=None, help="default: 5/6 of --steps")
    pr.add_argument("--lr-warmup", type=int, default=None, help="default: 1/15 of --steps")
    pr.add_argument("--discretise", choices=["exact", "masks"], default="exact",
                    help="exact: keep exactly round((1 - target) * n_edges) edges (default); masks: the edges "
                         "whose deterministic mask is non-zero")
    pr.add_argument("--picture", choices=["svg", "png", "pdf", "none"], default="svg")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    pr.add_argument("--shard-weights", action="store_true",
                    help="under torchrun: shard the frozen weights over the processes (FSDP2), 1/N each")
    pr.add_argument("--out", type=Path, required=True, help="a new (or empty) folder for the outputs")

    ev = sub.add_parser("eval", help="evaluate a circuit file (ours or EAP-IG/MIB) on a task")
    ev.add_argument("circuit", type=Path)
    _model_options(ev)
    _task_source(ev)
    ev.add_argument("--split", choices=["train", "validation"], default="validation")
    ev.add_argument("--out", type=Path, default=None, help="write the circuit with its metrics to this JSON file")

    dr = sub.add_parser("draw", help="draw a circuit file (SVG, PNG or PDF by the output's suffix)")
    dr.add_argument("circuit", type=Path)
    dr.add_argument("--out", type=Path, required=True)
    dr.add_argument("--title", default=None)

    sub.add_parser("info", help="versions, GPU, compiled extension and backend choice")

    de = sub.add_parser("demo", help="prune the shipped tracr `reverse` model and compare with its known circuit")
    de.add_argument("--out", type=Path, default=Path("runs/demo"),
                    help="output folder (default runs/demo; an earlier demo's output there is replaced)")
    de.add_argument("--steps", type=steps, default=None, help="override the documented number of steps")
    de.add_argument("--split-embeds", action="store_true")
    de.add_argument("--picture", choices=["svg", "png", "pdf"], default="png")
    de.add_argument("--quiet", action="store_true", help="no progress bar")

    pl = sub.add_parser("plan", help="predict peak memory per GPU for pruning a model")
    try:
        from . import plan as planner
    except ImportError:  # the planner is optional; `plan` then says so
        planner = None
    if planner is not None and hasattr(planner, "add_arguments"):
        planner.add_arguments(pl)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits with code 2 on bad arguments
    from . import commands

    # Under torchrun every process runs this with the same arguments, data and environment, so
    # a usage error is the same on every rank: rank 0 reports it, the others exit quietly with
    # the same code. A failed run is reported by every rank that sees it (with its rank): a
    # non-finite loss may come from one process's slice of the batch only.
    rank = _launched_rank()
    quiet = bool(rank)
    try:
        if args.command != "prune" and torchrun_world()[1] > 1:
            raise UsageError(f"expected one process (only `edgeprune prune` runs under torchrun), got "
                             f"WORLD_SIZE={os.environ['WORLD_SIZE']}")
        return int(getattr(commands, args.command)(args) or 0)
    except (UsageError, ValueError, FileNotFoundError, NotImplementedError) as exc:
        if not quiet:
            print(f"edgeprune {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RunFailed as exc:
        where = "" if rank is None else f" (rank {rank})"
        print(f"edgeprune {args.command}{where}: failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if not quiet:
            print(f"edgeprune {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":  # `python -m edgeprune_fast.cli`: run the package's module, not a __main__ copy
    from edgeprune_fast.cli import main as package_main

    sys.exit(package_main())
