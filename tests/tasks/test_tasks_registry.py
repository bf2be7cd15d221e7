"""get_task: names, JSONL paths, options and clear errors."""

import json

import pytest

from edgeprune_fast.tasks import (
    TASKS,
    GenderedPronounsTask,
    GreaterThanTask,
    IOITask,
    JsonlTask,
    Task,
    get_task,
    known_tasks,
    register_task,
)


@pytest.mark.parametrize("name, cls", [("ioi", IOITask), ("greater-than", GreaterThanTask),
                                       ("gendered-pronouns", GenderedPronounsTask), ("Greater_Than", GreaterThanTask)])
def test_names(tokenizer, name, cls):
    task = get_task(name, tokenizer, n_examples=8, seed=1)
    assert isinstance(task, cls)
    assert (len(task.examples("train")), len(task.examples("validation"))) == (8, 2)


def test_default_size_and_options(tokenizer):
    assert len(get_task("ioi", tokenizer).examples("train")) == 256
    task = get_task("gendered-pronouns", tokenizer, n_examples=4, corruption="neutral")
    assert isinstance(task, GenderedPronounsTask)
    with pytest.raises(ValueError, match=r"options: 'ioi' accepts \['data'\], got unknown \['corruption'\]"):
        get_task("ioi", tokenizer, n_examples=4, corruption="neutral")


def test_jsonl_path(tmp_path, tokenizer):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"clean": "When Mary met John, John thanked<predict> Mary</predict>",
                                "corrupted": "When Anna met Paul, Kate thanked Mary"}) + "\n")
    for arg in (path, str(path)):
        task = get_task(arg, tokenizer)
        assert isinstance(task, JsonlTask) and task.name == "mine"
    with pytest.raises(ValueError, match="does not exist"):
        get_task(str(tmp_path / "missing.jsonl"), tokenizer)
    with pytest.raises(ValueError, match="a JSONL task takes none"):
        get_task(path, tokenizer, corruption="neutral")


def test_unknown_name_lists_the_known_ones(tokenizer):
    with pytest.raises(ValueError, match=r"task: expected one of \['ioi', 'greater-than', 'gendered-pronouns'.*"
                                         r"or a path to a .jsonl file, got 'sva'"):
        get_task("sva", tokenizer)


def test_register_task(tokenizer, monkeypatch):
    monkeypatch.setattr("edgeprune_fast.tasks.registry.TASKS", dict(TASKS))

    class Dummy(Task):
        pass

    def make(tokenizer, *, n_examples, n_validation, seed, flavour="plain"):
        t = Dummy()
        t.args = (n_examples, n_validation, seed, flavour)
        return t

    register_task("dummy", make)
    assert "dummy" in known_tasks()
    assert get_task("dummy", tokenizer, n_examples=3, seed=7, flavour="x").args == (3, None, 7, "x")
    with pytest.raises(ValueError, match="expected a new task name"):
        register_task("ioi", make)
