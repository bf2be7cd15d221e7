"""`edgeprune demo`: prune the shipped tracr `reverse` model (tasks.tracr.prune_tracr with
its documented defaults, TRACR_DEFAULTS) and compare the circuit with its known one."""

from __future__ import annotations

import json
import sys
from argparse import ArgumentParser, Namespace
from pathlib import Path

from ..errors import UsageError
from ..staging import check_out_folder, staged_output
from .common import PICTURE_NAME, positive_int

NAME = "demo"
HELP = "prune the shipped tracr `reverse` model and compare with its known circuit"


def add_arguments(de: ArgumentParser) -> None:
    de.add_argument("--out", type=Path, default=Path("runs/demo"),
                    help="output folder (default runs/demo; an earlier demo's output there is replaced)")
    de.add_argument("--steps", type=positive_int, default=None, help="override the documented number of steps")
    de.add_argument("--split-embeds", action="store_true")
    de.add_argument("--picture", choices=["svg", "png", "pdf"], default="png")
    de.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: Namespace) -> int:
    from ..circuit import Circuit
    from ..draw import draw_circuit
    from ..tasks.tracr import TRACR_DEFAULTS, prune_tracr

    steps = args.steps
    if steps is not None and steps < 1:
        raise UsageError(f"--steps: expected an integer >= 1, got {steps}")
    print(f"demo: pruning the shipped tracr `reverse` model ({'split' if args.split_embeds else 'one'} embedding "
          f"node{'s' if args.split_embeds else ''}, {steps or TRACR_DEFAULTS.steps} steps, seed {TRACR_DEFAULTS.seed}, "
          "zero ablation)", file=sys.stderr)
    check_out_folder(args.out, replace_previous=True)
    with staged_output(args.out, replace_previous=True) as stage:
        result = prune_tracr(split_embeds=args.split_embeds, steps=steps, out_dir=stage / "checkpoints",
                             progress=not args.quiet)
        summary = result.summary()
        truth = {tuple(e) for e in result.ground_truth or []}
        found = set(result.edges)
        metrics = {"accuracy": result.accuracy, "auc": result.auc, "exact": result.exact,
                   "matched": len(found & truth), "missing": summary["missing"], "extra": summary["extra"],
                   "seconds": summary["seconds"], "final_kl": summary["final_kl"]}
        circuit = Circuit.from_edges(result.model.graph, result.edges, metrics=metrics,
                                     config={"model": "tracr reverse (shipped)", "split_embeds": args.split_embeds,
                                             "settings": summary["settings"], "discretise": "z_det > 0"})
        circuit.save(stage / "circuit.json")
        if circuit.n_edges:
            draw_circuit(circuit.edge_list(), stage / f"{PICTURE_NAME}.{args.picture}",
                         title=f"tracr reverse: {circuit.n_edges} edges found")
        if truth:
            draw_circuit(sorted(truth), stage / f"ground_truth.{args.picture}",
                         title=f"tracr reverse: known circuit ({len(truth)} edges)")
        (stage / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\nfound {len(found)} edges of {result.model.graph.n_edges} in {summary['seconds']:.1f} s "
          f"({result.steps} steps); accuracy of the circuit on the examples: {result.accuracy:.3f}")
    if truth:
        print(f"known circuit: {len(truth)} edges; matched {len(found & truth)}, missing {len(truth - found)}, "
              f"extra {len(found - truth)}; exact recovery: {'yes' if result.exact else 'no'}; "
              f"ROC AUC of the edge scores: {result.auc:.4f}")
        for label, edges in (("missing", truth - found), ("extra", found - truth)):
            listed = sorted(edges)
            for w, r in listed[:12]:
                print(f"  {label}: {w}->{r}")
            if len(listed) > 12:
                print(f"  ... and {len(listed) - 12} more {label} edges (all in summary.json)")
    print(f"wrote {args.out}/circuit.json and {args.out}/{PICTURE_NAME}.{args.picture}")
    return 0
