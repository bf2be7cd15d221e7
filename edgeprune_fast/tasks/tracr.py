"""The tracr task: recover a tracr-compiled model's known circuit with the one trainer.

Data: the example sets of ``<name>.examples.json`` (tracr.load_examples), every example
``[BOS, x_1 .. x_n]``; batches are :class:`TaskBatch` es of equal-length sequences:

    input_ids, corrupted_input_ids   [B, T] (corrupted kept for ablation='corrupted'; tracr
                                     pruning uses zero ablation, as both papers do)
    target_mask                      [B, T] bool: every non-BOS position
    extras["expected_ids"]           [B, T] int64 expected output ids (categorical outputs)
    extras["expected_values"]        [B, T] float32 expected values (numerical outputs)

Loss at every non-BOS position, summed over positions and averaged over examples (as Edge
Pruning's tracr script): categorical output -> KL(softmax(full) || softmax(circuit)) over
the ``d_out`` output dimensions (the full model's softmax as the target); numerical output
-> squared error (circuit - full)^2 of the output value. Metric: per example, 1.0 when the decoded output (argmax, or the value within
``value_tolerance``) equals the expected output at every non-BOS position, else 0.0.

Pruning defaults live in :data:`TRACR_DEFAULTS` (one place); :func:`prune_tracr` runs the
whole recipe (load, wrap with zero ablation, train, read the circuit, compare with the
ground truth). The recovered circuit is the set of edges whose deterministic mask is
non-zero: z_det(edge) > 0 and, with node masks, z_det(writer node) > 0, i.e. every
log_alpha above log(-l/r) = -2.398 (ARCHITECTURE.md §2). No count is imposed: the learned
masks decide the size. ROC AUC scores each edge by min(edge log_alpha, writer-node
log_alpha) (the edge log_alpha alone without node masks): the same rule, ranked.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from ..model import EdgePrunedModel
from ..ops import hard_concrete
from ..tracr import TRACR_DATA_DIR, TracrTransformer, load_examples, load_ground_truth, load_tracr, resolve_tracr_path
from ..train import TrainConfig, Trainer
from .base import Task, TaskBatch, kl_loss

# the sets `reverse` marks for its ground truth (what TRACR_DEFAULTS.sets=None picks there)
LENGTH3_SETS = ("edge_pruning_reverse_t3_s3", "acdc_reverse_6_permutations")


@dataclass(frozen=True)
class TracrPruneSettings:
    """Documented settings for pruning tracr models (:data:`TRACR_DEFAULTS`): one recipe for
    every program and both embedding modes, nothing per program.

    sets: example sets to train on (None: every set the export marks
    ``use_for_ground_truth_test``, whatever their names; the sets the ground truth was
    derived on); batch_size: examples per batch (None: each length group is one batch);
    node_masks and init/init_std: the EdgePrunedModel's masks (log_alpha ~ N(init,
    init_std)); the rest is the TrainConfig.

    Why these values: the target 1.02 is the original tracr script's: it can never be met,
    so the lambdas keep pushing until only edges whose removal costs KL remain (a target
    below 1 would, through the quadratic term, also hold on to edges the KL does not need).
    The push must stay weaker than the KL cost of a needed edge: the lambdas grow by about
    their learning rate per step (AdamW) for the whole run, so their learning rate sets the
    final push, and the push on one edge is lambda / n_edges. Hence the small lambda
    learning rate, 0.003 on a graph of 77 edges (reverse's) and in proportion to the edge
    count on others (:meth:`lambda_lr`), and a linear decay of all learning rates to 0 that
    freezes the masks at the end. A weak push still removes every unneeded edge: its KL
    gradient is (near) zero, so AdamW moves its log_alpha at about lr_edge per step
    whatever the size of the push, but an inert dependency has a small KL gradient of its
    own. The window is narrow on both sides (measured on the suite, seed 0, 4000 steps;
    bench/results/tracr_recovery.md): with 0.01 (the value measured on reverse alone) the
    push at the end outgrew the KL cost of needed edges on hist and sort (their output or
    selector edges fell and accuracy went to 0); with 0.001 reverse kept the inert
    embeds->a3.h0.q (BOS term of the flip's query). 4000 steps with a 2700-step sparsity
    warm-up leave 1300 steps at the full target for the last unneeded edges to fall (on ``reverse`` alone 3000 / 2000 was
    enough; the suite's programs train on several lengths, one length per step, so each
    batch is seen a third as often). lr_edge 0.05: at 0.1 the split-embeddings run of
    ``reverse`` lost the length path (tok_embeds->a0.h0.v, a0.h0->m0, m0->m1) early in the
    warm-up and never got it back (a mask stuck at 0 has no gradient). No node masks and no
    weight decay (the original disables the node loss for tracr; decay would pull every
    log_alpha towards 0). init 3 instead of the recipe's 10: at 10 the masks sit deep in
    the clamped region where only the sparsity term has a gradient; at 3 about a fifth of
    the samples are below 1, so the KL is felt from the start. Measured per program and
    embedding mode: bench/tracr_recovery.py -> bench/results/tracr_recovery.md."""

    seed: int = 0
    steps: int = 4000
    target_edge_sparsity: float = 1.02
    sparsity_warmup: int = 2700
    lr_warmup: int = 250
    lr_edge: float = 0.05
    lr_node: float = 0.05
    lr_lambda: float = 0.003
    weight_decay: float = 0.0
    init: float = 3.0
    init_std: float = 0.01
    node_masks: bool = False
    sets: tuple[str, ...] | None = None
    batch_size: int | None = None
    lambda_reference_edges: int = 77

    def lambda_lr(self, n_edges: int) -> float:
        """The lambdas' learning rate on a graph of ``n_edges`` edges: ``lr_lambda * n_edges /
        lambda_reference_edges``. The sparsity term pushes each edge by lambda / n_edges and
        AdamW grows lambda by about its learning rate per step whatever the gap, so this
        keeps the push on every edge the same on every graph (lr_lambda as measured on
        reverse's 77 edges)."""
        if isinstance(n_edges, bool) or not isinstance(n_edges, int) or n_edges < 1:
            raise ValueError(f"n_edges: expected an integer >= 1, got {n_edges!r}")
        return self.lr_lambda * n_edges / self.lambda_reference_edges

    def train_config(self, **overrides: Any) -> TrainConfig:
        """The TrainConfig of these settings: every field the two share, then ``overrides``."""
        shared = {f.name for f in fields(TrainConfig)} & {f.name for f in fields(self)}
        return TrainConfig(**{k: getattr(self, k) for k in shared}, **overrides)


TRACR_DEFAULTS = TracrPruneSettings()


class TracrTask(Task):
    """A tracr model's example sets as a task. ``TracrTask(model, examples)`` with the
    model from ``load_tracr`` and ``examples`` from ``load_examples``; ``sets`` picks sets
    by name (None: those marked for the ground-truth test, else all)."""

    name = "tracr"
    metric_name = "accuracy"

    def __init__(self, model: TracrTransformer, examples: dict, sets: Sequence[str] | None = None, *,
                 value_tolerance: float = 1e-3) -> None:
        if not isinstance(model, TracrTransformer):
            raise ValueError(f"model: expected a TracrTransformer (load_tracr), got {type(model).__name__}")
        if sets is None:
            sets = [n for n, s in examples.items() if s.use_for_ground_truth_test] or list(examples)
        if unknown := [n for n in sets if n not in examples]:
            raise ValueError(f"sets: {unknown} not in the example file; it has {list(examples)}")
        if not sets:
            raise ValueError("sets: expected at least one example set name, got none")
        self.model, self.sets, self.value_tolerance = model, [examples[n] for n in sets], value_tolerance
        self.numerical = model.config.output_kind == "numerical"

    @classmethod
    def load(cls, path: str | Path = TRACR_DATA_DIR / "reverse", name: str | None = None,
             sets: Sequence[str] | None = None) -> TracrTask:
        """Model and examples from a tracr export (``path`` as in ``load_tracr``)."""
        directory, name = resolve_tracr_path(path, name)
        return cls(load_tracr(directory, name), load_examples(directory, name), sets)

    def _expected(self, s) -> dict[str, torch.Tensor]:
        if self.numerical:
            vals = [[0.0, *map(float, row[1:])] for row in s.expected_output]
            return {"expected_values": torch.tensor(vals, dtype=torch.float32)}
        if s.expected_output_ids is not None:
            return {"expected_ids": s.expected_output_ids}
        tok_to_id = {t: i for i, t in self.model.config.id_to_token.items()}
        return {"expected_ids": torch.tensor([[0, *(tok_to_id[t] for t in row[1:])] for row in s.expected_output])}

    def batches(self, batch_size: int | None = None, split: str = "train") -> list[TaskBatch]:
        """All examples of the chosen sets, grouped by length, in chunks of ``batch_size``
        (None: one batch per length). ``split`` is accepted for the Task interface; tracr
        sets are small and train and evaluation use the same examples."""
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ValueError(f"batch_size: expected an integer >= 1 or None, got {batch_size!r}")
        groups: dict[int, list[dict[str, torch.Tensor]]] = {}
        for s in self.sets:
            cols = {"input_ids": s.input_ids, **self._expected(s)}
            if s.corrupted_input_ids is not None:
                cols["corrupted_input_ids"] = s.corrupted_input_ids
            groups.setdefault(s.input_ids.shape[1], []).append(cols)
        out = []
        for _, parts in sorted(groups.items()):
            keys = set.intersection(*(set(p) for p in parts))
            cat = {k: torch.cat([p[k] for p in parts]) for k in keys}
            n = cat["input_ids"].shape[0]
            step = n if batch_size is None else batch_size
            for i in range(0, n, step):
                ids = cat["input_ids"][i:i + step]
                target = torch.ones_like(ids, dtype=torch.bool)
                target[:, 0] = False  # the BOS position's output is meaningless
                extras = {k: cat[k][i:i + step] for k in ("expected_ids", "expected_values") if k in cat}
                corrupted = cat.get("corrupted_input_ids")
                out.append(TaskBatch(input_ids=ids, corrupted_input_ids=None if corrupted is None else
                                     corrupted[i:i + step], attention_mask=None, target_mask=target, extras=extras))
        return out

    def loss(self, circuit_logits: torch.Tensor, full_logits: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
        """Summed over the non-BOS positions, averaged over examples (as Edge Pruning's tracr
        script: ``kl_div(.., reduction="batchmean")`` on [B, T-1, d_out]); categorical: KL over
        the output dims, numerical: squared error of the value."""
        per_position = batch.target_mask.sum() / batch.target_mask.shape[0]  # kl_loss averages positions
        if self.numerical:
            diff = (circuit_logits[..., 0] - full_logits[..., 0])[batch.target_mask]
            return (diff.float() ** 2).mean() * per_position
        return kl_loss(circuit_logits, full_logits, batch) * per_position

    def metric(self, logits: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
        """Per example [B]: 1.0 when every non-BOS output is decoded correctly, else 0.0."""
        mask = batch.target_mask
        if self.numerical:
            ok = (logits[..., 0].float() - batch.extras["expected_values"].to(logits.device)).abs() <= \
                self.value_tolerance
        else:
            ok = logits.argmax(-1) == batch.extras["expected_ids"].to(logits.device)
        return (ok | ~mask).all(-1).float()


# ---- the circuit read from the masks -------------------------------------------------------------
def edge_keep_scores(model: EdgePrunedModel) -> torch.Tensor:
    """Per edge in graph order: min(edge log_alpha, its writer node's log_alpha) (the edge's
    log_alpha without node masks). An edge's deterministic mask is non-zero iff its score
    exceeds ``keep_threshold``."""
    scores = model.edge_scores()
    nodes = model.node_scores()
    return scores if nodes is None else torch.minimum(scores, nodes[model.edge_writer_index()])


def keep_threshold(model: EdgePrunedModel) -> float:
    """log(-l/r): the log_alpha above which z_det = clamp(sigmoid(la)(r - l) + l, 0, 1) > 0."""
    return model.masks.params.log_ratio


def kept_edges(model: EdgePrunedModel) -> list[tuple[str, str]]:
    """Edges whose deterministic mask (times its writer node's) is non-zero, in graph order."""
    scores = edge_keep_scores(model)
    z = hard_concrete(scores, training=False, params=model.masks.params)
    return [(e.writer, e.reader) for e, keep in zip(model.graph.edges(), (z > 0).tolist()) if keep]


def compare_with_ground_truth(edges: Sequence[Any], path: str | Path, name: str | None = None, *,
                              split_embeds: bool = False) -> dict[str, Any] | None:
    """The circuit ``edges`` ((writer, reader) pairs or graph.Edge) against the export's ground truth (the embedding mode's list):
    {n_expected, matched, missing, extra, exact}; None when the export has no ground truth."""
    directory, name = resolve_tracr_path(path, name)
    if not (directory / f"{name}.ground_truth.json").is_file():
        return None
    gt = load_ground_truth(directory, name)
    truth = gt.edges_split_embeds if split_embeds else gt.edges
    if truth is None:
        return None
    found = {(e.writer, e.reader) if hasattr(e, "writer") else tuple(e) for e in edges}
    want = {tuple(e) for e in truth}
    return {"n_expected": len(want), "matched": len(found & want), "missing": sorted(map(list, want - found)),
            "extra": sorted(map(list, found - want)), "exact": found == want}


def roc_auc(model: EdgePrunedModel, truth: Sequence[Sequence[str]]) -> float:
    """ROC AUC of the edge scores against the ground-truth edge set (sklearn)."""
    from sklearn.metrics import roc_auc_score

    gt = {tuple(e) for e in truth}
    labels = [int((e.writer, e.reader) in gt) for e in model.graph.edges()]
    return float(roc_auc_score(labels, edge_keep_scores(model).cpu().numpy()))


@dataclass
class TracrPruneResult:
    """What :func:`prune_tracr` returns. ``edges``: recovered (writer, reader) pairs in graph
    order; ``ground_truth``: the export's circuit (None without a ground-truth file);
    ``exact``: edges == ground truth as sets; ``auc``: ROC AUC (None without ground truth);
    ``accuracy``: the metric of the recovered circuit (masks fixed to it) over the task's
    examples; ``history``: the trainer's rows."""

    model: EdgePrunedModel
    tracr: TracrTransformer
    edges: list[tuple[str, str]]
    ground_truth: list[tuple[str, str]] | None
    exact: bool | None
    auc: float | None
    accuracy: float
    steps: int
    seconds: float
    settings: TracrPruneSettings
    split_embeds: bool
    history: list[dict] = field(repr=False, default_factory=list)

    def summary(self) -> dict[str, Any]:
        """JSON-able summary (no model, no history)."""
        gt = set(self.ground_truth or [])
        return {"split_embeds": self.split_embeds, "n_edges_full": self.model.graph.n_edges,
                "recovered": [list(e) for e in self.edges], "n_recovered": len(self.edges),
                "ground_truth": None if self.ground_truth is None else [list(e) for e in self.ground_truth],
                "exact": self.exact, "missing": sorted(map(list, gt - set(self.edges))),
                "extra": sorted(map(list, set(self.edges) - gt)) if self.ground_truth is not None else None,
                "auc": self.auc, "accuracy": self.accuracy, "steps": self.steps, "seconds": round(self.seconds, 2),
                "final_kl": self.history[-1]["kl"] if self.history else None, "settings": asdict(self.settings)}


def prune_tracr(path: str | Path | None = None, *, name: str | None = None, split_embeds: bool = False,
                settings: TracrPruneSettings = TRACR_DEFAULTS, steps: int | None = None,
                out_dir: str | Path | None = None, progress: bool = True, threads: int | None = 1,
                trace_every: int = 0) -> TracrPruneResult:
    """Prune a tracr export with the one Trainer and compare the circuit with its ground truth.

    ``path``: as in ``load_tracr`` (None: the shipped ``reverse``); ``split_embeds``:
    separate tok/pos embedding writers; ``settings``: TRACR_DEFAULTS unless given;
    ``steps`` overrides settings.steps (the sparsity and learning-rate warm-ups shrink in
    proportion); ``out_dir``: trainer checkpoints and the final masks (``masks.safetensors``);
    ``progress``: the tqdm bar; ``threads``: torch intra-op threads during the run (restored
    after; None: leave as is); ``trace_every``: every this many steps (0: never) record the
    ground-truth edges' log_alphas into ``history`` (such rows' ``eval["gt_log_alpha"]``),
    to see how a recovery went. tracr models are tiny (d_model 41, 4 tokens): extra threads only
    add synchronisation (on 2 busy cores, 2 threads ran a step ~10x slower than 1)."""
    directory, name = resolve_tracr_path(TRACR_DATA_DIR / "reverse" if path is None else path, name)
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: expected an integer >= 1 or None, got {steps!r}")
        f = steps / settings.steps
        settings = replace(settings, steps=steps, sparsity_warmup=round(settings.sparsity_warmup * f),
                           lr_warmup=round(settings.lr_warmup * f))
    tracr = load_tracr(directory, name)
    task = TracrTask(tracr, load_examples(directory, name), settings.sets)
    truth = None
    if (directory / f"{name}.ground_truth.json").is_file():
        gt = load_ground_truth(directory, name)
        truth = gt.edges_split_embeds if split_embeds else gt.edges
    with torch.random.fork_rng():  # the mask initialisation is part of the seeded run
        torch.manual_seed(settings.seed)
        model = EdgePrunedModel.from_hf(tracr, ablation="zero", split_embeds=split_embeds,
                                        node_masks=settings.node_masks, init=settings.init,
                                        init_std=settings.init_std)
    batches = task.batches(settings.batch_size)
    config = replace(settings.train_config(progress=progress), lr_lambda=settings.lambda_lr(model.graph.n_edges),
                     eval_every=trace_every)
    trace = None
    if trace_every and truth:
        index = {(e.writer, e.reader): i for i, e in enumerate(model.graph.edges())}
        watched = [(f"{w}->{r}", index[(w, r)]) for w, r in truth]

        def trace(m: EdgePrunedModel) -> dict:
            scores = edge_keep_scores(m).tolist()
            return {"gt_log_alpha": {k: round(scores[i], 3) for k, i in watched}}

    trainer = Trainer(model, task, batches, config, out_dir=out_dir, evaluate=trace)
    before = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        t0 = time.perf_counter()
        history = trainer.run()
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(before)
    model.eval()
    edges = kept_edges(model)
    with torch.no_grad():
        model.set_circuit(edges)
        accuracy = float(torch.cat([task.metric(model(b.input_ids).logits, b) for b in batches]).mean())
        model.clear_circuit()
    if out_dir is not None:
        model.save_masks(Path(out_dir) / "masks.safetensors")
    return TracrPruneResult(model=model, tracr=tracr, edges=edges, ground_truth=truth,
                            exact=None if truth is None else set(edges) == set(truth),
                            auc=None if truth is None else roc_auc(model, truth), accuracy=accuracy,
                            steps=trainer.step, seconds=seconds, settings=settings, split_embeds=split_embeds,
                            history=history)
