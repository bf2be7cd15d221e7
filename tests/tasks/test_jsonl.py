"""Custom JSONL tasks: the <predict> format, splits, aligned lengths and clear errors."""

import json

import pytest
import torch

from edgeprune_fast.tasks import JsonlTask, load_jsonl

GOOD = [
    {"clean": "When Mary and John went to the store, John gave a drink to<predict> Mary</predict>",
     "corrupted": "When Anna and Paul went to the store, Kate gave a drink to Mary"},
    {"clean": "So Emma is a really great friend, isn't<predict> she</predict> right",
     "corrupted": "So Adam is a really great friend, isn't<predict> he</predict> right"},
    {"clean": "The war lasted from the year 1732 to the year<predict> 1799</predict>",
     "corrupted": "The war lasted from the year 1701 to the year 1799"},
]


def write(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_targets_cover_the_predicted_span(tmp_path, tokenizer):
    task = load_jsonl(write(tmp_path / "good.jsonl", GOOD), tokenizer)
    assert isinstance(task, JsonlTask) and task.name == "good" and task.metric_name == "accuracy"
    batch = task.batches(8)[0]
    assert len(batch) == 3 and batch.attention_mask is not None
    expected_spans = [" Mary", " she", " 1799"]
    for i in range(3):
        n = int(batch.attention_mask[i].sum())
        assert batch.input_ids[i, n:].eq(task.pad_id).all()
        positions = torch.nonzero(batch.target_mask[i]).flatten()
        # the logits at position t predict token t+1: the span is the tokens after the targets
        assert tokenizer.decode(batch.input_ids[i, positions + 1]) == expected_spans[i]
        assert int(batch.labels[i]) == int(batch.input_ids[i, positions[0] + 1])
        text = GOOD[i]["clean"].replace("<predict>", "").replace("</predict>", "")
        assert tokenizer.decode(batch.input_ids[i, :n]) == text
    assert len(torch.nonzero(batch.target_mask[2])) == 2  # " 17" "99": teacher-forced over two tokens
    assert tokenizer.decode(batch.corrupted_input_ids[1, :int(batch.attention_mask[1].sum())]) == \
        "So Adam is a really great friend, isn't he right"
    # no "split" anywhere: every line serves as train and validation (as in the original)
    assert [e.input_ids for e in task.examples("validation")] == [e.input_ids for e in task.examples("train")]


def test_splits_and_counts(tmp_path, tokenizer):
    lines = [dict(GOOD[0], split="train"), dict(GOOD[1], split="validation"), dict(GOOD[2], split="train")]
    task = load_jsonl(write(tmp_path / "s.jsonl", lines), tokenizer)
    assert (len(task.examples("train")), len(task.examples("validation")), len(task.examples("test"))) == (2, 1, 0)
    assert len(load_jsonl(tmp_path / "s.jsonl", tokenizer, n_examples=1).examples("train")) == 1
    with pytest.raises(ValueError, match="n_examples: asked for 3 train examples, .* has 2"):
        load_jsonl(tmp_path / "s.jsonl", tokenizer, n_examples=3)
    with pytest.raises(ValueError, match="'test' of task 's' has no examples"):
        task.batches(2, "test")
    write(tmp_path / "mixed.jsonl", [dict(GOOD[0], split="train"), GOOD[1]])
    with pytest.raises(ValueError, match="mixed.jsonl, line 2: no 'split'"):
        load_jsonl(tmp_path / "mixed.jsonl", tokenizer)


@pytest.mark.parametrize("lines, message", [
    ([], "is empty"),
    (["", "   "], "is empty"),
    ([GOOD[0], "", '{"clean": "a<predict> b</predict>", "corrupted": '], r"line 3: malformed JSON"),
    ([GOOD[0], {"clean": "x<predict> y</predict>"}], r"line 2: missing key 'corrupted'"),
    ([{"clean": "When Mary went home", "corrupted": "When Anna went home"}], r"line 1: expected exactly one <predict>"),
    ([{"clean": "a<predict> b</predict><predict> c</predict>", "corrupted": "a b c"}], "line 1: expected exactly one"),
    ([{"clean": "When<predict></predict>", "corrupted": "When"}], "line 1: the text inside .* is empty"),
    ([GOOD[1], {"clean": "x<predict> y</predict>", "corrupted": "x y", "split": "dev"}], "line 2: 'split' must be"),
    (["[1, 2]"], "line 1: expected a JSON object"),
])
def test_errors_name_the_problem_and_the_line(tmp_path, tokenizer, lines, message):
    with pytest.raises(ValueError, match=message):
        load_jsonl(write(tmp_path / "bad.jsonl", lines), tokenizer)


def test_length_mismatch_names_the_line_and_both_lengths(tmp_path, tokenizer):
    bad = {"clean": "When Mary went<predict> home</predict>", "corrupted": "When Jennifer went home"}
    clean_len = len(tokenizer("When Mary went home")["input_ids"])
    corrupted_len = len(tokenizer("When Jennifer went home")["input_ids"])
    assert clean_len != corrupted_len
    with pytest.raises(ValueError, match=f"bad.jsonl, line 3: .* got {clean_len} tokens \\(clean\\) and "
                                         f"{corrupted_len} tokens \\(corrupted\\)"):
        load_jsonl(write(tmp_path / "bad.jsonl", [GOOD[0], GOOD[1], bad]), tokenizer)


def test_missing_file(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="does not exist"):
        load_jsonl(tmp_path / "nope.jsonl", tokenizer)


def test_accuracy_is_exact_match_over_the_span(tmp_path, tokenizer):
    task = load_jsonl(write(tmp_path / "good.jsonl", GOOD), tokenizer)
    batch = task.batches(3)[0]
    B, S = batch.input_ids.shape
    logits = torch.zeros(B, S, len(tokenizer))
    nxt = torch.cat([batch.input_ids[:, 1:], batch.input_ids[:, :1]], dim=1)
    logits.scatter_(2, nxt[..., None], 5.0)  # every position predicts the next input token
    m = task.metrics(logits, batch)
    assert m["accuracy"].tolist() == [1.0, 1.0, 1.0]
    assert m["label_logit"].tolist() == [5.0, 5.0, 5.0]
    pos = torch.nonzero(batch.target_mask[2]).flatten()
    logits[2, pos[1]] = 0.0
    logits[2, pos[1], 7] = 1.0  # row 2: its second span token is now wrong
    logits[0, 0] = 0.0  # outside the target positions: does not count
    assert task.metric(logits, batch).tolist() == [1.0, 1.0, 0.0]
