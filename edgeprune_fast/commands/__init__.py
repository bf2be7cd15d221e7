"""The `edgeprune` subcommands, one module each; cli.py builds the parser from ``COMMANDS``
and turns errors into exit codes.

Each module has ``NAME`` (the subcommand), ``HELP`` (one line), ``add_arguments(parser)``
and ``run(args) -> int``; transformers and the library's modules are imported inside
``run``, so that building the parser stays quick. Shared argument types and loading are in
common.py.

    prune     train masks on a task and write the circuit (and checkpoints to resume from)
    circuit   a finished run's circuits at other sparsities, from its masks (no training)
    eval      a circuit file (ours or EAP-IG/MIB) on a task: KL, metric, faithfulness
    attribute EAP / EAP-IG scores of every edge, as an EAP-IG scores file (prune --init-from reads it)
    draw      a circuit file as a picture
    info      versions, GPU, compiled extension, backend per op
    demo      prune the shipped tracr `reverse` model and compare with its known circuit
    plan      the memory planner's prediction
    mib       MIB's circuit track: faithfulness at its edge budgets (CPR, CMD); its submission layout
"""

from __future__ import annotations

COMMANDS = ("prune", "circuit", "evaluate", "attribute", "draw", "info", "demo", "plan", "mib")
