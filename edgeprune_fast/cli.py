"""The `edgeprune` command line: the parser of every subcommand (commands/, one module each)
and the one place where errors become exit codes.

Every user error (a missing model path, a hub name with no network, an empty or
malformed JSONL, a target sparsity outside [0, 2)) prints one clear message and exits
with code 2; a run that fails on its own (a non-finite loss) exits with 1; outputs are
staged (staging.py) so that nothing is left half-written. Imports go one way:
cli -> commands -> the library.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .commands import COMMANDS
from .errors import EXIT_FAILED, EXIT_USAGE, RunFailed, UsageError
from .torchrun import torchrun_world


def _command_modules() -> dict:
    modules = [importlib.import_module(f"{__package__}.commands.{name}") for name in COMMANDS]
    return {m.NAME: m for m in modules}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgeprune", description="Find circuits in transformers with Edge Pruning.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, module in _command_modules().items():
        module.add_arguments(sub.add_parser(name, help=module.HELP))
    return p


def _launched_rank() -> int | None:
    """This process's rank in a torchrun launch of several processes; None outside one."""
    try:
        rank, world = torchrun_world()
    except UsageError:  # reported by the command itself
        return None
    return rank if world > 1 else None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits with code 2 on bad arguments
    command = _command_modules()[args.command]

    # Under torchrun every process runs this with the same arguments, data and environment, so
    # a usage error is the same on every rank: rank 0 reports it, the others exit quietly with
    # the same code. A failed run is reported by every rank that sees it (with its rank): a
    # non-finite loss may come from one process's slice of the batch only.
    rank = _launched_rank()
    quiet = bool(rank)
    try:
        if args.command not in ("prune", "attribute") and torchrun_world()[1] > 1:
            raise UsageError(f"expected one process (only `edgeprune prune` and `edgeprune attribute` run under "
                             f"torchrun), got "
                             f"WORLD_SIZE={os.environ['WORLD_SIZE']}")
        return int(command.run(args) or 0)
    except (UsageError, ValueError, FileNotFoundError, NotImplementedError) as exc:
        if not quiet:
            print(f"edgeprune {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RunFailed as exc:
        where = "" if rank is None else f" (rank {rank})"
        print(f"edgeprune {args.command}{where}: failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        if not quiet:
            print(f"edgeprune {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `edgeprune plan --json | head`: the reader is gone, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0


if __name__ == "__main__":  # `python -m edgeprune_fast.cli`: run the package's module, not a __main__ copy
    from edgeprune_fast.cli import main as package_main

    sys.exit(package_main())
