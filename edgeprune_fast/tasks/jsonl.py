"""Custom tasks from JSONL files, in the original Edge Pruning format.

One JSON object per line:

    {"clean": "When Mary and John went out, John thanked<predict> Mary</predict>",
     "corrupted": "When Lisa and Paul went out, Kate thanked Mary",
     "split": "train"}                                  # optional: train / validation / test

The clean text before ``<predict>`` is the prompt, the text inside the tags the target
continuation X, and any text after ``</predict>`` is kept (it does not affect the
predictions of X in a causal model). The model input is the clean text without the tags;
the target positions are those whose next token is a token of X (teacher forcing, as the
original computes the loss over the whole span), and the label is X's first token. A
``<predict>...</predict>`` in the corrupted text is dropped as tags only (its content
stays), so that the corrupted text can align with the clean one token for token. Clean and
corrupted must tokenise to the same length: a line that does not raises a ``ValueError``
naming the line and both lengths.

Splits: when lines carry ``"split"``, each line goes to its split (every line must then
have one); without any ``"split"``, all lines serve as both train and validation, as in the
original. Blank lines are skipped; line numbers in errors count from 1 in the file.

Loss: KL over the full vocabulary at every target position. Metric (``metric``):
accuracy, 1 where every token of X is the arg-max of the logits before it (the original's
exact match; for one-token targets, top-1 accuracy of the label). ``metrics`` adds
``label_logit``, the logit of the label at the first target position.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .base import TaskBatch, first_target_logits
from .examples import EncodedExample, ExampleTask, TextEncoder, check_aligned

OPEN, CLOSE = "<predict>", "</predict>"
SPLITS = ("train", "validation", "test")


class JsonlTask(ExampleTask):
    name = "custom"
    metric_name = "accuracy"

    def metric(self, logits: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
        """1.0 where the arg-max at every target position is the next input token: [B]."""
        hits = logits[:, :-1].argmax(dim=-1) == batch.input_ids[:, 1:]
        return (hits | ~batch.target_mask[:, :-1]).all(dim=1).float()

    def metrics(self, logits: torch.Tensor, batch: TaskBatch) -> dict[str, torch.Tensor]:
        label_logit = first_target_logits(logits, batch).gather(1, batch.labels[:, None]).squeeze(1)
        return {"accuracy": self.metric(logits, batch), "label_logit": label_logit}


def parse_predict(text: str, where: str, required: bool) -> tuple[str, str, str] | None:
    """(prefix, target, suffix) of a text with one <predict>...</predict>; None if it has
    none and ``required`` is False."""
    n_open, n_close = text.count(OPEN), text.count(CLOSE)
    if n_open == n_close == 0 and not required:
        return None
    if n_open != 1 or n_close != 1 or text.index(OPEN) > text.index(CLOSE):
        raise ValueError(f"{where}: expected exactly one {OPEN}...{CLOSE} around the predicted text, got "
                         f"{n_open} {OPEN} and {n_close} {CLOSE}")
    prefix, rest = text.split(OPEN)
    target, suffix = rest.split(CLOSE)
    if not target:
        raise ValueError(f"{where}: the text inside {OPEN}...{CLOSE} is empty")
    return prefix, target, suffix


def read_lines(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; clear errors for anything else."""
    if path.is_dir():
        raise ValueError(f"data: expected a JSONL file, got {str(path)!r}, which is a directory")
    if not path.is_file():
        raise ValueError(f"data: expected a JSONL file, {str(path)!r} does not exist")
    rows = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        where = f"{path}, line {number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{where}: expected UTF-8 text, got the byte 0x{raw[exc.start]:02x} at column "
                             f"{exc.start + 1} (save the file as UTF-8)") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object with 'clean' and 'corrupted', got {type(obj).__name__}")
        for key in ("clean", "corrupted"):
            if key not in obj:
                raise ValueError(f"{where}: missing key {key!r} (expected 'clean', 'corrupted' and optional 'split')")
            if not isinstance(obj[key], str):
                raise ValueError(f"{where}: {key!r} must be a string, got {type(obj[key]).__name__}")
        if "split" in obj and obj["split"] not in SPLITS:
            raise ValueError(f"{where}: 'split' must be one of {SPLITS}, got {obj['split']!r}")
        rows.append((number, obj))
    if not rows:
        raise ValueError(f"data: {str(path)!r} is empty (expected one JSON object per line)")
    return rows


def encode_line(encoder: TextEncoder, obj: dict, where: str) -> EncodedExample:
    prefix, target, suffix = parse_predict(obj["clean"], where, required=True)
    corrupted = parse_predict(obj["corrupted"], where + " (corrupted)", required=False)
    corrupted_text = obj["corrupted"] if corrupted is None else "".join(corrupted)
    prompt, full = encoder.ids(prefix), encoder.ids(prefix + target + suffix)
    upto = encoder.ids(prefix + target)
    if full[:len(prompt)] != prompt or full[:len(upto)] != upto:
        raise ValueError(f"{where}: {OPEN} or {CLOSE} falls inside a token (the tokenizer merges across it)")
    if not prompt:
        raise ValueError(f"{where}: the text before {OPEN} has no tokens (nothing to predict from)")
    if len(upto) == len(prompt):
        raise ValueError(f"{where}: the text inside {OPEN}...{CLOSE} has no tokens")
    corrupted_ids = encoder.ids(corrupted_text)
    check_aligned(where, full, corrupted_ids)
    positions = tuple(range(len(prompt) - 1, len(upto) - 1))
    return EncodedExample(tuple(full), tuple(corrupted_ids), positions, full[len(prompt)], where)


def load_jsonl(path: str | Path, tokenizer, *, n_examples: int | None = None,
               n_validation: int | None = None) -> JsonlTask:
    """A task from a JSONL file. ``n_examples``/``n_validation``: use the first so many
    train/validation examples (None: all); asking for more than the file has is an error."""
    path = Path(path)
    rows = read_lines(path)
    with_split = [n for n, obj in rows if "split" in obj]
    if with_split and len(with_split) != len(rows):
        first = next(n for n, obj in rows if "split" not in obj)
        raise ValueError(f"{path}, line {first}: no 'split', but other lines have one (give every line a split, "
                         "or none)")
    encoder = TextEncoder(tokenizer)
    encoded = [(obj.get("split"), encode_line(encoder, obj, f"{path}, line {n}")) for n, obj in rows]
    if with_split:
        splits = {s: [e for split, e in encoded if split == s] for s in SPLITS}
    else:
        splits = {"train": [e for _, e in encoded], "validation": [e for _, e in encoded]}
    for split, count, arg in (("train", n_examples, "n_examples"), ("validation", n_validation, "n_validation")):
        if count is None:
            continue
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"{arg}: expected a positive integer or None, got {count!r}")
        if count > len(splits[split]):
            raise ValueError(f"{arg}: asked for {count} {split} examples, {path} has {len(splits[split])}")
        splits[split] = splits[split][:count]
    task = JsonlTask(splits, encoder.pad_id)
    task.name = path.stem
    return task
