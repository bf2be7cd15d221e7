"""``get_task``: a task by name ("ioi", "greater-than", "gendered-pronouns"), a JSONL path, or a
local copy of a MIB data set (mib/tasks.py: rows in MIB's schema, found by their columns).

Every generated task is built as ``factory(tokenizer, n_examples=, n_validation=, seed=,
**options)`` and returns a :class:`~edgeprune_fast.tasks.base.Task` with "train" and
"validation" splits; other modules add tasks with :func:`register_task`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

from .base import Task
from .gendered_pronouns import make_gendered_pronouns
from .greater_than import make_greater_than
from .ioi import make_ioi
from .jsonl import load_jsonl

TASKS: dict[str, Callable[..., Task]] = {
    "ioi": make_ioi,
    "greater-than": make_greater_than,
    "gendered-pronouns": make_gendered_pronouns,
}
DEFAULT_EXAMPLES = 256


def register_task(name: str, factory: Callable[..., Task]) -> None:
    """Make ``get_task(name, ...)`` call ``factory(tokenizer, n_examples=, n_validation=, seed=, **options)``."""
    if not name or name in TASKS:
        raise ValueError(f"name: expected a new task name, got {name!r} (known: {sorted(TASKS)})")
    TASKS[name] = factory


def known_tasks() -> list[str]:
    return list(TASKS)


def get_task(name_or_path: str | Path, tokenizer, *, n_examples: int | None = None, n_validation: int | None = None,
             seed: int = 0, **options) -> Task:
    """The task ``name_or_path``: a registered name, or a path to a ``.jsonl`` file.

    ``n_examples``: training examples (generated tasks: default 256; JSONL: default all);
    ``n_validation``: validation examples (generated: default ``max(1, n_examples // 4)``;
    JSONL: default all). ``seed`` fixes the generated examples. ``options`` go to the task's
    factory (e.g. ``corruption="neutral"`` for gendered-pronouns, ``kl_over_years=True``
    for greater-than, ``data=`` a JSON file of templates and word lists)."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if isinstance(name_or_path, Path) or text.endswith(".jsonl") or (text not in TASKS and path.exists()):
        if options:
            raise ValueError(f"options: a JSONL task takes none, got {sorted(options)}")
        from ..mib.tasks import is_mib_data, load_mib_task

        if is_mib_data(path):  # a local copy of a MIB data set (rows in its schema), MIB's tokenisation
            task = load_mib_task(path, tokenizer)
            for split, count in (("train", n_examples), ("validation", n_validation)):
                if count is not None:
                    task.splits[split] = task.splits.get(split, [])[:count]
            return task
        return load_jsonl(path, tokenizer, n_examples=n_examples, n_validation=n_validation)
    key = text.strip().lower().replace("_", "-")
    if key not in TASKS:
        raise ValueError(f"task: expected one of {known_tasks()} or a path to a .jsonl file, got {text!r}")
    factory = TASKS[key]
    accepted = [p for p in inspect.signature(factory).parameters if p not in ("tokenizer", "n_examples",
                                                                            "n_validation", "seed")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"options: {key!r} accepts {accepted}, got unknown {unknown}")
    return factory(tokenizer, n_examples=DEFAULT_EXAMPLES if n_examples is None else n_examples,
                   n_validation=n_validation, seed=seed, **options)
