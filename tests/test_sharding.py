"""FSDP2-sharded weights (sharding.py) over 2 processes (gloo, torch.multiprocessing) on the
tiny Llama of test_distributed.py: each process holds half of every unit's parameters, at
most one unit is gathered at a time, and after N steps the masks equal one process's on the
same global batches, with and without checkpoint_layers; rank 0's checkpoint resumes in one
(unsharded) process."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from edgeprune_fast.distributed import DataParallel
from edgeprune_fast.model import EdgePrunedModel
from edgeprune_fast.sharding import shard_weights
from edgeprune_fast.tracr import TRACR_DATA_DIR, load_tracr
from tests.models._tiny import tiny_model
from tests.test_distributed import STEPS, _free_port, assert_resumes_like_a_straight_run, join_gloo, trainer

MODES = ("plain", "checkpointed")


def _watch(units) -> dict:
    """Wrap every unit's unshard: record the most units gathered at once, and each unit's
    local share of its parameters when layer 1 is gathered for the first time in training."""
    seen = {"peak": 0, "during": None}
    all_units = [*units.layers, units.root]
    for i, unit in enumerate(all_units):
        def unshard(*args, _orig=unit.unshard, _i=i, **kw):
            out = _orig(*args, **kw)
            seen["peak"] = max(seen["peak"], sum(f > 0.9 for f in units.local_fraction()))
            if _i == 1 and seen["during"] is None and torch.is_grad_enabled():
                seen["during"] = units.local_fraction()
            return out
        unit.unshard = unshard
    return seen


def _worker(rank: int, world: int, port: int, out_dir: str, steps: int) -> None:
    dp = join_gloo(rank, world, port)
    try:
        for mode in MODES:
            d = os.path.join(out_dir, mode)
            t = trainer(dp, d)
            t.model.gradient_checkpointing(mode == "checkpointed")
            dp.shard_weights(t.model)
            report = {"setup": t.model.sharding.local_fraction()}
            seen = _watch(t.model.sharding)
            for _ in range(steps):
                t.train_step()
            report.update(after=t.model.sharding.local_fraction(), during=seen["during"], peak=seen["peak"])
            t.save_checkpoint()
            os.makedirs(d, exist_ok=True)  # rank 0's checkpoint makes it, maybe after the other rank gets here
            save_file({k: v.contiguous() for k, v in t.model.mask_state_dict().items()},
                      os.path.join(d, f"rank{rank}.safetensors"))
            with open(os.path.join(d, f"rank{rank}.json"), "w") as f:
                json.dump(report, f)
        # a first pass that enters below the HF model (the states-only capture runs its base model):
        # FSDP's root is still the HF model, so each layer is freed after its forward
        fresh = dp.shard_weights(trainer(None).model)
        fresh.reference(torch.randint(3, 20, (2, 5)), logits=False)
        assert fresh.sharding.local_fraction() == pytest.approx([0.5] * 4, abs=0.01)
        fresh.reference(torch.randint(3, 20, (2, 5)), states=False)  # and the full forward still works
        # misuse, on a sharded model
        with pytest.raises(ValueError, match="already wrapped by fully_shard"):
            t.model.shard_weights()
        with pytest.raises(ValueError, match="before sharding"):
            t.model.to(torch.float64)
        with pytest.raises(ValueError, match="not wrapped by fully_shard"):
            EdgePrunedModel.from_hf(t.model.hf)
    finally:
        dp.close()


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(2, _free_port(), str(out), STEPS - 1), nprocs=2, join=True)
    return out


@pytest.fixture(scope="module")
def single_run():
    torch.set_num_threads(1)
    single = trainer(None)
    for _ in range(STEPS - 1):
        single.train_step()
    return single.model.mask_state_dict()


@pytest.mark.parametrize("mode", MODES)
def test_weights_are_sharded_one_unit_gathered_at_a_time(sharded_run, mode):
    for r in range(2):
        report = json.loads((sharded_run / mode / f"rank{r}.json").read_text())
        for key in ("setup", "after"):  # 3 layers and the root, each about half on each process
            assert report[key] == pytest.approx([0.5] * 4, abs=0.01), (r, key, report[key])
        assert report["during"] == pytest.approx([0.5, 1.0, 0.5, 0.5], abs=0.01)  # layer 1 alone gathered
        assert report["peak"] == 1


@pytest.mark.parametrize("mode", MODES)
def test_sharded_processes_equal_one_process_on_the_global_batch(sharded_run, single_run, mode):
    ranks = [load_file(str(sharded_run / mode / f"rank{r}.safetensors")) for r in range(2)]
    initial = trainer(None).model.mask_state_dict()
    for k, v in single_run.items():
        torch.testing.assert_close(ranks[1][k], ranks[0][k], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0][k], v, rtol=1e-5, atol=1e-6)
    assert max(float((v - initial[k]).abs().max()) for k, v in single_run.items()) > 1e-3  # the masks did train


def test_sharded_checkpoint_resumes_in_one_process(sharded_run):
    torch.set_num_threads(1)
    assert_resumes_like_a_straight_run(sharded_run / "checkpointed" / "checkpoint")


def test_unsupported_sharding_is_refused():
    pruned = EdgePrunedModel.from_hf(load_tracr(TRACR_DATA_DIR, "reverse"), ablation="zero")
    with pytest.raises(NotImplementedError, match="TracrTransformer.*cannot be sharded"):
        shard_weights(pruned.adapter)
    with pytest.raises(ValueError, match="initialised process group"):
        EdgePrunedModel.from_hf(tiny_model("llama")).shard_weights()
    with pytest.raises(ValueError, match="this process's device meta"):
        DataParallel(0, 2, torch.device("meta")).shard_weights(EdgePrunedModel.from_hf(tiny_model("llama")))
