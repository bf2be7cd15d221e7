"""Gendered pronouns: aligned name swaps, the pronoun label, the logit-difference metric."""

import json

import pytest
import torch

from edgeprune_fast.tasks import GenderedPronounsTask, make_gendered_pronouns
from edgeprune_fast.tasks.examples import TASK_DATA_DIR

DATA = json.loads((TASK_DATA_DIR / "gendered_pronouns.json").read_text())
GENDER_OF = {n: g for g in ("male", "female", "neutral") for n in DATA["names"][g]}


def swapped_names(task, tokenizer, split="train"):
    """Per example: (clean name, corrupted name, label text, other text)."""
    out = []
    for batch in task.batches(16, split):
        assert batch.input_ids.shape == batch.corrupted_input_ids.shape
        for i in range(len(batch)):
            n = int(batch.attention_mask[i].sum()) if batch.attention_mask is not None else batch.input_ids.shape[1]
            clean, corrupted = batch.input_ids[i, :n].tolist(), batch.corrupted_input_ids[i, :n].tolist()
            assert torch.nonzero(batch.target_mask[i]).flatten().tolist() == [n - 1]
            assert tokenizer.decode(clean).endswith(", isn't")
            diff = [k for k in range(n) if clean[k] != corrupted[k]]
            assert len(diff) == 1
            out.append((tokenizer.decode([clean[diff[0]]]).strip(), tokenizer.decode([corrupted[diff[0]]]).strip(),
                        tokenizer.decode([batch.labels[i]]), tokenizer.decode([batch.extras["other_id"][i]])))
    return out


def test_opposite_gender_corruption_and_pronoun_labels(tokenizer):
    task = make_gendered_pronouns(tokenizer, n_examples=40, n_validation=8, seed=2)
    assert isinstance(task, GenderedPronounsTask) and task.metric_name == "logit_diff"
    rows = swapped_names(task, tokenizer) + swapped_names(task, tokenizer, "validation")
    assert len(rows) == 48
    for name, swap, label, other in rows:
        gender = GENDER_OF[name]
        assert label == DATA["pronouns"][gender] and other != label and other in (" he", " she")
        assert GENDER_OF[swap] == ("female" if gender == "male" else "male")
    assert {GENDER_OF[r[0]] for r in rows} == {"male", "female"}
    assert not any(r[0] in ("Jennifer", "Victoria") or r[1] in ("Jennifer", "Victoria") for r in rows)


def test_neutral_corruption(tokenizer):
    task = make_gendered_pronouns(tokenizer, n_examples=20, seed=2, corruption="neutral")
    assert {GENDER_OF[swap] for _, swap, _, _ in swapped_names(task, tokenizer)} == {"neutral"}
    with pytest.raises(ValueError, match="corruption: expected one of"):
        make_gendered_pronouns(tokenizer, n_examples=4, corruption="random")


def test_deterministic_in_seed(tokenizer):
    a = make_gendered_pronouns(tokenizer, n_examples=16, seed=9)
    b = make_gendered_pronouns(tokenizer, n_examples=16, seed=9)
    c = make_gendered_pronouns(tokenizer, n_examples=16, seed=10)
    assert [e.corrupted_input_ids for e in a.examples()] == [e.corrupted_input_ids for e in b.examples()]
    assert [e.input_ids for e in a.examples()] != [e.input_ids for e in c.examples()]


def test_too_many_examples_for_the_templates_is_an_error(tokenizer):
    data = dict(DATA, templates=DATA["templates"][:1])  # 1 template x ~58 names: fewer distinct prompts
    with pytest.raises(ValueError, match="n_examples: asked for 200 distinct gendered-pronouns examples"):
        make_gendered_pronouns(tokenizer, n_examples=150, n_validation=50, data=data)


def test_metric_on_hand_made_logits(tokenizer):
    task = make_gendered_pronouns(tokenizer, n_examples=4, seed=0)
    batch = task.batches(4)[0]
    B, S = batch.input_ids.shape
    logits = torch.zeros(B, S, len(tokenizer))
    pos = batch.target_mask.int().argmax(1)
    for i in range(B):
        logits[i, pos[i], batch.labels[i]] = 0.5 * i
        logits[i, pos[i], batch.extras["other_id"][i]] = 1.0
    m = task.metrics(logits, batch)
    assert m["logit_diff"].tolist() == [0.5 * i - 1.0 for i in range(B)]
    assert m["accuracy"].tolist() == [0.0, 0.0, 0.0, 1.0]
