"""Gendered pronouns (Mathwin et al. 2023; the Edge Pruning paper's GP task).

    clean      "So Mary is a really great friend, isn't"   -> " she"   (other: " he")
    corrupted  "So John is a really great friend, isn't"

The model should pick the pronoun that matches the name's gender. By default
(``corruption="opposite"``) the corrupted prompt puts a name of the other gender in the
same place, so the corrupted run carries the opposite answer; ``corruption="neutral"``
uses a gender-neutral name ("Alex") instead, which removes the gender cue without
reversing it.

Per example: ``labels`` = the correct pronoun token, ``extras["other_id"]`` = the other
pronoun's token (each the first token of the pronoun after the prompt). The target is the
last prompt position. Metric: logit difference logit(correct) - logit(other) (``metric``);
``metrics`` adds top-1 accuracy over the vocabulary.

Names must be single tokens of the tokenizer (after "So"): the lists are filtered, and
each gender (and, for ``neutral``, the neutral list) must keep at least one name.
Templates, names and pronouns: ``edgeprune_fast/data/tasks/gendered_pronouns.json``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path

from .examples import Example, LogitDiffTask, TextEncoder, distinct_examples, load_task_data, split_sizes

CORRUPTIONS = ("opposite", "neutral")
GENDERS = ("male", "female")


class GenderedPronounsTask(LogitDiffTask):
    """Metric: logit(correct pronoun) - logit(other pronoun) at the target position, per example; also top-1 accuracy."""

    name = "gendered-pronouns"
    contrast_key = "other_id"


def make_gendered_pronouns(tokenizer, *, n_examples: int = 256, n_validation: int | None = None, seed: int = 0,
                           data: Mapping | str | Path | None = None,
                           corruption: str = "opposite") -> GenderedPronounsTask:
    """Gendered pronouns with ``n_examples`` training and ``n_validation`` validation examples
    (default ``max(1, n_examples // 4)``), distinct clean prompts, deterministic in ``seed``."""
    if corruption not in CORRUPTIONS:
        raise ValueError(f"corruption: expected one of {CORRUPTIONS}, got {corruption!r}")
    n_train, n_val = split_sizes(n_examples, n_validation)
    d = load_task_data(data, "gendered_pronouns.json", ("templates", "pronouns", "names"))
    templates = list(d["templates"])
    if not templates or any("{NAME}" not in t for t in templates):
        raise ValueError("data['templates']: expected at least one template, each with a {NAME} field")
    if not isinstance(d["names"], Mapping) or not isinstance(d["pronouns"], Mapping):
        raise ValueError("data: expected 'names' as {gender: [names]} and 'pronouns' as {gender: pronoun}")
    encoder = TextEncoder(tokenizer)
    kinds = GENDERS + (("neutral",) if corruption == "neutral" else ())
    names = {}
    for kind in kinds:
        given = list(dict.fromkeys(d["names"].get(kind, [])))
        names[kind] = [n for n in given if encoder.is_single_token(" " + n, "So")]
        if not names[kind]:
            raise ValueError(f"tokenizer: none of the {len(given)} {kind} names in the gendered-pronouns data is "
                             "a single token of this tokenizer")
    pronouns = {g: d["pronouns"].get(g) for g in GENDERS}
    for g, p in pronouns.items():  # the metric compares two single tokens
        if not isinstance(p, str) or not encoder.is_single_token(p, templates[0].format(NAME=names[g][0])):
            raise ValueError(f"data['pronouns']['{g}']: expected a pronoun that is one token of this tokenizer "
                             f"after the prompt, got {p!r}")

    def make(rng: random.Random, index: int) -> Example:
        t = rng.randrange(len(templates))
        gender = rng.choice(GENDERS)
        other = GENDERS[1 - GENDERS.index(gender)]
        name = rng.choice(names[gender])
        swap = rng.choice(names[other if corruption == "opposite" else "neutral"])
        return Example(clean=templates[t].format(NAME=name), corrupted=templates[t].format(NAME=swap),
                       target=pronouns[gender], where=f"gendered-pronouns example {index} (template {t}, {name})",
                       token_extras={"other_id": pronouns[other]})

    encoded = [encoder.encode(e) for e in distinct_examples(make, n_train + n_val, seed, "gendered-pronouns")]
    return GenderedPronounsTask({"train": encoded[:n_train], "validation": encoded[n_train:]}, encoder.pad_id)
