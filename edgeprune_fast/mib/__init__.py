"""MIB, the circuit-localisation benchmark (Mueller et al. 2025; hannamw/MIB-circuit-track), here.

    budgets.py    its edge budgets ("at most" int(p * n) of MIB's edge count) and CPR / CMD
    tasks.py      its tasks (IOI, MCQA, arithmetic, ARC) from a local copy of its data sets
    evaluate.py   faithfulness at every budget in one pass with the fused kernels; MIB's
                  conventions (BOS, prune, what zero ablation keeps) against ours
    export.py     a prune run as a submission: ``{task}_{model}/importances.json`` or one
                  circuit per budget

The command line is ``edgeprune mib evaluate`` / ``edgeprune mib export`` (commands/mib.py).
MIB's graph of a grouped-query model has k/v readers per query head: the model runs it with
``kv_per_query_head=True`` (graph.py), and the EAP-IG JSON of either graph is in formats.py.
"""

from .budgets import CURVE_FRACTIONS, SUBMISSION_PERCENTS, area_from_1, area_under, n_at_most
from .evaluate import budgets, evaluate_budgets, mib_zero_writers, order_from_file, order_from_masks, summarise
from .export import export_run, submission_name
from .tasks import MIBTask, load_mib_task

__all__ = ["CURVE_FRACTIONS", "MIBTask", "SUBMISSION_PERCENTS", "area_from_1", "area_under", "budgets",
           "evaluate_budgets", "export_run", "load_mib_task", "mib_zero_writers", "n_at_most", "order_from_file",
           "order_from_masks", "submission_name", "summarise"]
