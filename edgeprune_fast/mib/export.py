"""A prune run as a submission to MIB's circuit track (hannamw/MIB-circuit-track README,
"Submitting to the MIB Leaderboard").

Layout: one folder per task and model, named ``{task}_{model}`` with the task's hyphenated
name (``ioi``, ``mcqa``, ``arithmetic-addition``, ``arithmetic-subtraction``, ``arc-easy``,
``arc-challenge``) and MIB's model name (``gpt2``, ``qwen2.5``, ``gemma2``, ``llama3``), e.g.
``ioi_gpt2``. It holds either

- ``importances.json`` (layout "importances"): a score on every edge of MIB's graph, every
  ``in_graph`` false; the name MIB's ``run_evaluation.py`` reads by default
  (``{circuit_dir}/{method}/{task}_{model}/importances.json``); or
- one circuit per budget (layout "circuits"): ``circuit_{p}.json`` for each p of
  ``budgets.SUBMISSION_PERCENTS`` (0, 0.1, ..., 50), with at most p % of MIB's edge count in
  the graph (MIB's instructions fix the folder names and the .json/.pt type, not these file
  names); "both" writes both.

All files are EAP-IG graph JSON on MIB's graph (formats.py). The scores are
``ranking.export_scores`` of the run's effective log_alphas (``evaluate.order_from_masks``),
so MIB's top n by |score| is the run's first n edges for every n, and the circuit files are
those first n edges after EAP-IG's prune: a run's masks rank every edge, so one run gives
the circuits at all of MIB's budgets besides its own exact-sparsity circuit (circuit.json).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..formats import save_eap_ig
from ..graph import Graph
from ..ranking import export_scores
from .budgets import SUBMISSION_PERCENTS
from .evaluate import budgets, masks_graph, order_from_masks
from .tasks import canonical_task, detect_task, is_mib_data, split_files

MODEL_NAMES = {(12, 12, 12): "gpt2", (24, 14, 2): "qwen2.5", (26, 8, 4): "gemma2", (32, 32, 8): "llama3"}
LAYOUTS = ("importances", "circuits", "both")


def submission_name(task: str, model_name: str) -> str:
    return f"{canonical_task(task).replace('_', '-')}_{model_name}"


def model_name_of(graph: Graph) -> str | None:
    """MIB's name of the model whose graph this is (layers, heads, KV heads), or None."""
    c = graph.config
    if len(set(c.n_heads)) != 1 or len(set(c.n_kv_heads)) != 1:
        return None
    return MODEL_NAMES.get((c.n_layers, c.n_heads[0], c.n_kv_heads[0]))


def task_of(run: Path) -> str | None:
    """The MIB task a run was pruned on, when its data was a MIB file (circuit.json's config)."""
    try:
        source = json.loads((run / "circuit.json").read_text()).get("config", {}).get("task")
    except (OSError, json.JSONDecodeError):
        return None
    if not source or not is_mib_data(source):
        return None
    from .tasks import _read_file

    path = Path(source)
    return detect_task(_read_file(next(iter(split_files(path).values()))[0])[:1], path)


def d_model_of(run: Path) -> int | None:
    """The model width, from the run's EAP-IG file or its model's config.json."""
    try:
        return int(json.loads((run / "circuit.eap-ig.json").read_text())["cfg"]["d_model"])
    except (OSError, KeyError, ValueError, TypeError):
        pass
    try:
        model = json.loads((run / "circuit.json").read_text())["config"]["model"]
        cfg = json.loads((Path(model) / "config.json").read_text())
        return int(cfg.get("hidden_size") or cfg.get("n_embd") or cfg["d_model"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


def _percent_name(p: float) -> str:
    return f"{p:g}"


def export_run(run: Path, stage: Path, *, d_model: int, layout: str = "importances",
               split_embeds: str = "refuse") -> list[Path]:
    """Write one run's submission files into ``stage`` (the ``{task}_{model}`` folder)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    masks = run / "masks.safetensors"
    if not masks.is_file():
        raise ValueError(f"run: expected a prune run folder with masks.safetensors, {str(run)!r} has none")
    from ..formats import mib_graph

    graph = mib_graph(masks_graph(masks))
    order, scores = order_from_masks(masks, graph, split_embeds=split_embeds)
    values = dict(zip(graph.edges(), export_scores(scores).tolist()))
    files = []
    if layout in ("importances", "both"):
        files.append(save_eap_ig(stage / "importances.json", graph, [], values, d_model=d_model))
    if layout in ("circuits", "both"):
        edges = graph.edges()
        for b in budgets(graph, order, SUBMISSION_PERCENTS, pruned=True):
            kept = [edges[i] for i in torch.nonzero(b.keep).flatten().tolist()]
            files.append(save_eap_ig(stage / f"circuit_{_percent_name(b.percent)}.json", graph, kept, values,
                                     d_model=d_model))
    return files
