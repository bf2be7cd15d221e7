"""`edgeprune plan`: the memory planner's predicted peak per GPU (edgeprune_fast.plan)."""

from __future__ import annotations

from argparse import ArgumentParser, Namespace

NAME = "plan"
HELP = "predict peak memory per GPU for pruning a model"


def add_arguments(p: ArgumentParser) -> None:
    from .. import plan as planner

    planner.add_arguments(p)


def run(args: Namespace) -> int:
    from .. import plan as planner

    return int(planner.run(args) or 0)
