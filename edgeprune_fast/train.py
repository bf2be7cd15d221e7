"""The one trainer: Edge Pruning's masked KL objective with a Lagrangian sparsity constraint.

    loss = KL(p_full || p_circuit) at the task's target positions             (task.loss)
         + l1_e * (t_e - s_e) + l2_e * (t_e - s_e)^2                           edges
         + l1_n * (t_n - s_n) + l2_n * (t_n - s_n)^2                           nodes (optional)

s is the circuit's current sparsity (1 - expected kept / total, differentiable in
log_alpha), t the target, warmed up linearly from 0 over ``sparsity_warmup`` steps.
log_alpha minimises the loss; the lambdas maximise it (gradient ascent: AdamW with
maximize=True). Defaults follow the original recipe (AdamW, learning rates 0.8, 3000
steps, sparsity warm-up 2500, learning-rate warm-up 200).

The full model's logits and the corrupted writer states come from the model's plain
reference forward (no grad) and are cached per batch of a fixed data set. Checkpoints
(masks, lambdas, optimiser, scheduler, RNG, step) are safetensors + JSON; a resumed run
ends with the same masks as an uninterrupted one with the same seed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm


@dataclass(frozen=True)
class TrainConfig:
    target_edge_sparsity: float = 0.98
    target_node_sparsity: float | None = None  # None: no node constraint
    steps: int = 3000
    sparsity_warmup: int = 2500
    lr_warmup: int = 200
    lr_edge: float = 0.8
    lr_node: float = 0.8
    lr_lambda: float = 0.8
    seed: int = 0
    eval_every: int = 0  # 0: evaluate only at the end
    checkpoint_every: int = 0  # 0: only at the end (and on a non-finite loss)
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("target_edge_sparsity", "target_node_sparsity"):
            v = getattr(self, name)
            if v is not None and not (0.0 <= v < 2.0 and math.isfinite(v)):
                raise ValueError(f"TrainConfig.{name}: expected a number in [0, 2), got {v!r}")
        for name in ("steps",):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name}: expected an integer >= 1, got {getattr(self, name)!r}")
        for name in ("sparsity_warmup", "lr_warmup", "eval_every", "checkpoint_every", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name}: expected an integer >= 0, got {getattr(self, name)!r}")
        for name in ("lr_edge", "lr_node", "lr_lambda"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"TrainConfig.{name}: expected a finite number > 0, got {v!r}")


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; the last good state was checkpointed."""


def target_at(step: int, target: float, warmup: int) -> float:
    """Linear warm-up of the target sparsity from 0 to ``target`` over ``warmup`` steps."""
    return target if warmup == 0 else target * min(1.0, step / warmup)


def lagrangian(lambdas: torch.Tensor, target: float, sparsity: torch.Tensor) -> torch.Tensor:
    """l1 * (t - s) + l2 * (t - s)^2 (ARCHITECTURE.md §2)."""
    gap = target - sparsity
    return lambdas[0] * gap + lambdas[1] * gap * gap


