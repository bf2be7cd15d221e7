"""MIB's circuit-track tasks from a local copy of their data (no downloads).

The data sets are the Hugging Face ones MIB publishes (``mib-bench/ioi``,
``mib-bench/copycolors_mcqa`` config ``4_answer_choices``, ``mib-bench/arithmetic_addition``,
``mib-bench/arithmetic_subtraction``, ``mib-bench/arc_easy``, ``mib-bench/arc_challenge``).
A local copy is a file of their rows (``.jsonl``, ``.json`` as a list or ``{"rows": [...]}``,
or ``.parquet`` when pyarrow is installed), or a folder holding such files per split (a
snapshot of the HF repository: ``**/validation-*.parquet``, ``validation.jsonl``, ...).

The columns read, and what becomes of them (hannamw/MIB-circuit-track
``MIB_circuit_track/dataset.py``, ``HFEAPDataset``: ``__getitem__`` and ``filter_dataset``)::

    task          clean       corrupted (counterfactual)        label            wrong label
    ioi           prompt      s2_io_flip_counterfactual.prompt  " "+metadata.    " "+metadata.subject
                                                                indirect_object
    mcqa, arc_*   prompt      symbol_counterfactual.prompt      choices.label    the counterfactual's
                                                                [answerKey]      choices.label[answerKey]
    arithmetic_*  prompt      random_counterfactual.prompt      str(label)       str(the counterfactual's label)

A label is the first token of ``tokenizer(text, add_special_tokens=False)``, tokenised on its
own, as MIB does. Rows are dropped as MIB drops them: IOI when " IO", " S" and
" metadata.random_c" tokenise to different lengths; MCQA/ARC when the two labels do;
arithmetic unless both labels are one token, the counterfactual and its prompt exist, and
``operator`` is "+" (addition) or "-" (subtraction). The task of a file is found from its
columns (``metadata.indirect_object``: IOI; ``choices``: MCQA, or ARC when the file or
folder is named so; ``operator``: arithmetic) unless given.

Tokenisation (``conventions``): "mib" prepends what TransformerLens' ``to_tokens(prepend_bos=True)``
does, which EAP-IG's ``tokenize_plus`` uses: the tokenizer's own leading special tokens
where it adds them (Llama-3's and Gemma's BOS), else its ``bos_token`` (or, lacking one,
``eos_token``: TransformerLens sets bos = eos) in front of every prompt, so GPT-2 and Qwen
prompts start with ``<|endoftext|>``; "edgeprune" is this package's rule (tasks/examples.py:
the tokenizer's own leading tokens only). Clean and corrupted prompts must tokenise to the
same length (a ValueError names the row otherwise; MIB's batches would fail too). The metric
is MIB's: logit(label) - logit(wrong label) at the last prompt token, with top-1 accuracy.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..tasks.examples import EncodedExample, LogitDiffTask, TextEncoder, check_aligned

TASKS = ("ioi", "mcqa", "arithmetic_addition", "arithmetic_subtraction", "arc_easy", "arc_challenge")
HF_NAMES = {"ioi": "ioi", "mcqa": "copycolors_mcqa", "arithmetic_addition": "arithmetic_addition",
            "arithmetic_subtraction": "arithmetic_subtraction", "arc_easy": "arc_easy", "arc_challenge": "arc_challenge"}
COUNTERFACTUALS = {"ioi": "s2_io_flip_counterfactual", "mcqa": "symbol_counterfactual",
                   "arc_easy": "symbol_counterfactual", "arc_challenge": "symbol_counterfactual",
                   "arithmetic_addition": "random_counterfactual", "arithmetic_subtraction": "random_counterfactual"}
CONVENTIONS = ("mib", "edgeprune")
SPLITS = ("train", "validation", "test")
SUFFIXES = (".jsonl", ".json", ".parquet")


class MIBTask(LogitDiffTask):
    """A MIB task: logit(label) - logit(wrong label) at the last prompt token; also top-1 accuracy."""

    contrast_key = "wrong_id"

    def __init__(self, name: str, splits, pad_id: int, dropped: dict[str, int], source: str):
        self.name = name
        super().__init__(splits, pad_id)
        self.dropped, self.source = dropped, source


def canonical_task(name: str) -> str:
    """A MIB task name in any of its spellings (arc-easy, arc_easy, copycolors_mcqa, ...)."""
    key = str(name).strip().lower().replace("-", "_")
    key = {"copycolors_mcqa": "mcqa"}.get(key, key)
    if key not in TASKS:
        raise ValueError(f"task: expected a MIB task, one of {list(TASKS)} (hyphens or underscores), got {name!r}")
    return key


# -- reading a local copy ------------------------------------------------------------------------------
def _read_file(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"data: {str(path)!r} is a parquet file, which needs pyarrow (pip install pyarrow); "
                             f"or export the rows to JSONL") from None
        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}, line {number}: malformed JSON ({exc.msg})") from None
        return rows
    try:
        d = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"data: {str(path)!r} is not valid JSON ({exc})") from None
    return d["rows"] if isinstance(d, Mapping) and "rows" in d else d


def split_files(path: Path) -> dict[str, list[Path]]:
    """{split: files}: one file is every split; a folder has files named by split."""
    if path.is_file():
        return {"validation": [path]}
    if not path.is_dir():
        raise ValueError(f"data: expected a MIB data file ({', '.join(SUFFIXES)}) or a folder of them, "
                         f"{str(path)!r} does not exist")
    found: dict[str, list[Path]] = {}
    files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
    configs = {p.parent for p in files}
    if len(configs) > 1 and any(c.name == "4_answer_choices" for c in configs):  # MCQA: the config MIB loads
        files = [p for p in files if p.parent.name == "4_answer_choices"]
    for p in files:
        split = next((s for s in SPLITS if p.stem == s or p.stem.startswith(f"{s}-")), None)
        if split is not None:
            found.setdefault(split, []).append(p)
    if not found:
        raise ValueError(f"data: no split files in {str(path)!r} (expected names like validation.jsonl or "
                         f"validation-00000-of-00001.parquet)")
    return found


def detect_task(rows: list[dict], path: Path) -> str:
    row = rows[0]
    if isinstance(row.get("metadata"), Mapping) and "indirect_object" in row["metadata"]:
        return "ioi"
    if "choices" in row:
        name = str(path).lower().replace("-", "_")
        for arc in ("arc_challenge", "arc_easy"):
            if arc in name:
                return arc
        return "mcqa"
    if "operator" in row:
        return "arithmetic_subtraction" if row.get("operator") == "-" else "arithmetic_addition"
    raise ValueError(f"data: cannot tell the MIB task of {str(path)!r} from its columns {sorted(row)}; expected "
                     f"--mib-task one of {list(TASKS)}")


# -- rows to examples ------------------------------------------------------------------------------------
def _get(row: Mapping, *keys: str, where: str) -> Any:
    x: Any = row
    for k in keys:
        if not isinstance(x, Mapping) or k not in x:
            raise ValueError(f"{where}: missing {'.'.join(keys)!r} (MIB's schema; the row has {sorted(row)})")
        x = x[k]
    return x


def _choice_label(row: Mapping, where: str) -> str:
    labels, key = _get(row, "choices", "label", where=where), _get(row, "answerKey", where=where)
    if isinstance(key, str) and key in labels:  # a letter key, as some ARC copies have
        key = labels.index(key)
    if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < len(labels):
        raise ValueError(f"{where}: answerKey {key!r} does not index choices.label {labels!r}")
    return str(labels[key])


def row_texts(task: str, row: Mapping, where: str, counterfactual: str) -> tuple[str, str, str, str] | None:
    """(clean, corrupted, label text, wrong label text), or None where MIB drops the row for
    its labels (IOI names are checked by ``_keep`` once tokenised)."""
    cf = row.get(counterfactual)
    if task.startswith("arithmetic"):
        if cf is None or not isinstance(cf, Mapping) or cf.get("prompt") is None:
            return None
        if row.get("operator") != ("-" if task.endswith("subtraction") else "+"):
            return None
        return (_get(row, "prompt", where=where), cf["prompt"], str(_get(row, "label", where=where)),
                str(_get(cf, "label", where=where + f" ({counterfactual})")))
    if cf is None:
        raise ValueError(f"{where}: missing the counterfactual {counterfactual!r} (the row has {sorted(row)})")
    if task == "ioi":
        return (_get(row, "prompt", where=where), _get(cf, "prompt", where=where + f" ({counterfactual})"),
                " " + str(_get(row, "metadata", "indirect_object", where=where)),
                " " + str(_get(row, "metadata", "subject", where=where)))
    return (_get(row, "prompt", where=where), _get(cf, "prompt", where=where + f" ({counterfactual})"),
            _choice_label(row, where), _choice_label(cf, where + f" ({counterfactual})"))


class _Encoder:
    def __init__(self, tokenizer, conventions: str):
        self.text = TextEncoder(tokenizer)
        self.tokenizer = tokenizer
        prefix = self.text.prefix
        if conventions == "mib" and not prefix:  # TransformerLens: bos_token, else eos_token
            bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            if bos is None:
                raise ValueError("tokenizer: MIB's conventions prepend a BOS token (or EOS: TransformerLens sets "
                                 "bos = eos), and this tokenizer has neither")
            prefix = (bos,)
        self.prefix = tuple(prefix)

    def plain(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt(self, text: str) -> list[int]:
        return [*self.prefix, *self.plain(text)]


def _keep(task: str, enc: _Encoder, row: Mapping, label: str, wrong: str, where: str) -> bool:
    n_label, n_wrong = len(enc.plain(label)), len(enc.plain(wrong))
    if task == "ioi":
        return n_label == n_wrong == len(enc.plain(" " + str(_get(row, "metadata", "random_c", where=where))))
    if task.startswith("arithmetic"):
        return n_label == n_wrong == 1
    return n_label == n_wrong


def encode_rows(task: str, rows: list[dict], tokenizer, *, conventions: str = "mib", counterfactual: str | None = None,
                where: str = "data") -> tuple[list[EncodedExample], int]:
    """(encoded examples in row order, number of rows MIB's filter drops)."""
    if conventions not in CONVENTIONS:
        raise ValueError(f"conventions: expected one of {CONVENTIONS}, got {conventions!r}")
    enc = _Encoder(tokenizer, conventions)
    cf = counterfactual or COUNTERFACTUALS[task]
    out, dropped = [], 0
    for i, row in enumerate(rows):
        here = f"{where}, row {i}"
        if not isinstance(row, Mapping):
            raise ValueError(f"{here}: expected a JSON object (a row of MIB's data set), got {type(row).__name__}")
        texts = row_texts(task, row, here, cf)
        if texts is None or not _keep(task, enc, row, texts[2], texts[3], here):
            dropped += 1
            continue
        clean, corrupted, label, wrong = texts
        ids, cids = enc.prompt(clean), enc.prompt(corrupted)
        check_aligned(here, ids, cids)
        out.append(EncodedExample(tuple(ids), tuple(cids), (len(ids) - 1,), enc.plain(label)[0], here,
                                  {"wrong_id": enc.plain(wrong)[0]}))
    return out, dropped


def load_mib_task(path: str | Path, tokenizer, *, task: str | None = None, conventions: str = "mib",
                  counterfactual: str | None = None, n_examples: int | None = None) -> MIBTask:
    """A MIB task from a local copy (a file: every split; a folder: its split files). ``n_examples``:
    the first so many of each split (after MIB's filter), as MIB's ``--head``."""
    path = Path(path).expanduser()
    files = split_files(path)
    rows = {s: [r for p in ps for r in _read_file(p)] for s, ps in files.items()}
    first = next((r for rs in rows.values() for r in rs), None)
    if first is None:
        raise ValueError(f"data: {str(path)!r} has no rows")
    name = canonical_task(task) if task is not None else detect_task([first], path)
    splits, dropped = {}, {}
    for split, rs in rows.items():
        exs, dropped[split] = encode_rows(name, rs, tokenizer, conventions=conventions, counterfactual=counterfactual,
                                          where=f"{path} ({split})")
        if n_examples is not None:
            exs = exs[:n_examples]
        splits[split] = exs
    if path.is_file():  # one file: it serves as every split, as a JSONL task without splits does
        splits = {"train": splits["validation"], "validation": splits["validation"], "test": splits["validation"]}
        dropped = dict.fromkeys(splits, dropped["validation"])
    if not any(splits.values()):
        raise ValueError(f"data: every row of {str(path)!r} was dropped by MIB's filter for {name!r} "
                         f"({sum(dropped.values())} rows): its labels tokenise to different lengths for this tokenizer")
    return MIBTask(name, splits, _Encoder(tokenizer, conventions).text.pad_id, dropped, str(path))


def is_mib_data(path: str | Path) -> bool:
    """Whether a file or folder holds MIB rows (a "prompt" and a counterfactual or MIB columns)."""
    path = Path(path)
    try:
        files = split_files(path)
        rows = _read_file(next(iter(files.values()))[0])
    except (ValueError, OSError, StopIteration):
        return False
    row = rows[0] if rows and isinstance(rows, list) else None
    return isinstance(row, Mapping) and "prompt" in row and any(k.endswith("_counterfactual") for k in row)
