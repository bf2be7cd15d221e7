"""The one trainer: Edge Pruning's masked KL objective with a Lagrangian sparsity constraint.

    loss = task.loss(circuit logits, full logits, batch)          KL(p_full || p_circuit)
         + l1_e * (t_e - s_e) + l2_e * (t_e - s_e)^2               edges
         + l1_n * (t_n - s_n) + l2_n * (t_n - s_n)^2               nodes (optional)

s is the circuit's expected sparsity (1 - expected kept / total, differentiable in
log_alpha; EdgePrunedOutput.edge_sparsity / node_sparsity), t the target, warmed up
linearly from 0 over ``sparsity_warmup`` steps (ARCHITECTURE.md §2). log_alpha minimises
the loss; the lambdas maximise it (gradient ascent: AdamW's ``maximize=True``), so a
lambda grows while its constraint is unmet. Defaults follow the original Edge Pruning
recipe: torch AdamW (its default weight decay 0.01, as the original's optimiser), learning
rates 0.8, 3000 steps, sparsity warm-up 2500 steps, and the learning-rate schedule of
HF's ``get_linear_schedule_with_warmup`` (linear warm-up over 200 steps, then linear decay
to 0). log_alpha's initialisation (mean 10) belongs to the model:
``EdgePrunedModel.from_hf(..., init=10.0)``.

One step (kept in three parts so data-parallel training can all-reduce gradients between
backward and the optimiser step):

    loss, row = self.forward_loss(batch)     # circuit forward (noise drawn), task loss, Lagrangian
    loss.backward()
    self.optimizer_step()                    # finite-gradient check, AdamW, scheduler

Determinism and resume: every random draw of a step (the hard-concrete noise, drawn by the
model from torch's default generators) is made from a generator state the trainer owns
(seeded from ``config.seed`` and saved in checkpoints), restored before and captured after
each step inside ``torch.random.fork_rng``; the batch order is a fixed function of
``(seed, epoch)``. So a run stopped after k steps and resumed from its checkpoint ends with
the same masks as an uninterrupted run, and code outside the trainer (an evaluation hook,
the caller) neither disturbs nor is disturbed by the trainer's random stream.

Checkpoints: one file, ``<name>.safetensors``: the tensors (masks, lambdas, optimiser
state, RNG states) and, in its metadata, the JSON of the rest (step, config, optimiser
groups, scheduler, the data position and a fingerprint of the batches, history). One file
so that a checkpoint is replaced in one atomic rename (written to a temporary file,
flushed to disk, renamed): a kill at any moment leaves the previous checkpoint or the new
one, never a mix. A non-finite loss (or gradient) stops the run before that step's update,
checkpoints the last good state as ``last_good`` and raises :class:`NonFiniteLoss` saying
where it is. ``run(should_stop=...)`` lets a caller stop between steps (a signal handler
sets a flag): the trainer checkpoints and raises :class:`TrainingInterrupted`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .staging import write_atomically
from .tasks.base import TaskBatch

# Fields that shape the trajectory: a checkpoint resumes only under the same values.
_TRAJECTORY_FIELDS = ("target_edge_sparsity", "target_node_sparsity", "steps", "sparsity_warmup", "lr_warmup",
                      "lr_edge", "lr_node", "lr_lambda", "weight_decay", "seed")


@dataclass(frozen=True)
class TrainConfig:
    """Training settings (defaults: the original Edge Pruning recipe).

    target_edge_sparsity   in [0, 2): 1 - kept/total edges to reach (above 1 keeps pushing:
                           the original's tracr runs use 1.02)
    target_node_sparsity   in [0, 2), or None: no node constraint (node masks, if the model
                           has them, still learn from the task loss)
    steps                  optimiser steps
    sparsity_warmup        steps over which the targets rise linearly from 0 (default None:
                           the original's 2500 of 3000 steps, scaled to ``steps``: 5/6 of it)
    lr_warmup              steps of linear learning-rate warm-up, then linear decay to 0
                           (default None: the original's 200 of 3000, scaled: 1/15 of ``steps``);
                           a warm-up longer than the run is refused
    lr_edge / lr_node / lr_lambda   AdamW learning rates of edge log_alphas, node log_alphas,
                           and the Lagrange multipliers (gradient ascent)
    weight_decay           AdamW's decoupled weight decay on every group (torch's default)
    seed                   seeds the trainer's random stream (noise) and the batch order
    eval_every             call the evaluation hook every this many steps (0: at the end only)
    checkpoint_every       write ``checkpoint`` every this many steps (0: at the end only)
    cache_references       keep each batch's full-model logits and corrupted writer states
                           (computed once: the data set is fixed)
    progress               show the tqdm progress bar
    """

    target_edge_sparsity: float = 0.98
    target_node_sparsity: float | None = None
    steps: int = 3000
    sparsity_warmup: int | None = None
    lr_warmup: int | None = None
    lr_edge: float = 0.8
    lr_node: float = 0.8
    lr_lambda: float = 0.8
    weight_decay: float = 0.01
    seed: int = 0
    eval_every: int = 0
    checkpoint_every: int = 0
    cache_references: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        def number(name: str, v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for name in ("target_edge_sparsity", "target_node_sparsity"):
            v = getattr(self, name)
            if v is None and name == "target_node_sparsity":
                continue
            if not (number(name, v) and 0.0 <= v < 2.0):
                raise ValueError(f"TrainConfig.{name}: expected a number in [0, 2), got {v!r}")
        for name, low in (("steps", 1), ("sparsity_warmup", 0), ("lr_warmup", 0), ("seed", 0),
                          ("eval_every", 0), ("checkpoint_every", 0)):
            v = getattr(self, name)
            if v is None and name in ("sparsity_warmup", "lr_warmup"):
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"TrainConfig.{name}: expected an integer >= {low}, got {v!r}")
        for name, (of, per) in (("sparsity_warmup", (2500, 3000)), ("lr_warmup", (200, 3000))):
            v = getattr(self, name)
            if v is None:  # the original recipe's warm-up, scaled to this run's length
                object.__setattr__(self, name, round(self.steps * of / per))
            elif v > self.steps:
                raise ValueError(f"TrainConfig.{name}: expected at most steps={self.steps} (a warm-up longer than the "
                                 f"run never reaches its end; leave it None to scale the original's {of} of {per} "
                                 f"steps to the run), got {v}")
        for name in ("lr_edge", "lr_node", "lr_lambda"):
            v = getattr(self, name)
            if not (number(name, v) and v > 0):
                raise ValueError(f"TrainConfig.{name}: expected a finite number > 0, got {v!r}")
        if not (number("weight_decay", self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"TrainConfig.weight_decay: expected a finite number >= 0, got {self.weight_decay!r}")
        for name in ("cache_references", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TrainConfig.{name}: expected True or False, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """From ``to_dict`` output (e.g. a checkpoint's JSON); ValueError naming unknown fields."""
        known = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(d) - known):
            raise ValueError(f"TrainConfig: unknown fields {unknown}; expected some of {sorted(known)}")
        return cls(**d)


class NonFiniteLoss(RuntimeError):
    """The loss (or a gradient) became NaN or inf; the step was not applied."""


class TrainingInterrupted(RuntimeError):
    """``run``'s ``should_stop`` asked to stop between steps; ``path`` is the checkpoint
    written (None without an out_dir), ``step`` the steps done."""

    def __init__(self, step: int, path: Path | None) -> None:
        where = f"; checkpoint in {path}" if path is not None else " (no out_dir: nothing saved)"
        super().__init__(f"stopped after step {step}{where}")
        self.step, self.path = step, path


def target_at(step: int, target: float, warmup: int) -> float:
    """Linear warm-up of the target sparsity from 0 to ``target`` over ``warmup`` steps."""
    return target if warmup == 0 else target * min(1.0, step / warmup)


def lagrangian(lambdas: torch.Tensor, target: float, sparsity: torch.Tensor) -> torch.Tensor:
    """l1 * (t - s) + l2 * (t - s)^2 (ARCHITECTURE.md §2); lambdas = [l1, l2]."""
    gap = target - sparsity
    return lambdas[0] * gap + lambdas[1] * gap * gap


def linear_schedule(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: HF's get_linear_schedule_with_warmup (the original's)."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def _fixed(value: float, digits: int = 4) -> str:
    """``value`` with ``digits`` decimals, never "-0.0000" (a KL of -1e-9 is rounding)."""
    text = f"{value:.{digits}f}"
    return text[1:] if text.startswith("-") and float(text) == 0 else text


class Trainer:
    """Trains the masks of an edge-pruned model on a fixed list of task batches.

    ``model``: an EdgePrunedModel. ``task``: anything with ``loss(circuit_logits,
    full_logits, batch) -> 0-dim tensor`` (a :class:`~edgeprune_fast.tasks.base.Task`).
    ``batches``: the training :class:`TaskBatch` es, visited in a seeded shuffled order, one
    permutation per epoch. ``evaluate``: optional hook ``evaluate(model) -> dict`` of
    numbers, called (model in eval mode, no grad, outside the trainer's random stream)
    every ``config.eval_every`` steps and at the end; its results go into ``history``.
    ``out_dir``: where checkpoints go (None: no checkpoints).
    """

    def __init__(self, model, task, batches: Sequence[TaskBatch], config: TrainConfig | None = None, *,
                 out_dir: str | Path | None = None, evaluate: Callable[[Any], dict] | None = None,
                 data_parallel=None) -> None:
        config = TrainConfig() if config is None else config
        if not isinstance(config, TrainConfig):
            raise ValueError(f"config: expected a TrainConfig, got {type(config).__name__}")
        if not callable(getattr(task, "loss", None)):
            raise ValueError(f"task: expected an object with loss(circuit_logits, full_logits, batch), "
                             f"got {type(task).__name__}")
        batches = list(batches)
        if not batches:
            raise ValueError("batches: expected at least one TaskBatch, got none")
        if bad := [i for i, b in enumerate(batches) if not isinstance(b, TaskBatch)]:
            raise ValueError(f"batches: expected TaskBatch items, item {bad[0]} is {type(batches[bad[0]]).__name__}")
        if evaluate is not None and not callable(evaluate):
            raise ValueError(f"evaluate: expected a callable evaluate(model) -> dict or None, got {evaluate!r:.60}")
        edge_params = list(model.edge_log_alpha_parameters())
        node_params = list(model.node_log_alpha_parameters())
        if config.target_node_sparsity is not None and not node_params:
            raise ValueError("config.target_node_sparsity: the model has no node masks (node_masks=False); "
                             "expected None")
        self.model, self.task, self.batches, self.config = model, task, batches, config
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.evaluate = evaluate
        self.device = edge_params[0].device
        self.step = 0
        self.history: list[dict] = []
        self._cache: dict[int, tuple[TaskBatch, torch.Tensor, torch.Tensor | None]] = {}
        self._rng = self._seeded_rng(config.seed)

        self.edge_lambdas = torch.zeros(2, device=self.device, requires_grad=True)
        self.node_lambdas = torch.zeros(2, device=self.device, requires_grad=True)
        groups = [{"params": edge_params, "lr": config.lr_edge}]
        if node_params:
            groups.append({"params": node_params, "lr": config.lr_node})
        groups.append({"params": [self.edge_lambdas], "lr": config.lr_lambda, "maximize": True})
        if config.target_node_sparsity is not None:
            groups.append({"params": [self.node_lambdas], "lr": config.lr_lambda, "maximize": True})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
        # data_parallel: a distributed.DataParallel (each process its slice of every batch,
        # gradients averaged, rank 0 writes the checkpoints), or None
        self.data_parallel = data_parallel
        if data_parallel is not None:
            data_parallel.broadcast_parameters(edge_params + node_params)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: linear_schedule(s, config.lr_warmup, config.steps))

    # -- random stream ----------------------------------------------------------------------------
    def _cuda_devices(self) -> list[int]:
        return [self.device.index or 0] if self.device.type == "cuda" else []

    def _seeded_rng(self, seed: int) -> dict[str, torch.Tensor]:
        with torch.random.fork_rng(devices=self._cuda_devices()):
            torch.manual_seed(seed)
            return self._capture_rng()

    def _capture_rng(self) -> dict[str, torch.Tensor]:
        state = {"cpu": torch.get_rng_state()}
        for d in self._cuda_devices():
            state["cuda"] = torch.cuda.get_rng_state(d)
        return state

    @contextmanager
    def _own_rng(self):
        """Run the body on the trainer's random stream; the caller's stream is left as it was."""
        with torch.random.fork_rng(devices=self._cuda_devices()):
            torch.set_rng_state(self._rng["cpu"])
            for d in self._cuda_devices():
                torch.cuda.set_rng_state(self._rng["cuda"], d)
            yield

    # -- data ----------------------------------------------------------------------------------
    def batch_index(self, step: int) -> int:
        """Seeded shuffled order, one permutation per epoch: a pure function of (seed, step)."""
        n = len(self.batches)
        epoch, i = divmod(step, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch))
        return int(order[i])

    def references(self, index: int) -> tuple[TaskBatch, torch.Tensor, torch.Tensor | None]:
        """(batch on the model's device, full logits, corrupted writer states or None)."""
        if index in self._cache:
            return self._cache[index]
        batch = self.batches[index]
        batch = (batch if self.data_parallel is None else self.data_parallel.shard(batch)).to(self.device)
        full_logits, _ = self.model.reference(batch.input_ids, batch.attention_mask, states=False)
        corrupted = None
        if self.model.ablation == "corrupted":
            if batch.corrupted_input_ids is None:
                raise ValueError(f"batches[{index}].corrupted_input_ids: required under the model's "
                                 f"ablation='corrupted', got None")
            _, corrupted = self.model.reference(batch.corrupted_input_ids, batch.attention_mask, logits=False)
            if hasattr(self.model, "place_corrupted_writers"):  # e.g. in host memory (corrupted_on_cpu)
                corrupted = self.model.place_corrupted_writers(corrupted)
        entry = (batch, full_logits, corrupted)
        if self.config.cache_references:
            self._cache[index] = entry
        return entry

    # -- one step ------------------------------------------------------------------------------
    def forward_loss(self, batch: TaskBatch, full_logits: torch.Tensor,
                     corrupted: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
        """Sampled-mask forward, task loss and Lagrangian terms: (loss, log row)."""
        c = self.config
        out = self.model(batch.input_ids, attention_mask=batch.attention_mask, corrupted_writers=corrupted,
                         training=True)
        kl = self.task.loss(out.logits, full_logits, batch)
        kl_value = float(kl.detach())
        t_edge = target_at(self.step, c.target_edge_sparsity, c.sparsity_warmup)
        loss = kl + lagrangian(self.edge_lambdas, t_edge, out.edge_sparsity)
        row = {"step": self.step + 1, "kl": kl_value, "edge_sparsity": float(out.edge_sparsity.detach()),
               "target_edge": t_edge, "lambda_edge": self.edge_lambdas.detach().tolist(),
               "node_sparsity": float(out.node_sparsity.detach())}
        if c.target_node_sparsity is not None:
            t_node = target_at(self.step, c.target_node_sparsity, c.sparsity_warmup)
            loss = loss + lagrangian(self.node_lambdas, t_node, out.node_sparsity)
            row.update(target_node=t_node, lambda_node=self.node_lambdas.detach().tolist())
        row.update(loss=float(loss.detach()), lr=self.scheduler.get_last_lr()[0])
        return loss, row

    def _non_finite_grads(self) -> list[str]:
        names = []
        for gi, g in enumerate(self.optimizer.param_groups):
            for pi, p in enumerate(g["params"]):
                if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                    names.append(f"group {gi} param {pi}")
        return names

    def optimizer_step(self) -> None:
        """AdamW step and scheduler step, after checking that every gradient is finite."""
        if bad := self._non_finite_grads():
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(f"step {self.step + 1}: non-finite gradients in {', '.join(bad[:4])}")
        self.optimizer.step()
        self.scheduler.step()

    def train_step(self) -> dict:
        """One optimiser step; raises NonFiniteLoss (nothing applied) on a NaN/inf loss or gradient."""
        batch, full_logits, corrupted = self.references(self.batch_index(self.step))
        self.model.train()
        with self._own_rng():
            loss, row = self.forward_loss(batch, full_logits, corrupted)
            del corrupted  # uncached, the corrupted states are freed before backward (the model dropped them)
            bad_here, dp = not math.isfinite(row["loss"]), self.data_parallel
            # every process stops together: none is left waiting in the gradients' all_reduce
            if dp is not None and dp.any_process(bad_here) and not bad_here:
                raise NonFiniteLoss(f"step {self.step + 1}: the loss is not finite on another process (here it is "
                                    f"{row['loss']}); every process stops")
            if bad_here:
                where = "" if dp is None else f" on process {dp.rank}"
                raise NonFiniteLoss(f"step {self.step + 1}: the loss is {row['loss']}{where} (task loss {row['kl']}, "
                                    f"edge sparsity {row['edge_sparsity']:.4f}, lambdas {row['lambda_edge']})")
            if dp is not None:  # log the global batch's task loss, as one process would see it
                kl_all = dp.weighted_mean(row["kl"], batch.target_mask.sum())
                row.update(kl=kl_all, loss=row["loss"] - row["kl"] + kl_all, kl_this_process=row["kl"])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if dp is not None:
                dp.all_reduce_gradients(
                    [p for g in self.optimizer.param_groups for p in g["params"]], batch.target_mask.sum())
            self.optimizer_step()
            rng = self._capture_rng()
        self._rng = rng  # committed only once the step is applied
        self.step += 1
        return row

    # -- the loop ------------------------------------------------------------------------------
    def run_evaluation(self) -> dict:
        """The evaluation hook on the current masks (eval mode, no grad, outside the random stream)."""
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=self._cuda_devices()):
                result = dict(self.evaluate(self.model))
        finally:
            self.model.train(was)
        return result

    def run(self, should_stop: Callable[[], bool] | None = None) -> list[dict]:
        """Train until ``config.steps`` (continuing from ``self.step`` after a resume); returns
        the history (one row per step: kl, sparsities, targets, lambdas, lr; ``eval`` rows).
        Under data parallel, kl and loss are the global batch's on every process, and
        kl_this_process is the process's own share's. ``should_stop``: asked after every
        step (under data parallel, the processes stop together when any asks); when it says
        True the trainer checkpoints and raises :class:`TrainingInterrupted`."""
        c = self.config
        bar = tqdm(total=c.steps, initial=self.step, disable=not c.progress, desc="pruning", unit="step",
                   dynamic_ncols=True)
        try:
            while self.step < c.steps:
                try:
                    row = self.train_step()
                except NonFiniteLoss as exc:
                    raise NonFiniteLoss(self._stop_message(exc)) from None
                self.history.append(row)
                bar.set_postfix(self._postfix(row), refresh=False)
                bar.update(1)
                last = self.step == c.steps
                if self.evaluate is not None and (last or (c.eval_every and self.step % c.eval_every == 0)):
                    row["eval"] = self.run_evaluation()
                    bar.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else
                                                               f"{k} {v}" for k, v in row["eval"].items()))
                saved = None
                if self.out_dir is not None and (last or (c.checkpoint_every and self.step % c.checkpoint_every == 0)):
                    saved = self.save_checkpoint()
                if should_stop is not None and not last and self._stop_requested(should_stop):
                    if saved is None and self.out_dir is not None:
                        saved = self.save_checkpoint()
                    raise TrainingInterrupted(self.step, saved)
        finally:
            bar.close()
        return self.history

    def _stop_requested(self, should_stop: Callable[[], bool]) -> bool:
        stop = bool(should_stop())
        return stop if self.data_parallel is None else self.data_parallel.any_process(stop)

    def _stop_message(self, exc: Exception) -> str:
        where = ""
        if self.out_dir is not None:
            path = self.save_checkpoint("last_good")
            where = (f"; the last good state (after {self.step} steps) is saved in {path} "
                     f"(resume with Trainer.load_checkpoint, e.g. with lower learning rates)")
        return f"{exc}; stopped before applying it{where or ' (no out_dir: nothing saved)'}"

    @staticmethod
    def _postfix(row: dict) -> dict[str, str]:
        post = {"kl": _fixed(row["kl"]), "edges": f"{row['edge_sparsity']:.3f}/{row['target_edge']:.3f}",
                "nodes": f"{row['node_sparsity']:.3f}" + (f"/{row['target_node']:.3f}" if "target_node" in row else ""),
                "lam_e": "{:.2f},{:.2f}".format(*row["lambda_edge"])}
        if "lambda_node" in row:
            post["lam_n"] = "{:.2f},{:.2f}".format(*row["lambda_node"])
        return post

    # -- checkpoints ---------------------------------------------------------------------------
    def data_position(self) -> dict[str, Any]:
        """Where the batch order stands, and a fingerprint of the batches (a resume checks it)."""
        epoch, i = divmod(self.step, len(self.batches))
        return {"n_batches": len(self.batches), "epoch": epoch, "next_in_epoch": i,
                "fingerprint": self._fingerprint()}

    def _fingerprint(self) -> str:
        if getattr(self, "_data_fingerprint", None) is None:
            h = hashlib.sha256()
            for b in self.batches:
                for t in (b.input_ids, b.corrupted_input_ids, b.attention_mask, b.target_mask):
                    h.update(b"-" if t is None else t.detach().cpu().contiguous().numpy().tobytes())
            self._data_fingerprint = h.hexdigest()[:16]
        return self._data_fingerprint

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors for safetensors, JSON-able metadata) of everything a resume needs."""
        tensors = {f"mask.{k}": v.detach().cpu().contiguous() for k, v in self.model.mask_state_dict().items()}
        tensors["lambda.edge"] = self.edge_lambdas.detach().cpu()
        tensors["lambda.node"] = self.node_lambdas.detach().cpu()
        tensors.update({f"rng.{k}": v.cpu() for k, v in self._rng.items()})
        sd = self.optimizer.state_dict()
        for pid, st in sd["state"].items():
            for k, v in st.items():
                tensors[f"optimizer.{pid}.{k}"] = torch.as_tensor(v).detach().cpu().clone().contiguous()
        meta = {"format": CHECKPOINT_FORMAT, "step": self.step, "config": self.config.to_dict(),
                "optimizer": {"param_groups": sd["param_groups"],
                              "state_keys": {str(pid): sorted(st) for pid, st in sd["state"].items()}},
                "scheduler": {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"},
                "data": self.data_position(), "history": self.history}
        return tensors, meta

    def save_checkpoint(self, name: str = "checkpoint") -> Path:
        """Write ``<out_dir>/<name>.safetensors`` atomically (a temporary file flushed to disk,
        then renamed; see the module docstring); returns its path."""
        if self.out_dir is None:
            raise ValueError("out_dir: expected a directory for checkpoints, got None")
        path = self.out_dir / f"{name}.safetensors"
        if self.data_parallel is not None and not self.data_parallel.is_main:
            return path  # every process holds the same state: rank 0 writes it
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tensors, meta = self.state()
        write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata={
            "format": CHECKPOINT_FORMAT, "step": str(self.step), "state": json.dumps(meta)}))
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint` (path with or without the
        suffix; the two-file form of earlier versions, ``<name>.json`` beside it, is read too).
        ValueError when it is missing or unreadable, was made under other trajectory settings
        (targets, steps, warm-ups, learning rates, weight decay, seed) or on other data."""
        tensors, meta, source = read_checkpoint(path)
        saved = meta["config"]
        if diff := [f for f in _TRAJECTORY_FIELDS if saved.get(f) != getattr(self.config, f)]:
            raise ValueError("config: the checkpoint was trained with " +
                             ", ".join(f"{f}={saved.get(f)!r}" for f in diff) + "; this trainer has " +
                             ", ".join(f"{f}={getattr(self.config, f)!r}" for f in diff) +
                             " (resuming exactly needs the same settings)")
        data = meta.get("data")
        if data is not None and (data["n_batches"], data["fingerprint"]) != (len(self.batches), self._fingerprint()):
            raise ValueError(f"batches: the checkpoint {source} was trained on other data ({data['n_batches']} batches, "
                             f"fingerprint {data['fingerprint']}); these are {len(self.batches)} batches, fingerprint "
                             f"{self._fingerprint()} (resuming exactly needs the same batches)")
        self.model.load_mask_state_dict({k[len("mask."):]: v for k, v in tensors.items() if k.startswith("mask.")})
        with torch.no_grad():
            self.edge_lambdas.copy_(tensors["lambda.edge"])
            self.node_lambdas.copy_(tensors["lambda.node"])
        m = meta["optimizer"]
        state = {int(pid): {k: tensors[f"optimizer.{pid}.{k}"] for k in keys} for pid, keys in m["state_keys"].items()}
        self.optimizer.load_state_dict({"state": state, "param_groups": m["param_groups"]})
        # LambdaLR keeps no state for plain functions: one None per group
        self.scheduler.load_state_dict(dict(meta["scheduler"], lr_lambdas=[None] * len(self.optimizer.param_groups)))
        self._rng = {k[len("rng."):]: v for k, v in tensors.items() if k.startswith("rng.")}
        if self._cuda_devices() and "cuda" not in self._rng:
            raise ValueError("path: the checkpoint was written on the CPU and has no CUDA random state; resume "
                             "it on the CPU (or accept a different noise stream by starting a new run)")
        self.step = int(meta["step"])
        self.history = list(meta.get("history", []))


CHECKPOINT_FORMAT = "edgeprune_fast.trainer"


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, str]:
    """(tensors, metadata, the file read) of a trainer checkpoint, ``<name>`` or ``<name>.safetensors``
    (an earlier version's ``<name>.json`` beside it is read when the file has no metadata of its own)."""
    from safetensors import SafetensorError, safe_open

    base = Path(path)
    if base.suffix in (".safetensors", ".json"):
        base = base.with_suffix("")
    st = base.with_name(base.name + ".safetensors")
    if not st.is_file():
        raise ValueError(f"path: expected the checkpoint file {str(st)!r}, which does not exist")
    try:
        with safe_open(str(st), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(st))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"path: {str(st)!r} is not a readable checkpoint ({exc})") from None
    if "state" in header:
        meta = json.loads(header["state"])
    else:
        legacy = base.with_name(base.name + ".json")
        if not legacy.is_file():
            raise ValueError(f"path: {str(st)!r} holds no trainer state (no metadata, no {legacy.name} beside it)")
        meta = json.loads(legacy.read_text())
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"path: {str(st)!r} is not a trainer checkpoint (format {meta.get('format')!r})")
    return tensors, meta, str(st)
