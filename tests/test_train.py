"""The trainer on a tiny random GPT-2 with hand-made TaskBatches: learning, exact resume,
non-finite losses, evaluation hook, progress bar, config and argument validation."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from edgeprune_fast.model import EdgePrunedModel
from edgeprune_fast.tasks.base import Task, TaskBatch, kl_loss
from edgeprune_fast.train import (
    NonFiniteLoss,
    TrainConfig,
    Trainer,
    TrainingInterrupted,
    lagrangian,
    linear_schedule,
    read_checkpoint,
    target_at,
)
from tests.models._tiny import VOCAB, tiny_model

B, S = 4, 7


pytestmark = pytest.mark.usefixtures("one_thread")


class KLTask(Task):
    name = "kl"

    def metric(self, logits, batch):
        return logits[batch.target_mask].argmax(-1).float()


class NaNAtStep(KLTask):
    """KL, except that the loss becomes NaN on call number ``at`` (1-based)."""

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0

    def loss(self, circuit_logits, full_logits, batch):
        self.calls += 1
        kl = kl_loss(circuit_logits, full_logits, batch)
        return kl * float("nan") if self.calls == self.at else kl


def make_batches(n: int = 2, seed: int = 1) -> list[TaskBatch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (B, S), generator=g)
        corrupted = torch.randint(3, VOCAB, (B, S), generator=g)
        target = torch.zeros(B, S, dtype=torch.bool)
        target[:, -1] = True
        target[0, 2] = True
        out.append(TaskBatch(input_ids=ids, corrupted_input_ids=corrupted, attention_mask=None, target_mask=target))
    return out


def make_model(init: float = 10.0, node_masks: bool = True, seed: int = 0) -> EdgePrunedModel:
    torch.manual_seed(seed)  # the mask initialisation draws from the default generator
    return EdgePrunedModel.from_hf(tiny_model("gpt2"), node_masks=node_masks, init=init, init_std=0.5)


def masks(model: EdgePrunedModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.mask_state_dict().items()}


def cfg(**kw) -> TrainConfig:
    steps = kw.get("steps", 12)  # warm-ups of 8 and 3 steps, or the whole run when it is shorter
    base = dict(target_edge_sparsity=0.5, target_node_sparsity=0.2, steps=12, sparsity_warmup=min(8, steps),
                lr_warmup=min(3, steps), lr_edge=0.1, lr_node=0.1, lr_lambda=0.1, progress=False)
    return TrainConfig(**{**base, **kw})


# ---- learning ------------------------------------------------------------------------------
def test_kl_decreases_without_sparsity_pressure():
    """Masks started near 0.5 (log_alpha ~ 0) lose KL as training restores the full model."""
    model = make_model(init=0.0)
    hist = Trainer(model, KLTask(), make_batches(), cfg(target_edge_sparsity=0.0, target_node_sparsity=None,
                                                         steps=60, lr_warmup=5, lr_edge=0.2, lr_node=0.2)).run()
    first = sum(r["kl"] for r in hist[:6]) / 6
    last = sum(r["kl"] for r in hist[-6:]) / 6
    assert last < 0.3 * first, (first, last)
    assert hist[-1]["edge_sparsity"] < hist[0]["edge_sparsity"]


def test_sparsity_follows_the_warmed_up_target():
    model = make_model()
    t = Trainer(model, KLTask(), make_batches(), cfg(target_edge_sparsity=0.6, target_node_sparsity=None, steps=150,
                                                     sparsity_warmup=100, lr_warmup=10, lr_edge=0.3, lr_lambda=0.5))
    hist = t.run()
    assert [r["step"] for r in hist] == list(range(1, 151))
    assert hist[50]["target_edge"] == pytest.approx(0.3) and hist[-1]["target_edge"] == 0.6
    assert hist[0]["edge_sparsity"] < 0.05  # log_alpha ~ 10: everything kept
    assert hist[-1]["edge_sparsity"] == pytest.approx(0.6, abs=0.08)
    assert hist[-1]["lambda_edge"][0] != 0 and hist[-1]["lambda_edge"][1] > 0  # ascent moved the lambdas
    assert hist[-1]["lr"] < hist[20]["lr"]  # linear decay after the warm-up


def test_schedule_helpers():
    assert [target_at(s, 0.9, 10) for s in (0, 5, 10, 20)] == [0.0, 0.45, 0.9, 0.9]
    assert target_at(3, 0.9, 0) == 0.9
    assert [linear_schedule(s, 4, 12) for s in (0, 2, 4, 8, 12, 13)] == [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    lam = torch.tensor([2.0, 3.0])
    assert float(lagrangian(lam, 0.5, torch.tensor(0.3))) == pytest.approx(2 * 0.2 + 3 * 0.04)


# ---- resume -----------------------------------------------------------------------------------
@pytest.mark.parametrize("ablation", ["corrupted", "zero"])
def test_resume_is_exact(tmp_path, ablation):
    """N steps straight == k steps, checkpoint, a new model + Trainer loading it, N - k steps."""
    N, k = 12, 5
    straight = make_model()
    straight.ablation = ablation
    Trainer(straight, KLTask(), make_batches(3), cfg(steps=N)).run()

    first = make_model()
    first.ablation = ablation
    t1 = Trainer(first, KLTask(), make_batches(3), cfg(steps=N), out_dir=tmp_path)
    for _ in range(k):
        t1.train_step()
    t1.save_checkpoint()
    torch.rand(100)  # foreign draws between the runs change nothing

    second = make_model(seed=123)  # other initial masks: all of them come from the checkpoint
    second.ablation = ablation
    t2 = Trainer(second, KLTask(), make_batches(3), cfg(steps=N), out_dir=tmp_path)
    t2.load_checkpoint(tmp_path / "checkpoint")
    assert t2.step == k and len(t2.history) == 0  # history is saved by run(), not by train_step
    t2.run()
    want, got = masks(straight), masks(second)
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=0, msg=key)
    assert t2.step == N


def test_run_checkpoints_and_history_resume(tmp_path):
    model = make_model()
    t = Trainer(model, KLTask(), make_batches(), cfg(steps=6, checkpoint_every=4), out_dir=tmp_path)
    t.run()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.safetensors"]  # one file, no temporaries
    _, meta, _ = read_checkpoint(tmp_path / "checkpoint")
    assert meta["step"] == 6 and len(meta["history"]) == 6 and meta["config"]["steps"] == 6
    assert meta["data"]["n_batches"] == 2 and meta["data"]["epoch"] == 3 and meta["data"]["next_in_epoch"] == 0
    assert (tmp_path / "checkpoint.safetensors").stat().st_mode & 0o777 == 0o666 & ~_umask()
    t2 = Trainer(make_model(), KLTask(), make_batches(), cfg(steps=6), out_dir=tmp_path)
    t2.load_checkpoint(tmp_path / "checkpoint.safetensors")
    assert t2.history == t.history and t2.run() == t.history  # nothing left to do
    for key, v in masks(model).items():
        assert torch.equal(masks(t2.model)[key], v)


def test_resume_refuses_other_settings_and_missing_files(tmp_path):
    t = Trainer(make_model(), KLTask(), make_batches(), cfg(steps=3), out_dir=tmp_path)
    t.run()
    other = Trainer(make_model(), KLTask(), make_batches(), cfg(steps=3, lr_edge=0.5))
    with pytest.raises(ValueError, match=r"config: the checkpoint was trained with lr_edge=0.1; this trainer has "
                                         r"lr_edge=0.5"):
        other.load_checkpoint(tmp_path / "checkpoint")
    with pytest.raises(ValueError, match="path: expected the checkpoint file .*nope.safetensors"):
        other.load_checkpoint(tmp_path / "nope")
    with pytest.raises(ValueError, match="out_dir: expected a directory"):
        other.save_checkpoint()
    elsewhere = Trainer(make_model(), KLTask(), make_batches(seed=9), cfg(steps=3))
    with pytest.raises(ValueError, match="batches: the checkpoint .* was trained on other data"):
        elsewhere.load_checkpoint(tmp_path / "checkpoint")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{trunc")
    with pytest.raises(ValueError, match="is not a readable checkpoint"):
        other.load_checkpoint(tmp_path / "broken")


def test_a_stop_request_checkpoints_between_steps(tmp_path):
    """should_stop is asked after every step; the run checkpoints and raises, and a resume
    from there ends where the straight run ends."""
    straight = make_model()
    Trainer(straight, KLTask(), make_batches(), cfg(steps=7)).run()
    asked = []
    t = Trainer(make_model(), KLTask(), make_batches(), cfg(steps=7, checkpoint_every=5), out_dir=tmp_path)
    with pytest.raises(TrainingInterrupted, match="stopped after step 3; checkpoint in .*checkpoint.safetensors"):
        t.run(should_stop=lambda: asked.append(t.step) or t.step == 3)
    assert asked == [1, 2, 3] and read_checkpoint(tmp_path / "checkpoint")[1]["step"] == 3
    resumed = Trainer(make_model(seed=4), KLTask(), make_batches(), cfg(steps=7), out_dir=tmp_path)
    resumed.load_checkpoint(tmp_path / "checkpoint")
    resumed.run()
    for key, v in masks(straight).items():
        torch.testing.assert_close(masks(resumed.model)[key], v, atol=1e-6, rtol=0)


# ---- non-finite loss ----------------------------------------------------------------------------
def test_non_finite_loss_stops_with_the_last_good_state(tmp_path):
    good = make_model()
    t_good = Trainer(good, KLTask(), make_batches(), cfg())
    for _ in range(3):
        t_good.train_step()

    model = make_model()
    t = Trainer(model, NaNAtStep(4), make_batches(), cfg(), out_dir=tmp_path)
    with pytest.raises(NonFiniteLoss, match=r"step 4: the loss is nan .*stopped before applying it; the last good "
                                            r"state \(after 3 steps\) is saved in .*last_good.safetensors"):
        t.run()
    assert t.step == 3
    for key, v in masks(good).items():  # the bad step changed nothing
        assert torch.equal(masks(model)[key], v), key
    assert read_checkpoint(tmp_path / "last_good")[1]["step"] == 3

    # the saved state resumes like the uninterrupted run
    resumed = Trainer(make_model(seed=5), KLTask(), make_batches(), cfg(), out_dir=tmp_path)
    resumed.load_checkpoint(tmp_path / "last_good")
    resumed.train_step()
    t_good.train_step()
    for key, v in masks(good).items():
        assert torch.equal(masks(resumed.model)[key], v), key


def test_non_finite_loss_without_out_dir():
    t = Trainer(make_model(), NaNAtStep(2), make_batches(), cfg())
    with pytest.raises(NonFiniteLoss, match="step 2: the loss is nan.*no out_dir: nothing saved"):
        t.run()


def test_non_finite_gradient_is_not_applied():
    model = make_model()
    t = Trainer(model, KLTask(), make_batches(), cfg())
    before = masks(model)
    loss, _ = t.forward_loss(*t.references(0))
    loss.backward()
    model.edge_log_alpha_parameters()[0].grad[0, 0] = float("inf")
    with pytest.raises(NonFiniteLoss, match="non-finite gradients in group 0 param 0"):
        t.optimizer_step()
    for key, v in before.items():
        assert torch.equal(masks(model)[key], v)


# ---- evaluation hook and progress bar ------------------------------------------------------------
def test_evaluation_hook_is_periodic_and_changes_nothing():
    plain = make_model()
    Trainer(plain, KLTask(), make_batches(), cfg(steps=8)).run()
    calls = []

    def evaluate(model):
        calls.append(model.training)
        torch.rand(10)  # the hook's own randomness does not reach the trainer's stream
        return {"n": float(len(calls))}

    hooked = make_model()
    hist = Trainer(hooked, KLTask(), make_batches(), cfg(steps=8, eval_every=3), evaluate=evaluate).run()
    assert calls == [False, False, False]  # steps 3, 6 and the end (8), in eval mode
    assert [r["step"] for r in hist if "eval" in r] == [3, 6, 8] and hist[-1]["eval"] == {"n": 3.0}
    assert hooked.training
    for key, v in masks(plain).items():
        assert torch.equal(masks(hooked)[key], v)


def test_progress_bar_never_shows_minus_zero():
    from edgeprune_fast.train import _fixed

    assert (_fixed(-1e-9), _fixed(0.0), _fixed(-0.00051), _fixed(0.12345)) == ("0.0000", "0.0000", "-0.0005", "0.1235")


def test_progress_bar_shows_the_numbers(capsys):
    Trainer(make_model(), KLTask(), make_batches(), cfg(steps=4, progress=True)).run()
    err = capsys.readouterr().err
    for part in ("pruning", "4/4", "step/s", "kl=", "edges=", "nodes=", "lam_e=", "lam_n="):
        assert part in err, (part, err)


# ---- validation --------------------------------------------------------------------------------
@pytest.mark.parametrize(("field", "value", "expected"), [
    ("target_edge_sparsity", 2.0, r"in \[0, 2\)"),
    ("target_edge_sparsity", -0.1, r"in \[0, 2\)"),
    ("target_edge_sparsity", math.nan, r"in \[0, 2\)"),
    ("target_node_sparsity", "0.5", r"in \[0, 2\)"),
    ("steps", 0, "integer >= 1"),
    ("steps", 10.0, "integer >= 1"),
    ("sparsity_warmup", -1, "integer >= 0"),
    ("seed", True, "integer >= 0"),
    ("lr_edge", 0.0, "finite number > 0"),
    ("lr_lambda", math.inf, "finite number > 0"),
    ("weight_decay", -0.1, "finite number >= 0"),
    ("progress", 1, "True or False"),
])
def test_config_validation(field, value, expected):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}: expected .*{expected}.*got"):
        TrainConfig(**{field: value})


def test_config_round_trip_and_unknown_fields():
    c = TrainConfig(steps=5, target_node_sparsity=0.3)
    assert TrainConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ValueError, match=r"TrainConfig: unknown fields \['stepz'\]"):
        TrainConfig.from_dict({"stepz": 3})
    d = TrainConfig()
    assert (d.lr_edge, d.lr_node, d.lr_lambda, d.steps, d.sparsity_warmup, d.lr_warmup) == (0.8, 0.8, 0.8, 3000, 2500, 200)


def test_warmups_scale_to_the_run_or_are_refused():
    short = TrainConfig(steps=30)  # the original's 2500 and 200 of 3000 steps, scaled
    assert (short.sparsity_warmup, short.lr_warmup) == (25, 2)
    assert TrainConfig(steps=30, sparsity_warmup=30, lr_warmup=0).sparsity_warmup == 30
    with pytest.raises(ValueError, match=r"TrainConfig.sparsity_warmup: expected at most steps=30 .*got 2500"):
        TrainConfig(steps=30, sparsity_warmup=2500)
    with pytest.raises(ValueError, match=r"TrainConfig.lr_warmup: expected at most steps=30 .*got 200"):
        TrainConfig(steps=30, lr_warmup=200)


def test_trainer_argument_errors():
    model = make_model()
    with pytest.raises(ValueError, match="batches: expected at least one TaskBatch"):
        Trainer(model, KLTask(), [], cfg())
    with pytest.raises(ValueError, match="batches: expected TaskBatch items, item 1 is dict"):
        Trainer(model, KLTask(), [make_batches(1)[0], {}], cfg())
    with pytest.raises(ValueError, match="task: expected an object with loss"):
        Trainer(model, object(), make_batches(), cfg())
    with pytest.raises(ValueError, match="config: expected a TrainConfig"):
        Trainer(model, KLTask(), make_batches(), {"steps": 3})
    with pytest.raises(ValueError, match="target_node_sparsity: the model has no node masks"):
        Trainer(make_model(node_masks=False), KLTask(), make_batches(), cfg())
    no_corrupt = TaskBatch(input_ids=make_batches(1)[0].input_ids, corrupted_input_ids=None, attention_mask=None,
                           target_mask=make_batches(1)[0].target_mask)
    with pytest.raises(ValueError, match=r"batches\[0\].corrupted_input_ids: required under .*ablation='corrupted'"):
        Trainer(model, KLTask(), [no_corrupt], cfg()).train_step()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
