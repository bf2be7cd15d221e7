"""The environment a ``torchrun`` launch sets, read without importing torch (the CLI reads
it before anything slow)."""

from __future__ import annotations

import os

from .errors import UsageError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


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
