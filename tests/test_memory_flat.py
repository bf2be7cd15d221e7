"""Memory stays flat over a run: every training step frees its WriterStore and its slot
buffers. (Autograd's nodes live in C++, out of sight of Python's cycle collector, so a
reference from a node's ctx back to the store that holds the token chain would keep every
step's [W, B, S, D] buffers alive for good; writers.Slots is what the graph holds instead.)

Counted over 30 training steps for every architecture, with and without per-layer
checkpointing, and on 2 data-parallel processes (gloo) with replicated and sharded weights."""

from __future__ import annotations

import os
import weakref

import pytest
import torch
import torch.multiprocessing as mp

from edgeprune_fast import writers
from edgeprune_fast.model import EdgePrunedModel
from edgeprune_fast.tracr import TRACR_DATA_DIR, load_tracr
from edgeprune_fast.train import TrainConfig, Trainer
from tests.models._tiny import ARCHS, tiny_model
from tests.test_distributed import _free_port, batches, join_gloo
from tests.test_train import KLTask, make_batches

STEPS = 30

pytestmark = pytest.mark.usefixtures("one_thread")


class Census:
    """Weak references to every store and slot buffer the model creates."""

    def __init__(self, monkeypatch) -> None:
        self.stores: list[weakref.ref] = []
        self.buffers: list[weakref.ref] = []
        census = self

        class Counted(writers.WriterStore):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                census.stores.append(weakref.ref(self))
                census.buffers.append(weakref.ref(self.buffer))

        monkeypatch.setattr(EdgePrunedModel, "store_cls", Counted)

    def alive(self) -> tuple[int, int]:
        """Live stores and buffers, freed by reference counting alone (no gc.collect: a cycle
        that only the collector could break would already be a leak between collections)."""
        return sum(r() is not None for r in self.stores), sum(r() is not None for r in self.buffers)


def _live_counts_over_steps(trainer: Trainer, census: Census, steps: int = STEPS) -> list[tuple[int, int]]:
    counts = []
    for _ in range(steps):
        trainer.train_step()
        counts.append(census.alive())
    return counts


def _tracr_batches(model):
    from edgeprune_fast.tasks.base import TaskBatch

    ids = model.encode([[1, 2, 3], [3, 2, 1], [2, 1, 3], [1, 3, 2]])
    target = torch.ones(ids.shape, dtype=torch.bool)
    target[:, 0] = False
    return [TaskBatch(ids, ids.flip(0), None, target)]


@pytest.mark.parametrize("checkpoint_layers", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("arch", [*ARCHS, "tracr"])
def test_no_store_outlives_its_step(arch, checkpoint_layers, monkeypatch):
    census = Census(monkeypatch)
    if arch == "tracr":
        hf = load_tracr(TRACR_DATA_DIR, "reverse")
        model = EdgePrunedModel.from_hf(hf, ablation="zero", checkpoint_layers=checkpoint_layers)
        data = _tracr_batches(hf)
    else:
        model = EdgePrunedModel.from_hf(tiny_model(arch), init=1.0, init_std=0.5, checkpoint_layers=checkpoint_layers)
        data = make_batches()
    trainer = Trainer(model, KLTask(), data, TrainConfig(steps=STEPS, sparsity_warmup=10, lr_warmup=2,
                                                         progress=False))
    counts = _live_counts_over_steps(trainer, census)
    assert len(census.stores) == STEPS  # one store per forward...
    assert set(counts) == {(0, 0)}  # ...and none alive once its step is done


def _dp_worker(rank: int, world: int, port: int, shard: bool, out: str) -> None:
    dp = join_gloo(rank, world, port)
    try:
        mp_patch = pytest.MonkeyPatch()
        census = Census(mp_patch)
        model = EdgePrunedModel.from_hf(tiny_model("llama"), init=1.0, init_std=0.5)
        if shard:
            dp.shard_weights(model)
        trainer = Trainer(model, KLTask(), batches(), TrainConfig(steps=STEPS, sparsity_warmup=10, lr_warmup=2,
                                                                  progress=False), data_parallel=dp)
        counts = _live_counts_over_steps(trainer, census)
        mp_patch.undo()
        with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
            f.write(repr((len(census.stores), sorted(set(counts)))))
    finally:
        dp.close()


@pytest.mark.parametrize("shard", [False, True], ids=["replicated", "sharded"])
def test_no_store_outlives_its_step_under_data_parallel(shard, tmp_path):
    mp.spawn(_dp_worker, args=(2, _free_port(), shard, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        n_stores, counts = eval((tmp_path / f"rank{rank}.txt").read_text())
        assert n_stores == STEPS and counts == [(0, 0)]
