"""Recovery of the tracr `reverse` circuit by edge pruning, with the package's documented defaults.

Runs ``edgeprune_fast.tasks.tracr.prune_tracr`` (the one Trainer, zero ablation, the
length-3 example sets, ``TRACR_DEFAULTS``: seed, steps, learning rates, init) twice: with
one ``embeds`` writer (77 edges; ground truth 10) and with split embeddings (94 edges;
ground truth 11), from the default seed (``--seeds`` adds others). For each it records the recovered edges (deterministic mask > 0), whether
they equal the ground truth exactly, the ROC AUC of the final log_alphas against the ground
truth, the accuracy of the recovered circuit, the steps and the wall-clock seconds.

    python bench/tracr_recovery.py            # -> bench/results/tracr_recovery.json

(with the package installed, ``make setup``; from a bare checkout prefix ``PYTHONPATH=.``).
CI runs a shorter variant (tests/test_tracr_prune.py::test_short_recovery_keeps_the_ground_truth).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace

import torch
from common import machine, write_json

from edgeprune_fast.tasks.tracr import TRACR_DEFAULTS, prune_tracr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="override TRACR_DEFAULTS.steps (warm-ups scale along)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[TRACR_DEFAULTS.seed],
                    help="seeds to run (default: the documented default seed only)")
    ap.add_argument("--progress", action="store_true", help="show the progress bars")
    ap.add_argument("--out", default="tracr_recovery.json", help="file name under bench/results/")
    args = ap.parse_args()
    runs = []
    for seed, split in ((seed, split) for seed in args.seeds for split in (False, True)):
        settings = replace(TRACR_DEFAULTS, seed=seed)
        r = prune_tracr(split_embeds=split, settings=settings, steps=args.steps, progress=args.progress)
        s = r.summary()
        runs.append(s)
        print(f"seed {seed} split_embeds={split}: recovered {s['n_recovered']} edges, exact={s['exact']}, "
              f"AUC {s['auc']:.4f}, accuracy {s['accuracy']:.3f}, {s['steps']} steps in {s['seconds']:.1f} s"
              + ("" if s["exact"] else f"; missing {s['missing']}, extra {s['extra']}"))
    payload = {"benchmark": "tracr_recovery", "model": "reverse (edgeprune_fast/data/tracr)",
               "defaults": asdict(TRACR_DEFAULTS), "torch_threads_during_run": 1,
               "torch_threads_default": torch.get_num_threads(), "machine": machine(), "runs": runs}
    path = write_json(args.out, payload)
    print(f"wrote {path}")
    if not all(s["exact"] for s in runs):
        print(json.dumps([{k: s[k] for k in ("split_embeds", "missing", "extra")} | {"seed": s["settings"]["seed"]}
                          for s in runs if not s["exact"]]))


if __name__ == "__main__":
    main()
