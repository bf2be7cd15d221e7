"""`edgeprune draw`: a circuit file as a picture (.svg, .png or .pdf by the output's suffix)."""

from __future__ import annotations

from argparse import ArgumentParser, Namespace
from pathlib import Path

from ..errors import UsageError
from ..staging import staged_file
from .common import add_selection_options

NAME = "draw"
HELP = "draw a circuit file (SVG, PNG or PDF by the output's suffix)"


def add_arguments(dr: ArgumentParser) -> None:
    dr.add_argument("circuit", type=Path)
    dr.add_argument("--out", type=Path, required=True)
    dr.add_argument("--title", default=None)
    add_selection_options(dr)


def run(args: Namespace) -> int:
    from ..draw import _suffix, draw_circuit
    from ..formats import load_circuit

    _suffix(args.out)  # a bad suffix fails before anything is read
    circuit = load_circuit(args.circuit, gqa=args.gqa, top_n=args.top_n, top_percent=args.top_percent)
    if not circuit.n_edges:
        raise UsageError(f"circuit: {str(args.circuit)!r} has no edges; nothing to draw")
    with staged_file(args.out) as tmp:
        engine = draw_circuit(circuit.edge_list(), tmp.with_suffix(args.out.suffix), title=args.title or
                              f"{args.circuit.name}: {circuit.n_edges} edges, sparsity {circuit.sparsity:.4f}")
        tmp.with_suffix(args.out.suffix).replace(tmp)
    print(f"wrote {args.out} ({engine})")
    return 0
