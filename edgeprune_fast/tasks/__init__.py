"""Tasks: aligned clean/corrupted batches plus a metric (the trainer is task-agnostic).

``get_task("ioi" | "greater-than" | "gendered-pronouns" | "path/to/data.jsonl", tokenizer,
n_examples=, seed=)`` builds a task; ``task.batches(batch_size, "train" | "validation")``
gives :class:`TaskBatch` es; ``task.loss`` (KL at the target positions) and
``task.metric`` / ``task.metrics`` read model logits. See ``base.py`` for the batch layout
and ``examples.py`` for tokenisation and padding.
"""

from .base import Task, TaskBatch, first_target_logits, kl_loss, pair_logit_diff, target_log_probs, top1_accuracy
from .examples import EncodedExample, Example, ExampleTask, TextEncoder, collate
from .gendered_pronouns import GenderedPronounsTask, make_gendered_pronouns
from .greater_than import GreaterThanTask, make_greater_than
from .ioi import IOITask, make_ioi
from .jsonl import JsonlTask, load_jsonl
from .registry import TASKS, get_task, known_tasks, register_task

__all__ = [
    "TASKS", "EncodedExample", "Example", "ExampleTask", "GenderedPronounsTask", "GreaterThanTask", "IOITask",
    "JsonlTask", "Task", "TaskBatch", "TextEncoder", "collate", "first_target_logits", "get_task", "kl_loss",
    "known_tasks", "load_jsonl", "make_gendered_pronouns", "make_greater_than", "make_ioi", "pair_logit_diff",
    "register_task", "target_log_probs", "top1_accuracy",
]
