"""Edge attribution on the edge-pruned graph: EAP and EAP-IG (inputs and activations).

The score of edge w -> r is the derivative of a metric M in the edge's mask at the full
model (every mask 1, deterministic, ARCHITECTURE.md §2):

    score[r, w] = dM/dz[r, w] |_{z=1} = <delta_w, g_r>        delta_w = y_w - y~_w    [B, S, D]
                                                              g_r     = dM/dx_r       [B, S, D]

summed over batch, positions and d_model; y_w is writer w's output on the clean input, y~_w
on the corrupted one (both from plain captures of the unmodified model, writers.py), x_r the
reader's input. Methods (Hanna et al. 2024, hannamw/EAP-IG ``src/eap/attribute.py``, read at
commit 795f560; written from their definitions, not their code):

    eap                  g_r at the clean input: one backward per batch.
    eap-ig               ("EAP-IG-inputs") the embedding writers are interpolated,
                         e(a) = y~_e + a (y_e - y~_e), and g_r is averaged over
                         a = k / steps for k = 0 .. steps - 1 (their placement: a left
                         Riemann sum that includes the corrupted end and excludes the clean
                         one): one backward per step.
    eap-ig-activations   ("EAP-IG-activations") for each writer group in turn (the embeddings;
                         layer l's heads together, their one ``a{l}.h0`` hook on the attention
                         result; m{l}), that group's outputs are replaced by the constant
                         y~ + a (y - y~), a = k / steps for k = 1 .. steps (their placement:
                         excludes the corrupted end, includes the clean one), the rest of the
                         model runs on the clean input, and g_r is averaged over all
                         (2L + 1) * steps runs: one backward per step and group, as theirs.

In every method delta_w is the clean minus corrupted difference of the *captures*, never of
an interpolated run, as in EAP-IG.

Conventions (what differs from EAP-IG's files, and why):

- Sign: ours is dM/dz with M "higher = the behaviour is there" (logit difference, log-prob,
  -KL). EAP-IG computes (y~ - y) . dm/dx with m the *loss* its examples pass
  (``logit_diff(loss=True)`` = -logit difference, ``kl_div`` = +KL): the same sign as ours
  for those metrics. A positive score: the edge helps the behaviour (removing it lowers M).
  Files keep the sign; tools that rank by |score| (EAP-IG's ``apply_topn(absolute=True)``,
  MIB) see the same order either way.
- Scale: M is the mean over examples (over target positions for kl), the IG average is the
  mean over steps. EAP-IG divides a batch-mean metric by the number of examples once more
  (a positive factor 1 / batch size per batch); rankings are unchanged.
- Metrics: ``logit-diff`` logit(label) - logit(contrast) at the first target position (tasks
  with a contrasting answer: IOI, gendered pronouns, MIB's); ``log-prob`` log p(label) there
  (log-softmax over the vocabulary); ``kl`` -KL(p_full || p) at every target position, over
  the task's candidates or the vocabulary (the training loss, negated). The default follows
  EAP-IG's use per task: logit difference where the task has a contrasting answer, else
  log-prob. EAP with kl is refused: KL(p_full || p) is minimal (0) at the full model, so its
  gradient there is exactly 0 and every score would be 0.

How it runs (fast and lean): ``EdgePrunedModel.probed_forward`` (inside ``probing``) is the fused forward with
every mask exactly 1 and no ablation states (the slots hold the writers' outputs); the
probe here wraps each reader group's input x [R, B, S, D] in an identity autograd Function
whose backward receives g = dM/dx and adds g [R, B*S*D] @ delta[:n].T [B*S*D, n] into that
group's scores [R, n]; nothing else is kept. So one backward serves every edge, the reader
gradients are never stored together (each is consumed as it appears), and the only extra
memory over a plain training step is delta [W, B, S, D] (and, for the IG variants, the
corrupted states of the interpolated writers). This plain matmul per group is used instead of
differentiating the masks through the mix's backward: that backward's mask gradient is
<g_r, slot_w>, and the slots of an interpolated run hold the interpolated outputs, not the
captures' difference; the matmul serves all three methods with one code path and needs no
corrupted states in the forward (measured in bench/attribution_bench.py). Per-layer
checkpointing (``checkpoint_layers``) works unchanged (backward runs inside ``probing``): a
recomputed read builds a tap whose backward never runs, and a recomputed write is replaced by
the same constant.
Processes: single-process only (no torchrun/FSDP path; the scores would need one
all-reduce of [E] per run, not written yet).

Output: scores [E] in graph order (``Graph.edges()``), float64 for float64 models, else
float32 (products in the model's dtype, accumulated in float32).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .tasks.base import TaskBatch

METHODS = ("eap", "eap-ig", "eap-ig-activations")
METRICS = ("logit-diff", "log-prob", "kl")


# -- metrics ---------------------------------------------------------------------------------------
def has_contrast(task) -> bool:
    """Whether the task names a contrasting answer (LogitDiffTask's ``contrast_key``)."""
    return isinstance(getattr(task, "contrast_key", None), str)


def default_metric(task) -> str:
    """EAP-IG's choice per task: logit difference where there is a contrasting answer, else log-prob."""
    return "logit-diff" if has_contrast(task) else "log-prob"


def check_method_metric(method: str, metric: str, task) -> None:
    """ValueError naming the argument for a method or metric that cannot be used (here, with this task)."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {', '.join(METRICS)}, got {metric!r}")
    if method == "eap" and metric == "kl":
        raise ValueError("metric: 'kl' with method 'eap' is meaningless: KL(p_full || p) is 0 at the full model, "
                         "its minimum, so its gradient there (every EAP score) is exactly 0; expected "
                         "--metric logit-diff or log-prob with eap, or an IG method (eap-ig, eap-ig-activations) "
                         "with kl")
    if metric == "logit-diff" and not has_contrast(task):
        raise ValueError(f"metric: 'logit-diff' needs a task with a contrasting answer (IOI, gendered pronouns, "
                         f"MIB's tasks); {getattr(task, 'name', type(task).__name__)!r} has none; expected "
                         f"--metric log-prob or kl")


def metric_sum(metric: str, task, logits: torch.Tensor, full_logits: torch.Tensor | None,
               batch: TaskBatch) -> tuple[torch.Tensor, int]:
    """(sum of the metric over the batch's units, number of units): examples, or target
    positions for kl. Computed in float32 (float64 for float64 logits)."""
    cd = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if metric == "kl":
        def log_probs(z):
            x = z[batch.target_mask].to(cd)
            return F.log_softmax(x if batch.candidates is None else x[:, batch.candidates], dim=-1)

        kl = F.kl_div(log_probs(logits), log_probs(full_logits), log_target=True, reduction="sum")
        return -kl, int(batch.target_mask.sum())
    if batch.labels is None:
        raise ValueError(f"metric: {metric!r} reads each example's label, and the task's batches have none")
    has = batch.target_mask.any(dim=1)
    if not bool(has.all()):
        raise ValueError(f"batch.target_mask: every row needs a target position, rows "
                         f"{torch.nonzero(~has).flatten().tolist()} have none")
    first = batch.target_mask.int().argmax(dim=1)  # the first target position of each row
    x = logits[torch.arange(logits.shape[0], device=logits.device), first].to(cd)  # [B, V]
    label = x.gather(1, batch.labels[:, None]).squeeze(1)
    if metric == "logit-diff":
        return (label - x.gather(1, batch.extras[task.contrast_key][:, None]).squeeze(1)).sum(), len(batch)
    return (label - torch.logsumexp(x, dim=-1)).sum(), len(batch)


# -- the probe -------------------------------------------------------------------------------------
class _Tap(torch.autograd.Function):
    """Identity on a reader group's input; backward hands dM/dx to the probe."""

    @staticmethod
    def forward(ctx, x, probe, gi):
        ctx.probe, ctx.gi = probe, gi
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.probe.accumulate(ctx.gi, g)
        return g, None, None


class Probe:
    """Scores [R_g, n_g] per reader group, from the reader gradients of probed forwards.

    delta: [W, B, S, D] clean - corrupted writer states; ``replace``: {first slot: constant
    [k, B, S, D]} written in place of the writer outputs at that slot (interpolations)."""

    def __init__(self, graph, delta: torch.Tensor, dtype: torch.dtype) -> None:
        self.graph, self.delta = graph, delta
        self.scores = [torch.zeros(len(g.readers), g.n_upstream, dtype=dtype, device=delta.device)
                       for g in graph.groups]
        self.replace: dict[int, torch.Tensor] = {}

    def read(self, gi: int, x: torch.Tensor) -> torch.Tensor:
        return _Tap.apply(x, self, gi) if x.requires_grad else x

    def write(self, slot: int, y: torch.Tensor) -> torch.Tensor:
        r = self.replace.get(slot)
        if r is None:
            return y
        if r.shape != y.shape:
            raise RuntimeError(f"attribution: replacement of slot {slot} has shape {tuple(r.shape)}, the write "
                               f"{tuple(y.shape)}")
        return r

    def accumulate(self, gi: int, g: torch.Tensor) -> None:
        n = self.graph.groups[gi].n_upstream
        R = g.shape[0]
        d = self.delta[:n].reshape(n, -1)
        prod = torch.mm(g.reshape(R, -1).to(d.dtype), d.T)
        self.scores[gi] += prod.to(self.scores[gi].dtype)

    def flat(self) -> torch.Tensor:
        return torch.cat([s.flatten() for s in self.scores])


# -- attribution -------------------------------------------------------------------------------------
def _writer_groups(graph) -> list[tuple[int, int]]:
    """(first slot, count) of EAP-IG's nodes for the activations variant: the embeddings, each
    layer's heads, each MLP (in residual order)."""
    ws = graph.writer_names()
    E = sum(1 for w in ws if "embeds" in w)
    out, slot = [(0, E)], E
    for H in graph.config.n_heads:
        out += [(slot, H), (slot + H, 1)]
        slot += H + 1
    return out


def runs_per_batch(method: str, graph, ig_steps: int) -> int:
    """Forward + backward passes per batch."""
    if method == "eap":
        return 1
    if method == "eap-ig":
        return ig_steps
    return len(_writer_groups(graph)) * ig_steps


def attribute(model, task, batches: Sequence[TaskBatch], *, method: str = "eap-ig", metric: str | None = None,
              ig_steps: int = 5, progress: bool = True,
              on_step: Callable[[], None] | None = None) -> torch.Tensor:
    """Scores [E] of every edge of ``model.graph`` (an EdgePrunedModel), graph order; see the
    module docstring. ``task``: for the metric (its contrast key); ``batches``: its batches
    with corrupted inputs; ``metric``: None for ``default_metric(task)``."""
    metric = default_metric(task) if metric is None else metric
    check_method_metric(method, metric, task)
    if isinstance(ig_steps, bool) or not isinstance(ig_steps, int) or ig_steps < 1:
        raise ValueError(f"ig_steps: expected an integer >= 1, got {ig_steps!r}")
    batches = list(batches)
    if not batches:
        raise ValueError("batches: expected at least one batch, got none")
    for i, b in enumerate(batches):
        if b.corrupted_input_ids is None:
            raise ValueError(f"batches: batch {i} has no corrupted inputs; attribution patches from the corrupted run")
    from tqdm.auto import tqdm

    graph, a = model.graph, model.adapter
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    total = torch.zeros(graph.n_edges, dtype=acc)
    units = 0
    steps = runs_per_batch(method, graph, ig_steps)
    groups = _writer_groups(graph)
    bar = tqdm(total=steps * len(batches), desc=f"attribute ({method})", disable=not progress, unit="pass")
    try:
        for batch in batches:
            batch = batch.to(a.device)
            full_logits, clean = model.reference(batch.input_ids, batch.attention_mask)
            _, corrupt = model.reference(batch.corrupted_input_ids, batch.attention_mask, logits=False)
            delta = clean - corrupt
            del clean
            E = groups[0][1]
            if method == "eap":
                corrupt, plans = None, [None]
            elif method == "eap-ig":  # the embeddings' corrupted states only
                corrupt, plans = corrupt[:E].clone(), [(0, E, k) for k in range(ig_steps)]
            else:
                plans = [(first, n, k) for first, n in groups for k in range(1, ig_steps + 1)]
            probe = Probe(graph, delta, acc)
            n_units = 0
            for plan in plans:
                if plan is not None:  # writers first .. first + n - 1 at a = k / steps
                    first, n, k = plan
                    probe.replace = {first: corrupt[first:first + n] + (k / ig_steps) * delta[first:first + n]}
                with torch.enable_grad(), model.probing(probe):
                    logits = model.probed_forward(batch.input_ids, batch.attention_mask)
                    value, n_units = metric_sum(metric, task, logits, full_logits, batch)
                    if value.requires_grad:
                        value.backward()
                probe.replace = {}
                bar.update(1)
                if on_step is not None:
                    on_step()
            total += probe.flat().cpu().to(acc) / len(plans)
            units += n_units
            del probe, delta, corrupt
    finally:
        bar.close()
    return total / max(units, 1)
