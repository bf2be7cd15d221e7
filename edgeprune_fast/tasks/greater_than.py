"""Greater-Than (Hanna et al. 2023), generated from packaged templates.

    clean      "The war lasted from the year 1732 to the year 17"   -> a two-digit "YY" > 32
    corrupted  "The war lasted from the year 1701 to the year 17"

The model should put its probability on end years greater than the start year. Start
years YY run over ``first_year..last_year`` (02..98, as in the paper); the corrupted prompt
starts in the year CC01, which leaves nothing below it to exclude.

Per example: ``extras["year"]`` = YY (int64 [B]) and ``extras["year_ids"]`` = the token ids
of "00".."99" as continuations of "...the year CC" ([B, 100], index = the two-digit value).
No ``labels`` (no single correct token). The target is the last prompt position.
Metric (probability difference, from the softmax over the whole vocabulary):

    prob_diff = sum_{yy > YY} P(yy) - sum_{yy <= YY} P(yy)

The 100 two-digit strings must each be one token after "the year CC" for every century
(GPT-2 splits " 1732" into " 17" "32"), otherwise a ``ValueError``; the same check makes
every start year split as century + two digits, so clean and corrupted align. The loss is the KL over the whole vocabulary, or with
``kl_over_years=True`` over the 100 year tokens only (``TaskBatch.candidates``).
Templates, nouns and centuries: ``edgeprune_fast/data/tasks/greater_than.json``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path

import torch

from .base import TaskBatch, first_target_logits
from .examples import Example, ExampleTask, TextEncoder, distinct_examples, load_task_data, split_sizes

TWO_DIGITS = tuple(f"{yy:02d}" for yy in range(100))


class GreaterThanTask(ExampleTask):
    name = "greater-than"
    metric_name = "prob_diff"

    def metric(self, logits: torch.Tensor, batch: TaskBatch) -> torch.Tensor:
        """sum P(yy > YY) - sum P(yy <= YY) over the two-digit year tokens: [B]."""
        p = torch.softmax(first_target_logits(logits, batch), dim=-1).gather(1, batch.extras["year_ids"])
        greater = torch.arange(100, device=p.device)[None, :] > batch.extras["year"][:, None]
        return (p * greater).sum(dim=1) - (p * ~greater).sum(dim=1)


def year_token_ids(encoder: TextEncoder, century: str) -> list[int]:
    """Token ids of "00".."99" after "the year <century>"; raises unless each is one token."""
    context = f"the year {century}"
    bad = [yy for yy in TWO_DIGITS if not encoder.is_single_token(yy, context)]
    if bad:
        raise ValueError(f"tokenizer: Greater-Than needs every two-digit year to be one token after {context!r}; "
                         f"{len(bad)} are not (e.g. {bad[:5]})")
    return [encoder.continuation(context, yy, "year tokens")[0] for yy in TWO_DIGITS]


def make_greater_than(tokenizer, *, n_examples: int = 256, n_validation: int | None = None, seed: int = 0,
                      data: Mapping | str | Path | None = None, kl_over_years: bool = False) -> GreaterThanTask:
    """Greater-Than with ``n_examples`` training and ``n_validation`` validation examples
    (default ``max(1, n_examples // 4)``), distinct clean prompts, deterministic in ``seed``."""
    n_train, n_val = split_sizes(n_examples, n_validation)
    d = load_task_data(data, "greater_than.json", ("templates", "nouns", "centuries", "first_year", "last_year",
                                                   "corrupted_year"))
    if not d["templates"] or not d["nouns"] or not d["centuries"]:
        raise ValueError("data: Greater-Than needs at least one template, noun and century")
    first, last, corrupted = int(d["first_year"]), int(d["last_year"]), str(d["corrupted_year"])
    if not 0 <= first <= last <= 99:
        raise ValueError(f"data: expected 0 <= first_year <= last_year <= 99, got {first} and {last}")
    if corrupted not in TWO_DIGITS:
        raise ValueError(f"data['corrupted_year']: expected two digits such as '01', got {corrupted!r}")
    encoder = TextEncoder(tokenizer)
    centuries = list(dict.fromkeys(str(c) for c in d["centuries"]))
    year_ids = {century: year_token_ids(encoder, century) for century in centuries}
    pairs = [(century, yy) for century in centuries for yy in range(first, last + 1)]
    templates, nouns = list(d["templates"]), list(d["nouns"])

    def make(rng: random.Random, index: int) -> Example:
        t = rng.randrange(len(templates))
        century, yy = rng.choice(pairs)
        noun = rng.choice(nouns)
        return Example(clean=templates[t].format(NOUN=noun, CC=century, YY=f"{yy:02d}"),
                       corrupted=templates[t].format(NOUN=noun, CC=century, YY=corrupted),
                       target=None, where=f"greater-than example {index} (template {t}, year {century}{yy:02d})",
                       extras={"year": yy, "year_ids": tuple(year_ids[century])})

    encoded = [encoder.encode(e) for e in distinct_examples(make, n_train + n_val, seed, "greater-than")]
    candidates = None
    if kl_over_years:
        if len({tuple(v) for v in year_ids.values()}) != 1:
            raise ValueError("kl_over_years: the year tokens differ between centuries in this tokenizer")
        candidates = torch.tensor(next(iter(year_ids.values())), dtype=torch.long)
    return GreaterThanTask({"train": encoded[:n_train], "validation": encoded[n_train:]}, encoder.pad_id,
                           candidates=candidates)