class Trainer:
    """Trains the masks of an edge-pruned model on a fixed list of task batches.

    ``model``: an EdgePrunedModel (reference(), forward, mask parameters, mask state dict).
    ``batches``: a sequence of task batches (input_ids, corrupted_input_ids, attention_mask,
    and whatever ``loss_fn`` reads). ``loss_fn(circuit_logits, full_logits, batch)`` gives
    the task's divergence (KL at the target positions by default in each task).
    """

    def __init__(self, model, batches: Sequence, loss_fn: Callable, config: TrainConfig,
                 out_dir: str | Path | None = None, evaluate: Callable | None = None):
        if len(batches) == 0:
            raise ValueError("batches: expected at least one training batch, got none")
        self.model, self.batches, self.loss_fn, self.config = model, batches, loss_fn, config
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.evaluate = evaluate
        self.step = 0
        self.history: list[dict] = []
        self._cache: dict[int, tuple] = {}
        torch.manual_seed(config.seed)
        device = next(iter(model.edge_log_alpha_parameters())).device
        self.edge_lambdas = torch.zeros(2, device=device, requires_grad=True)
        self.node_lambdas = torch.zeros(2, device=device, requires_grad=True)
        # One AdamW with a group per kind, lambdas maximised (gradient ascent), as the original
        groups = [{"params": list(model.edge_log_alpha_parameters()), "lr": config.lr_edge}]
        node_params = list(model.node_log_alpha_parameters())
        if node_params:
            groups.append({"params": node_params, "lr": config.lr_node})
        groups.append({"params": [self.edge_lambdas], "lr": config.lr_lambda, "maximize": True})
        if config.target_node_sparsity is not None:
            groups.append({"params": [self.node_lambdas], "lr": config.lr_lambda, "maximize": True})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)

    def lr_factor(self, step: int) -> float:
        """Linear warm-up, then linear decay to 0 at the last step (the original's schedule)."""
        c = self.config
        if step < c.lr_warmup:
            return (step + 1) / c.lr_warmup
        return max(0.0, (c.steps - step) / max(1, c.steps - c.lr_warmup))

    # -- data ---------------------------------------------------------------------------
    def batch_index(self, step: int) -> int:
        """Deterministic shuffled order, one permutation per epoch, reproducible on resume."""
        n = len(self.batches)
        epoch, i = divmod(step, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed * 100_003 + epoch))
        return int(order[i])

    def reference(self, index: int):
        """(full logits, corrupted writer states) of batch ``index``, computed once."""
        if index not in self._cache:
            b = self.batches[index]
            full_logits, _ = self.model.reference(b.input_ids, b.attention_mask)
            corrupted = None
            if b.corrupted_input_ids is not None and self.model.ablation == "corrupted":
                _, corrupted = self.model.reference(b.corrupted_input_ids, b.attention_mask)
            self._cache[index] = (full_logits, corrupted)
        return self._cache[index]

    # -- one step -----------------------------------------------------------------------
    def train_step(self) -> dict:
        c = self.config
        index = self.batch_index(self.step)
        batch = self.batches[index]
        full_logits, corrupted = self.reference(index)
        out = self.model(batch.input_ids, attention_mask=batch.attention_mask,
                         corrupted_writers=corrupted, training=True)
        kl = self.loss_fn(out.logits, full_logits, batch)
        t_edge = target_at(self.step, c.target_edge_sparsity, c.sparsity_warmup)
        loss = kl + lagrangian(self.edge_lambdas, t_edge, out.edge_sparsity)
        row = {"step": self.step, "kl": float(kl), "edge_sparsity": float(out.edge_sparsity), "target": t_edge}
        if c.target_node_sparsity is not None:
            t_node = target_at(self.step, c.target_node_sparsity, c.sparsity_warmup)
            loss = loss + lagrangian(self.node_lambdas, t_node, out.node_sparsity)
            row["node_sparsity"] = float(out.node_sparsity)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"step {self.step}: loss is {float(loss)} (kl {float(kl)})")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        row.update(loss=float(loss), lambda_edge=self.edge_lambdas.detach().tolist())
        return row

    def run(self) -> list[dict]:
        """Train until ``config.steps``; returns the per-step history."""
        c = self.config
        bar = tqdm(total=c.steps, initial=self.step, disable=not c.progress, desc="pruning", dynamic_ncols=True)
        t0, done0 = time.perf_counter(), self.step
        try:
            while self.step < c.steps:
                try:
                    row = self.train_step()
                except NonFiniteLoss as exc:
                    where = self.save_checkpoint("last_good") if self.out_dir else None
                    raise NonFiniteLoss(f"{exc}; stopped, last good state (step {self.step}) "
                                        f"saved to {where}" if where else f"{exc}; stopped") from None
                self.history.append(row)
                rate = (self.step - done0) / max(time.perf_counter() - t0, 1e-9)
                post = {"kl": f"{row['kl']:.4f}", "edges": f"{row['edge_sparsity']:.3f}",
                        "tgt": f"{row['target']:.3f}", "l1": f"{row['lambda_edge'][0]:.2f}", "it/s": f"{rate:.1f}"}
                if "node_sparsity" in row:
                    post["nodes"] = f"{row['node_sparsity']:.3f}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
                if c.eval_every and self.evaluate and self.step % c.eval_every == 0:
                    self.history[-1]["eval"] = self.evaluate(self.model)
                    bar.write(f"step {self.step}: {self.history[-1]['eval']}")
                if c.checkpoint_every and self.out_dir and self.step % c.checkpoint_every == 0:
                    self.save_checkpoint()
        finally:
            bar.close()
        if self.out_dir:
            self.save_checkpoint()
        return self.history

    # -- checkpoints --------------------------------------------------------------------
    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"mask.{k}": v.detach().cpu().contiguous() for k, v in self.model.mask_state_dict().items()}
        tensors["lambda.edge"] = self.edge_lambdas.detach().cpu()
        tensors["lambda.node"] = self.node_lambdas.detach().cpu()
        tensors["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        meta: dict = {"step": self.step, "config": dataclasses.asdict(self.config)}
        sd = self.optimizer.state_dict()
        for pid, st in sd["state"].items():
            for k, v in st.items():
                tensors[f"optimizer.{pid}.{k}"] = torch.as_tensor(v).detach().cpu().clone()
        meta["optimizer"] = {"param_groups": sd["param_groups"],
                             "state_keys": {str(pid): sorted(st) for pid, st in sd["state"].items()}}
        meta["scheduler"] = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
        return tensors, meta

    def save_checkpoint(self, name: str = "checkpoint") -> Path:
        """Write <out_dir>/<name>.safetensors and <name>.json atomically (temp file, rename)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tensors, meta = self.state_tensors()
        st, js = self.out_dir / f"{name}.safetensors", self.out_dir / f"{name}.json"
        save_file(tensors, str(st) + ".tmp")
        js.with_suffix(".json.tmp").write_text(json.dumps(meta, indent=1))
        Path(str(st) + ".tmp").replace(st)
        js.with_suffix(".json.tmp").replace(js)
        return st

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore a checkpoint written by save_checkpoint (path without or with suffix)."""
        base = Path(path)
        base = base.with_suffix("") if base.suffix in (".safetensors", ".json") else base
        st, js = base.with_suffix(".safetensors"), base.with_suffix(".json")
        for p in (st, js):
            if not p.is_file():
                raise ValueError(f"checkpoint: expected {p} to exist, it does not")
        tensors, meta = load_file(str(st)), json.loads(js.read_text())
        self.model.load_mask_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("mask.")})
        with torch.no_grad():
            self.edge_lambdas.copy_(tensors["lambda.edge"])
            self.node_lambdas.copy_(tensors["lambda.node"])
        m = meta["optimizer"]
        state = {int(pid): {k: tensors[f"optimizer.{pid}.{k}"] for k in keys} for pid, keys in m["state_keys"].items()}
        self.optimizer.load_state_dict({"state": state, "param_groups": m["param_groups"]})
        self.scheduler.load_state_dict(dict(meta["scheduler"], lr_lambdas=[None]))
        torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
        self.step = int(meta["step"])
