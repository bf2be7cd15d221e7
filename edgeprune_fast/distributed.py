"""Data-parallel edge pruning over processes with torch.distributed (launched by ``torchrun``).

Every process holds the model and the masks, takes its slice of each global batch
(consecutive rows, B / P each as near as can be, P processes) and, after backward, the
mask and Lagrange multiplier gradients are averaged with one
``torch.distributed.all_reduce`` (weighted by each slice's number of target positions, so
that the result is the gradient of the loss on the whole global batch: the task loss is a
mean over target positions, the sparsity terms are the same on every process). All
processes draw the same hard-concrete noise (the trainer's random stream is seeded
identically), so P processes take the same steps as one process on the global batch, and
every process holds the same masks, optimiser state and random state: a checkpoint is
written once (rank 0) and resumes on any number of processes.

The frozen HF weights are replicated on every process, or sharded with FSDP2 after
``dp.shard_weights(model)`` (``torch.distributed.fsdp.fully_shard`` on every decoder layer
and on the HF model, the root: embeddings, final norm, unembedding; see sharding.py): each
process then keeps 1/P of every parameter and gathers one unit at a time around its work,
in the forward and again in the backward, through FSDP's own ``unshard``/``reshard``, with
or without ``checkpoint_layers``. The weights have no gradients, so the all_reduce above
stays the only gradient traffic. Checkpoints hold no weights (masks, multipliers, optimiser
and random state), so one written by a sharded run resumes sharded or replicated, on any
number of processes. Shard after moving or casting the model (``.to()`` after sharding is
a ValueError); the tracr models cannot be sharded (their adapter has no per-layer builder).

A run as a user writes it (checked with ``torchrun --nproc_per_node 2`` on the CPU, gloo,
a tiny GPT-2 saved with save_pretrained: after 6 steps its masks equal a replicated
2-process run's exactly and a 1-process run's from the same seed to 1.2e-7)::

    # prune.py; run with: torchrun --nproc_per_node 2 prune.py
    from transformers import AutoTokenizer
    from edgeprune_fast.distributed import DataParallel
    from edgeprune_fast.model import EdgePrunedModel
    from edgeprune_fast.tasks.registry import get_task
    from edgeprune_fast.train import TrainConfig, Trainer

    dp = DataParallel.from_env()                     # gloo on CPU, nccl with CUDA
    model = EdgePrunedModel.from_pretrained("my-model", device=dp.device, checkpoint_layers=True)
    dp.shard_weights(model)                          # optional: FSDP2-sharded weights
    task = get_task("ioi", AutoTokenizer.from_pretrained("my-model"), n_examples=64)
    trainer = Trainer(model, task, task.batches(16, "train"), TrainConfig(steps=100),
                      out_dir="run", data_parallel=dp)   # batches: the global batch, split over processes
    trainer.run()                                    # rank 0 writes run/checkpoint.*
    dp.close()
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

import torch
import torch.distributed as dist

from .tasks.base import TaskBatch
from .torchrun import TORCHRUN_VARS


@dataclasses.dataclass
class DataParallel:
    """One process's view of the process group: its rank, the world size and its device."""

    rank: int
    world_size: int
    device: torch.device

    @classmethod
    def from_env(cls, backend: str | None = None) -> DataParallel:
        """Join the process group that ``torchrun`` describes in the environment (RANK,
        WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); backend: nccl with CUDA, else gloo."""
        missing = [v for v in TORCHRUN_VARS if v not in os.environ]
        if missing and not dist.is_initialized():
            raise ValueError(f"environment: expected the torchrun variables {', '.join(TORCHRUN_VARS)}, "
                             f"missing {', '.join(missing)} (launch with torchrun --nproc_per_node N ...)")
        local = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"))
        return cls(dist.get_rank(), dist.get_world_size(), device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        dist.barrier()

    # -- data ------------------------------------------------------------------------------------
    def rows(self, batch_size: int) -> slice:
        """This process's rows of a global batch of ``batch_size``: consecutive slices, as
        equal as can be (the first B % P processes take one row more). Unequal slices are
        exact too: the gradients are weighted by each slice's target positions."""
        if batch_size < self.world_size:
            raise ValueError(f"batch: expected at least one row per process ({self.world_size}), got a global batch "
                             f"of {batch_size}")
        n, extra = divmod(batch_size, self.world_size)
        start = self.rank * n + min(self.rank, extra)
        return slice(start, start + n + (self.rank < extra))

    def shard(self, batch: TaskBatch) -> TaskBatch:
        """This process's slice of a global TaskBatch (per-row tensors sliced; the candidate
        list and other non-row tensors shared)."""
        B = len(batch)
        rows = self.rows(B)

        def cut(t):
            return t[rows] if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == B else t

        return dataclasses.replace(batch, input_ids=cut(batch.input_ids),
                                   corrupted_input_ids=cut(batch.corrupted_input_ids),
                                   attention_mask=cut(batch.attention_mask), target_mask=cut(batch.target_mask),
                                   labels=cut(batch.labels), extras={k: cut(v) for k, v in batch.extras.items()})

    # -- gradients and state ---------------------------------------------------------------------
    @torch.no_grad()
    def all_reduce_gradients(self, params: Iterable[torch.Tensor], weight: float | torch.Tensor = 1.0) -> None:
        """grad <- sum over processes of (weight_p / sum weight) * grad_p, in one all_reduce of
        the flattened gradients. ``weight``: this process's share of the loss's mean (its number
        of target positions); equal weights give the plain average."""
        params = [p for p in params if p.grad is not None]
        if not params:
            return
        dev = params[0].grad.device
        w = torch.as_tensor(weight, dtype=torch.float64, device=dev).reshape(1)
        total = w.clone()
        dist.all_reduce(total)
        if not float(total) > 0:
            raise ValueError(f"weight: expected positive weights summing over processes, got a total of {float(total)}")
        flat = torch.cat([p.grad.reshape(-1).to(torch.float64) for p in params]) * (w / total)
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n

    def any_process(self, flag: bool) -> bool:
        """True on every process if ``flag`` is True on any (one small all_reduce): lets all
        processes take the same branch, e.g. stop together on a non-finite loss instead of
        leaving the others waiting in the next collective."""
        t = torch.tensor([int(bool(flag))], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def weighted_mean(self, value: float, weight: float | torch.Tensor) -> float:
        """sum_p weight_p * value_p / sum_p weight_p over the processes (one small all_reduce):
        the global batch's mean from each process's mean over its share (``weight``: its
        number of target positions, as in ``all_reduce_gradients``)."""
        t = torch.tensor([float(value) * float(weight), float(weight)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t[0] / t[1])

    def shard_weights(self, model):
        """Shard ``model``'s frozen HF weights over the processes with FSDP2 (an EdgePrunedModel
        already on ``self.device``; see :meth:`EdgePrunedModel.shard_weights` and sharding.py);
        returns the model. Collective: every process calls it."""
        from torch.distributed.device_mesh import init_device_mesh

        if model.adapter.device != self.device:
            raise ValueError(f"model: expected it on this process's device {self.device} before sharding "
                             f"(model.to(dp.device)), got {model.adapter.device}")
        return model.shard_weights(init_device_mesh(self.device.type, (self.world_size,)))

    @torch.no_grad()
    def broadcast_parameters(self, params: Iterable[torch.Tensor]) -> None:
        """Make every process start from rank 0's values (e.g. the masks after their random init)."""
        for p in params:
            dist.broadcast(p.data, src=0)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
