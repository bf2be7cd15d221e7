"""Aligned clean/corrupted batches from text: the helper every text task shares.

A task describes each example as text (:class:`Example`: clean prompt, corrupted prompt,
target continuation, per-example extras); :class:`TextEncoder` tokenises it with any HF
tokenizer into an :class:`EncodedExample` (token ids, the positions the prediction is read
at, the label id, extras); :func:`collate` pads a list of them into a
:class:`~edgeprune_fast.tasks.base.TaskBatch`; :class:`ExampleTask` serves the batches of
each split and leaves only ``metric`` to the task.

Tokenisation: ``tokenizer(text, add_special_tokens=False)`` preceded by the special tokens
the tokenizer puts in front of every text (Llama's BOS; nothing for GPT-2). Tokens it would
append (an EOS) are left out on purpose: the prompt must end where the prediction is read.
A continuation (" Mary") is tokenised in context: the ids of prompt + continuation that
follow the prompt's own ids, so SentencePiece and byte-level BPE agree on the leading space.
Clean and corrupted prompts must tokenise to the same length; one that does not raises a
``ValueError`` naming the example and both lengths (never a silent crop).

Padding: on the right, with ``attention_mask`` 1 on real tokens (``None`` when a batch needs
no padding) and the pad id ``pad_token_id``, else ``eos_token_id``, else 0 (pads are masked,
any id works). Right, because the edge-pruned model, like the HF forward of GPT-2, Llama,
GPT-NeoX and Qwen2 given only an attention mask, numbers positions ``0..S-1`` in every row:
right padding leaves every real token at its own position, and causal attention keeps real
tokens from seeing the pads. Each row's target positions follow its own length.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .base import Task, TaskBatch, pair_logit_diff, top1_accuracy

Extra = int | float | tuple[int, ...] | tuple[float, ...]


@dataclass(frozen=True)
class Example:
    """One example as text.

    ``clean``/``corrupted``: the prompts; the prediction is read at their last token.
    ``target``: the continuation whose first token is the label (" Mary"), or None.
    ``where``: how errors name the example ("ioi example 12 (template 3)").
    ``token_extras``: name -> a continuation of the clean prompt, stored as its first token
    id (IOI's subject: {"s_id": " John"}). ``extras``: name -> a number or a tuple, stored
    as is. Every example of a task has the same extras keys (they are stacked to [B, ...])."""

    clean: str
    corrupted: str
    target: str | None
    where: str
    token_extras: Mapping[str, str] = field(default_factory=dict)
    extras: Mapping[str, Extra] = field(default_factory=dict)


@dataclass(frozen=True)
class EncodedExample:
    """One tokenised example: ``input_ids`` and ``corrupted_input_ids`` of equal length,
    ``target_positions`` (the positions whose logits are read, in increasing order),
    ``label`` (the correct next token at the first target position, or None), extras."""

    input_ids: tuple[int, ...]
    corrupted_input_ids: tuple[int, ...]
    target_positions: tuple[int, ...]
    label: int | None
    where: str
    extras: Mapping[str, Extra] = field(default_factory=dict)


def check_aligned(where: str, clean: Sequence[int], corrupted: Sequence[int]) -> None:
    """Clean and corrupted must have the same number of tokens (positions are compared)."""
    if len(clean) != len(corrupted):
        raise ValueError(f"{where}: clean and corrupted prompts must tokenise to the same length, got "
                         f"{len(clean)} tokens (clean) and {len(corrupted)} tokens (corrupted)")


class TextEncoder:
    """Tokenises text the same way for every task (see the module docstring)."""

    def __init__(self, tokenizer):
        from transformers import PreTrainedTokenizerBase  # import here: keeps `import edgeprune_fast` light

        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise ValueError(f"tokenizer: expected a Hugging Face tokenizer (PreTrainedTokenizerBase), "
                             f"got {type(tokenizer).__name__}")
        self.tokenizer = tokenizer
        probe = "a"  # the special tokens put in front of any text: full ids minus plain ids
        full, plain = self.tokenizer(probe)["input_ids"], self._plain(probe)
        self.prefix: tuple[int, ...] = ()
        for k in range(len(full) - len(plain) + 1):
            if full[k:k + len(plain)] == plain:
                self.prefix = tuple(full[:k])
                break
        self.pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)

    def _plain(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def ids(self, text: str) -> list[int]:
        """Token ids of a prompt: the tokenizer's leading special tokens, then the text's."""
        return [*self.prefix, *self._plain(text)]

    def continuation(self, prompt: str, text: str, where: str) -> list[int]:
        """Ids of ``text`` as it continues ``prompt`` (tokenised in context)."""
        head, full = self._plain(prompt), self._plain(prompt + text)
        if full[:len(head)] != head:
            raise ValueError(f"{where}: {text!r} does not start on a token boundary after the prompt "
                             f"{prompt[-40:]!r} (the tokenizer merges across them)")
        if len(full) == len(head):
            raise ValueError(f"{where}: the continuation {text!r} has no tokens")
        return full[len(head):]

    def is_single_token(self, text: str, context: str) -> bool:
        """Whether ``text`` is one known (not unknown-token) token when it follows ``context``."""
        try:
            ids = self.continuation(context, text, "probe")
        except ValueError:
            return False
        unk = self.tokenizer.unk_token_id
        return len(ids) == 1 and (unk is None or ids[0] != unk)

    def encode(self, example: Example) -> EncodedExample:
        """Tokenise a prompt-only example: the target position is the last prompt token."""
        clean, corrupted = self.ids(example.clean), self.ids(example.corrupted)
        check_aligned(example.where, clean, corrupted)
        if not clean:
            raise ValueError(f"{example.where}: the prompt has no tokens")
        label = None if example.target is None else \
            self.continuation(example.clean, example.target, example.where)[0]
        extras = dict(example.extras)
        for name, text in example.token_extras.items():
            extras[name] = self.continuation(example.clean, text, example.where)[0]
        return EncodedExample(tuple(clean), tuple(corrupted), (len(clean) - 1,), label, example.where, extras)


def collate(examples: Sequence[EncodedExample], pad_id: int, candidates: torch.Tensor | None = None) -> TaskBatch:
    """Right-pad encoded examples into one batch (see the module docstring)."""
    if not examples:
        raise ValueError("examples: expected at least one example to collate, got none")
    B, S = len(examples), max(len(e.input_ids) for e in examples)
    ids = torch.full((B, S), pad_id, dtype=torch.long)
    corrupted = torch.full((B, S), pad_id, dtype=torch.long)
    mask = torch.zeros(B, S, dtype=torch.long)
    target = torch.zeros(B, S, dtype=torch.bool)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        corrupted[i, :n] = torch.tensor(e.corrupted_input_ids)
        mask[i, :n] = 1
        target[i, list(e.target_positions)] = True
    labels = None
    if all(e.label is not None for e in examples):
        labels = torch.tensor([e.label for e in examples], dtype=torch.long)
    keys = set(examples[0].extras)
    if any(set(e.extras) != keys for e in examples):
        raise ValueError("examples: every example of a batch must have the same extras keys")
    extras = {k: torch.tensor([e.extras[k] for e in examples]) for k in sorted(keys)}
    extras = {k: v.float() if v.is_floating_point() else v.long() for k, v in extras.items()}
    return TaskBatch(input_ids=ids, corrupted_input_ids=corrupted,
                     attention_mask=None if bool(mask.all()) else mask, target_mask=target,
                     candidates=candidates, labels=labels, extras=extras)


def distinct_examples(make: Callable[[random.Random, int], Example], count: int, seed: int,
                      what: str) -> list[Example]:
    """``count`` examples with distinct clean prompts, drawn by ``make(rng, index)`` from
    ``random.Random(seed)`` (deterministic). Raises if the templates cannot give that many."""
    rng, seen, out = random.Random(seed), set(), []
    attempts = 0
    while len(out) < count:
        attempts += 1
        if attempts > 50 * count + 1000:
            raise ValueError(f"n_examples: asked for {count} distinct {what} examples, found only {len(out)} "
                             f"after {attempts - 1} draws (the templates and word lists are too small)")
        ex = make(rng, len(out))
        if ex.clean not in seen:
            seen.add(ex.clean)
            out.append(ex)
    return out


def split_sizes(n_examples: int, n_validation: int | None) -> tuple[int, int]:
    """(train, validation) sizes; validation defaults to max(1, n_examples // 4)."""
    if isinstance(n_examples, bool) or not isinstance(n_examples, int) or n_examples < 1:
        raise ValueError(f"n_examples: expected a positive integer (training examples), got {n_examples!r}")
    if n_validation is None:
        n_validation = max(1, n_examples // 4)
    if isinstance(n_validation, bool) or not isinstance(n_validation, int) or n_validation < 0:
        raise ValueError(f"n_validation: expected a non-negative integer, got {n_validation!r}")
    return n_examples, n_validation


class ExampleTask(Task):
    """A task over fixed encoded examples per split; subclasses implement ``metric``.

    ``splits``: split name -> encoded examples (in order). ``batches(batch_size, split)``
    cuts them in order (the last batch may be smaller); every call returns equal batches."""

    def __init__(self, splits: Mapping[str, Sequence[EncodedExample]], pad_id: int,
                 candidates: torch.Tensor | None = None):
        if not any(splits.values()):
            raise ValueError(f"{self.name}: no examples in any split")
        self.splits = {name: list(exs) for name, exs in splits.items()}
        self.pad_id = pad_id
        self.candidates = candidates

    @property
    def split_names(self) -> list[str]:
        return list(self.splits)

    def examples(self, split: str = "train") -> list[EncodedExample]:
        if split not in self.splits:
            raise ValueError(f"split: expected one of {self.split_names}, got {split!r}")
        return self.splits[split]

    def batches(self, batch_size: int, split: str = "train") -> list[TaskBatch]:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        exs = self.examples(split)
        if not exs:
            raise ValueError(f"split: {split!r} of task {self.name!r} has no examples")
        return [collate(exs[i:i + batch_size], self.pad_id, self.candidates) for i in range(0, len(exs), batch_size)]


class LogitDiffTask(ExampleTask):
    """An ExampleTask scored by logit(label) - logit(extras[contrast_key]) at the target
    position (IOI: the subject; gendered pronouns: the other pronoun), with top-1 accuracy."""

    metric_name = "logit_diff"
    contrast_key: str

    def metric(self, logits: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
        return pair_logit_diff(logits, batch, self.contrast_key)

    def metrics(self, logits: torch.Tensor, batch: TaskBatch) -> dict[str, torch.Tensor]:
        return {"logit_diff": self.metric(logits, batch), "accuracy": top1_accuracy(logits, batch)}


TASK_DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "tasks"


def load_task_data(data: Mapping | str | Path | None, default: str, required: Sequence[str]) -> dict:
    """A task's templates and word lists: a mapping, a JSON file, or (None) the packaged
    ``data/tasks/<default>``; every key in ``required`` must be present."""
    if data is None:
        data = TASK_DATA_DIR / default
    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.is_file():
            raise ValueError(f"data: expected a JSON file of templates and word lists, {str(path)!r} does not exist")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"data: {str(path)!r} is not valid JSON ({exc})") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"data: expected a mapping of templates and word lists, got {type(data).__name__}")
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"data: missing keys {missing} (expected {list(required)})")
    return dict(data)
