"""Tracr through the edge-pruning machinery: the ground-truth circuit in EdgePrunedModel,
the TracrTask (batches, loss, metric), reading the circuit from the masks, and recovery of
the known circuit by the one Trainer (tests/test_tracr.py covers the loader and the slow
per-edge reference)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from edgeprune_fast.model import EdgePrunedModel
from edgeprune_fast.tasks.tracr import (
    LENGTH3_SETS,
    TRACR_DEFAULTS,
    TracrTask,
    keep_threshold,
    kept_edges,
    prune_tracr,
    roc_auc,
)
from edgeprune_fast.tracr import TRACR_DATA_DIR, load_ground_truth

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def task():
    return TracrTask.load(TRACR_DATA_DIR / "reverse", sets=LENGTH3_SETS)


@pytest.fixture(scope="module")
def gt():
    return load_ground_truth(TRACR_DATA_DIR, "reverse")


def _outputs(pruned: EdgePrunedModel, batch) -> torch.Tensor:
    with torch.no_grad():
        return pruned(batch.input_ids).logits.argmax(-1)[:, 1:]


@pytest.mark.parametrize("split", [False, True], ids=["embeds", "split_embeds"])
def test_ground_truth_circuit_in_the_pruned_model(task, gt, split):
    """Masks fixed to the ground truth (zero ablation) reproduce every output; removing any
    one of its edges changes some output, on each length-3 set."""
    pruned = EdgePrunedModel.from_hf(task.model, ablation="zero", split_embeds=split)
    edges = gt.edges_split_embeds if split else gt.edges
    for s in task.sets:
        batch = TracrTask(task.model, {s.name: s}).batches()[0]
        pruned.set_circuit(edges)
        assert torch.equal(_outputs(pruned, batch), batch.extras["expected_ids"][:, 1:]), s.name
        assert float(task.metric(pruned(batch.input_ids).logits, batch).mean()) == 1.0
        for edge in edges:
            pruned.set_circuit([e for e in edges if e != edge])
            assert not torch.equal(_outputs(pruned, batch), batch.extras["expected_ids"][:, 1:]), (s.name, edge)


def test_batches_loss_and_metric(task):
    batches = task.batches()
    assert len(batches) == 1 and tuple(batches[0].input_ids.shape) == (27 + 6, 4)  # both length-3 sets
    b = batches[0]
    assert b.target_mask[:, 0].logical_not().all() and b.target_mask[:, 1:].all()
    assert b.corrupted_input_ids.shape == b.input_ids.shape and b.attention_mask is None
    assert [len(x) for x in task.batches(10)] == [10, 10, 10, 3]
    pruned = EdgePrunedModel.from_hf(task.model, ablation="zero")
    full, _ = pruned.reference(b.input_ids)
    assert float(task.loss(full, full, b)) == pytest.approx(0.0, abs=1e-7)
    assert task.metric(full, b).tolist() == [1.0] * len(b)
    pruned.set_circuit([])  # the empty circuit: output = 0 everywhere, softmax uniform
    with torch.no_grad():
        empty = pruned(b.input_ids).logits
    p_full = torch.softmax(full[:, 1:], -1)  # [B, 3 positions, 3 outputs]
    kl_uniform = (p_full * (p_full.log() + torch.log(torch.tensor(3.0)))).sum(-1)  # KL(p_full || uniform)
    torch.testing.assert_close(task.loss(empty, full, b), kl_uniform.sum(-1).mean())  # summed over positions
    shifted = full.clone()
    shifted[:, 0] += 5.0  # the BOS position is not part of the loss
    assert float(task.loss(shifted, full, b)) == pytest.approx(0.0, abs=1e-7)
    assert float(task.metric(empty, b).mean()) < 0.5
    with pytest.raises(ValueError, match="batch_size: expected an integer >= 1 or None, got 0"):
        task.batches(0)


def test_task_argument_errors(task):
    examples = {s.name: s for s in task.sets}
    with pytest.raises(ValueError, match=r"sets: \['nope'\] not in the example file"):
        TracrTask(task.model, examples, ["nope"])
    with pytest.raises(ValueError, match="model: expected a TracrTransformer"):
        TracrTask(torch.nn.Linear(2, 2), examples)


def test_numerical_output_task(tmp_path, task):
    """A one-dimensional numerical output: squared-error loss, metric within the tolerance."""
    for suffix in ("config.json", "safetensors", "examples.json"):
        shutil.copy(TRACR_DATA_DIR / f"reverse.{suffix}", tmp_path / f"reverse.{suffix}")
    arrays = load_file(tmp_path / "reverse.safetensors")
    arrays["unembed.W_U"] = arrays["unembed.W_U"][:, 1:2].contiguous()  # "is the output token 2?"
    save_file(arrays, tmp_path / "reverse.safetensors")
    cfg = json.loads((tmp_path / "reverse.config.json").read_text())
    cfg["architecture"]["d_out"] = 1
    cfg["arrays"]["unembed.W_U"]["shape"] = [41, 1]
    cfg["output_decoding"] = {"kind": "numerical", "output_dims": [1]}
    (tmp_path / "reverse.config.json").write_text(json.dumps(cfg))
    ex = json.loads((tmp_path / "reverse.examples.json").read_text())
    for s in ex["sets"]:
        for e in s["examples"]:
            e["expected_output"] = ["BOS", *(float(t == 2) for t in e["expected_output"][1:])]
            for k in ("expected_output_ids", "expected_output_dims_values", "corrupted_expected_output_ids"):
                e.pop(k, None)
    (tmp_path / "reverse.examples.json").write_text(json.dumps(ex))

    num = TracrTask.load(tmp_path / "reverse", sets=LENGTH3_SETS)
    assert num.numerical
    b = num.batches()[0]
    pruned = EdgePrunedModel.from_hf(num.model, ablation="zero")
    full, _ = pruned.reference(b.input_ids)
    assert num.metric(full, b).tolist() == [1.0] * len(b)
    shifted = full + 0.5
    assert float(num.loss(shifted, full, b)) == pytest.approx(0.25 * 3)  # summed over the 3 positions
    assert num.metric(shifted, b).tolist() == [0.0] * len(b)


def test_kept_edges_rule(task, gt):
    """kept_edges: deterministic mask > 0, i.e. log_alpha > log(-l/r); with node masks an
    edge also needs its writer node; the AUC ranks by the same score."""
    pruned = EdgePrunedModel.from_hf(task.model, ablation="zero", node_masks=True)
    thr = keep_threshold(pruned)
    assert thr == pytest.approx(-2.3979, abs=1e-4)
    truth = set(gt.edges)
    with torch.no_grad():
        for g, la in zip(pruned.graph.groups, pruned.masks.edge_log_alpha):
            for r, reader in enumerate(g.readers):
                for w in range(g.n_upstream):
                    keep = (pruned.graph.writer_names()[w], reader) in truth
                    la[r, w] = thr + (0.01 if keep else -0.01)
        pruned.masks.node_log_alpha.fill_(5.0)
    assert set(kept_edges(pruned)) == truth and roc_auc(pruned, gt.edges) == 1.0
    with torch.no_grad():
        pruned.masks.node_log_alpha[pruned.graph.slot("m0")] = thr - 0.01  # node m0 off: its edges go
    assert set(kept_edges(pruned)) == {e for e in truth if e[0] != "m0"}


# ---- recovery by the trainer ------------------------------------------------------------------------
def test_short_recovery_keeps_the_ground_truth(tmp_path, gt):
    """CI's shorter variant of `python bench/tracr_recovery.py` (the full default run, which
    recovers exactly the ground truth: bench/results/tracr_recovery.json). After a third of
    the default steps (warm-ups scaled along), everything else from TRACR_DEFAULTS, the
    circuit read from the masks holds every ground-truth edge, at most 2 others (the last
    unneeded edges fall in the full run's final third), computes the task, and the
    log_alphas rank the ground truth almost perfectly (AUC >= 0.99; the full run gives 1)."""
    steps = TRACR_DEFAULTS.steps // 3
    r = prune_tracr(steps=steps, out_dir=tmp_path, progress=False)
    assert r.steps == steps and len(r.history) == steps and r.settings.sparsity_warmup == round(TRACR_DEFAULTS.sparsity_warmup / 3)
    assert set(gt.edges) <= set(r.edges) and len(r.edges) <= len(gt.edges) + 2, r.summary()
    assert r.accuracy == 1.0 and r.auc >= 0.99, r.summary()
    assert r.history[-1]["edge_sparsity"] > 0.8  # the pressure did prune: 77 -> ~11 edges
    assert (tmp_path / "masks.safetensors").is_file() and (tmp_path / "checkpoint.safetensors").is_file()


def test_prune_tracr_argument_errors():
    with pytest.raises(ValueError, match="steps: expected an integer >= 1 or None, got 0"):
        prune_tracr(steps=0)
    with pytest.raises(ValueError, match="path: expected a directory"):
        prune_tracr(TRACR_DATA_DIR / "nope")
    with pytest.raises(ValueError, match="sets: "):
        prune_tracr(settings=replace(TRACR_DEFAULTS, sets=("nope",)))
