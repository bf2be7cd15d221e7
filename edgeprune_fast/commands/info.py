"""`edgeprune info`: `python -m edgeprune_fast.info` (versions, GPU, compiled extension,
backend per op)."""

from __future__ import annotations

from argparse import ArgumentParser, Namespace

NAME = "info"
HELP = "versions, GPU, compiled extension and backend choice"


def add_arguments(p: ArgumentParser) -> None:
    pass


def run(args: Namespace) -> int:
    from ..info import main as info_main

    info_main()
    return 0
