"""Indirect object identification (IOI; Wang et al. 2022), generated from packaged templates.

    clean      "When Mary and John went to the store, John gave a drink to"   -> " Mary"
    corrupted  "When Lisa and Paul went to the store, Kate gave a drink to"

The clean prompt names the indirect object (IO, " Mary") once and the subject (S,
" John") twice; the model should predict the IO. The corrupted prompt is the ABC variant
the Edge Pruning paper uses: the three name slots hold three different names, none of
them the clean IO or S, and the rest of the sentence is unchanged. Both orders of the
first clause are generated ("Mary and John", ABBA, and "John and Mary", BABA).

Per example: ``labels`` = the IO token, ``extras["s_id"]`` = the S token (each the first
token of " Name" after the prompt). The target is the last prompt position.
Metric: logit difference logit(IO) - logit(S) (``metric``); ``metrics`` adds top-1
accuracy (the IO is the arg-max over the vocabulary).

Names must be single tokens of the given tokenizer (after a space, in context): the list is
filtered, and at least five must remain (two clean names + three corrupted ones).
Templates and word lists: ``edgeprune_fast/data/tasks/ioi.json``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path

from .examples import (
    Example,
    LogitDiffTask,
    TextEncoder,
    distinct_examples,
    load_task_data,
    split_sizes,
)

FIELDS = ("IO", "S1", "S2", "PLACE", "OBJECT")
MIN_NAMES = 5


class IOITask(LogitDiffTask):
    """Metric: logit(IO) - logit(S) at the target position, per example; also top-1 accuracy."""

    name = "ioi"
    contrast_key = "s_id"


def single_token_names(encoder: TextEncoder, names: list[str], context: str = "When") -> list[str]:
    """The names that are one token when they follow ``context`` and a space (" Mary")."""
    return [n for n in names if encoder.is_single_token(" " + n, context)]


def _check_templates(templates: list[str]) -> None:
    if not templates:
        raise ValueError("data['templates']: expected at least one IOI template, got none")
    for i, t in enumerate(templates):
        if "{IO} and {S1}" not in t or "{S2}" not in t:
            raise ValueError(f"data['templates'][{i}]: expected '{{IO}} and {{S1}}' and '{{S2}}' in {t!r}")
        try:
            t.format(**dict.fromkeys(FIELDS, "x"))
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"data['templates'][{i}]: fields must be among {FIELDS}, {t!r} has {exc}") from None


def make_ioi(tokenizer, *, n_examples: int = 256, n_validation: int | None = None, seed: int = 0,
             data: Mapping | str | Path | None = None) -> IOITask:
    """IOI with ``n_examples`` training and ``n_validation`` validation examples (default
    ``max(1, n_examples // 4)``), all with distinct clean prompts, deterministic in ``seed``."""
    n_train, n_val = split_sizes(n_examples, n_validation)
    d = load_task_data(data, "ioi.json", ("templates", "names", "places", "objects"))
    templates = list(d["templates"])
    _check_templates(templates)
    encoder = TextEncoder(tokenizer)
    names = single_token_names(encoder, list(dict.fromkeys(d["names"])))
    if len(names) < MIN_NAMES:
        raise ValueError(f"tokenizer: only {len(names)} of the {len(d['names'])} IOI names are single tokens of "
                         f"this tokenizer ({names}); at least {MIN_NAMES} are needed")

    def make(rng: random.Random, index: int) -> Example:
        t = rng.randrange(len(templates))
        baba = rng.random() < 0.5
        template = templates[t].replace("{IO} and {S1}", "{S1} and {IO}") if baba else templates[t]
        io, s = rng.sample(names, 2)
        a, b, c = rng.sample([n for n in names if n not in (io, s)], 3)
        place, obj = rng.choice(d["places"]), rng.choice(d["objects"])
        return Example(clean=template.format(IO=io, S1=s, S2=s, PLACE=place, OBJECT=obj),
                       corrupted=template.format(IO=a, S1=b, S2=c, PLACE=place, OBJECT=obj),
                       target=" " + io, where=f"ioi example {index} (template {t}, {'BABA' if baba else 'ABBA'})",
                       token_extras={"s_id": " " + s})

    encoded = [encoder.encode(e) for e in distinct_examples(make, n_train + n_val, seed, "ioi")]
    return IOITask({"train": encoded[:n_train], "validation": encoded[n_train:]}, encoder.pad_id)
