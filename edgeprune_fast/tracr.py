"""Tracr exports: reading the files of the shared format into a :class:`TracrTransformer`
(models/tracr.py: the torch model, its config and its adapter), its example sets and its
ground-truth circuits.

Files of one model ``<name>`` in a folder: ``<name>.config.json`` and ``<name>.safetensors``
(required), ``<name>.examples.json`` and ``<name>.ground_truth.json`` (optional); the
format is described in models/tracr.py and in the shared export's README;
``data/tracr/`` ships the suite (``find_tracr_export``: what ``--model`` accepts).
The ground-truth file names the split token writer ``token_embeds`` (Edge-Pruning's
name); it is read as ``tok_embeds``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .graph import TOK_EMBEDS
from .models.tracr import Edge, Token, TracrConfig, TracrTransformer, config_key

TRACR_DATA_DIR = Path(__file__).resolve().parent / "data" / "tracr"  # demo: load_tracr(TRACR_DATA_DIR, "reverse")
_WRITER_ALIASES = {"token_embeds": TOK_EMBEDS}

__all__ = ["TRACR_DATA_DIR", "TracrConfig", "TracrExampleSet", "TracrGroundTruth", "TracrTransformer",
           "find_tracr_export", "is_tracr_config", "load_examples", "load_ground_truth", "load_tracr",
           "resolve_tracr_path"]


def resolve_tracr_path(path: str | Path, name: str | None = None) -> tuple[Path, str]:
    """(directory, model name) from ``(dir, name)``, ``dir/<name>.config.json`` or the prefix ``dir/<name>``."""
    p = Path(path)
    if name is not None:
        if not p.is_dir():
            raise ValueError(f"path: with name={name!r} expected a directory, got {str(p)!r}")
        return p, name
    if p.name.endswith(".config.json"):
        return p.parent, p.name[: -len(".config.json")]
    if p.with_name(p.name + ".config.json").is_file():
        return p.parent, p.name
    raise ValueError(f"path: expected a directory, a <name>.config.json file or a <dir>/<name> prefix, got {str(p)!r}")


def is_tracr_config(path: Path) -> bool:
    """A ``<name>.config.json`` of the tracr format (its ``architecture`` and ``arrays`` keys)."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and isinstance(d.get("architecture"), dict) and isinstance(d.get("arrays"), dict)


def find_tracr_export(path: str | Path) -> tuple[Path, str] | None:
    """(directory, name) when ``path`` names a tracr export: a folder holding exactly one
    ``<name>.config.json`` of the format (and no HF ``config.json``), ``dir/<name>`` or
    ``dir/<name>.config.json``; None when it is not one. ValueError for a folder with several
    tracr models (name one) ."""
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / "config.json").is_file():
            return None
        found = sorted(f for f in p.glob("*.config.json") if is_tracr_config(f))
        if len(found) > 1:
            names = [f.name[: -len(".config.json")] for f in found]
            raise ValueError(f"--model: {str(p)!r} holds {len(found)} tracr models ({', '.join(names)}); expected "
                             f"one: pass {str(p / names[0])!r} (the folder and the model's name)")
        return (p, found[0].name[: -len(".config.json")]) if found else None
    config = p if p.name.endswith(".config.json") else p.with_name(p.name + ".config.json")
    if config.is_file() and is_tracr_config(config):
        return config.parent, config.name[: -len(".config.json")]
    return None


def _read_json(directory: Path, name: str, kind: str) -> dict[str, Any]:
    f = directory / f"{name}.{kind}.json"
    if not f.is_file():
        raise ValueError(f"path: expected the {kind} file {str(f)!r}, which does not exist")
    return json.loads(f.read_text())


def load_tracr(path: str | Path, name: str | None = None) -> TracrTransformer:
    """Load a tracr export: ``load_tracr(dir, "reverse")``, ``load_tracr("dir/reverse.config.json")``
    or ``load_tracr("dir/reverse")``. Every array is checked against the config (ValueError
    naming the array, the expected shape and what came); the model is in eval mode."""
    directory, name = resolve_tracr_path(path, name)
    source = str(directory / f"{name}.config.json")
    cfg = TracrConfig.from_dict(_read_json(directory, name, "config"), source=source)
    weights = directory / f"{name}.safetensors"
    if not weights.is_file():
        raise ValueError(f"path: expected the weights file {str(weights)!r}, which does not exist")
    tensors = load_file(str(weights))
    declared, shapes = cfg.raw["arrays"], cfg.expected_shapes()
    for arr, shape in shapes.items():
        t = tensors.get(arr)
        got = "nothing (array missing)" if t is None else f"shape {list(t.shape)} {str(t.dtype).removeprefix('torch.')}"
        dtype = declared[arr].get("dtype", "float32")
        if t is None or tuple(t.shape) != shape or str(t.dtype).removeprefix("torch.") != dtype:
            raise ValueError(f"{weights}: array {arr!r}: expected shape {list(shape)} {dtype}, got {got}")
    if extra := sorted(set(tensors) - set(shapes)):
        raise ValueError(f"{weights}: arrays not in the config: {extra}")
    model = TracrTransformer(cfg)
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    return model.eval()


@dataclass(frozen=True)
class TracrExampleSet:
    """One example set; ``*_ids`` [N, T] int64 with BOS at position 0 (output id 0 there is meaningless)."""

    name: str
    input_ids: torch.Tensor
    expected_output: list[list[Token]]
    corrupted_input_ids: torch.Tensor | None
    corrupted_expected_output: list[list[Token]] | None
    expected_output_ids: torch.Tensor | None  # categorical models only
    corrupted_expected_output_ids: torch.Tensor | None
    expected_output_dims_values: torch.Tensor | None  # [N, T, d_out], rounded to 1e-6 in the file
    use_for_ground_truth_test: bool
    raw: dict[str, Any]


def load_examples(path: str | Path, name: str | None = None) -> dict[str, TracrExampleSet]:
    """``<name>.examples.json`` as {set name: TracrExampleSet}; path as in ``load_tracr``."""
    directory, name = resolve_tracr_path(path, name)
    data, source = _read_json(directory, name, "examples"), f"{name}.examples.json"
    return {s.get("name"): _example_set(s, f"{source} set {s.get('name')!r}") for s in config_key(data, "sets", source)}


def _example_set(s: Mapping[str, Any], source: str) -> TracrExampleSet:
    exs = config_key(s, "examples", source)

    def col(field: str) -> list[Any] | None:
        vals = [e.get(field) for e in exs]
        if any(v is None for v in vals) and any(v is not None for v in vals):
            raise ValueError(f"{source}: field {field!r} is present in some examples only")
        return None if not vals or vals[0] is None else vals

    def tensor(field: str, dtype: torch.dtype = torch.long) -> torch.Tensor | None:
        v = col(field)
        return None if v is None else torch.tensor(v, dtype=dtype)

    if col("input_ids") is None or col("expected_output") is None:
        raise ValueError(f"{source}: expected the fields 'input_ids' and 'expected_output' in every example")
    return TracrExampleSet(
        name=str(s["name"]), input_ids=tensor("input_ids"), expected_output=col("expected_output"),
        corrupted_input_ids=tensor("corrupted_input_ids"), corrupted_expected_output=col("corrupted_expected_output"),
        expected_output_ids=tensor("expected_output_ids"),
        corrupted_expected_output_ids=tensor("corrupted_expected_output_ids"),
        expected_output_dims_values=tensor("expected_output_dims_values", torch.float32),
        use_for_ground_truth_test=bool(s.get("ground_truth_check", {}).get("use_for_ground_truth_test", False)),
        raw=dict(s))


@dataclass(frozen=True)
class TracrGroundTruth:
    """Ground-truth circuits as (writer, reader) tuples; ``alternatives`` by name (e.g. resample ablation)."""

    edges: list[Edge]  # one `embeds` writer
    edges_split_embeds: list[Edge] | None  # tok_embeds / pos_embeds writers
    ablation: str
    n_edges_full: int | None
    n_edges_full_split_embeds: int | None
    alternatives: dict[str, list[Edge]]
    raw: dict[str, Any]


def load_ground_truth(path: str | Path, name: str | None = None) -> TracrGroundTruth:
    """``<name>.ground_truth.json``; ``token_embeds`` is renamed ``tok_embeds``. Path as in ``load_tracr``."""
    directory, name = resolve_tracr_path(path, name)
    data, source = _read_json(directory, name, "ground_truth"), f"{name}.ground_truth.json"

    def edges(raw: Any, key: str) -> list[Edge]:
        if not isinstance(raw, list) or not all(isinstance(e, list) and len(e) == 2 for e in raw):
            raise ValueError(f"{source}: {key!r} must be a list of [writer, reader] pairs, got {raw!r:.80}")
        return [(_WRITER_ALIASES.get(w, w), r) for w, r in raw]

    split = data.get("edges_split_embeds")
    full = data.get("full_graph", {})
    return TracrGroundTruth(
        edges=edges(config_key(data, "edges", source), "edges"),
        edges_split_embeds=None if split is None else edges(split, "edges_split_embeds"),
        ablation=str(data.get("ablation", "")), n_edges_full=full.get("n_edges"),
        n_edges_full_split_embeds=full.get("n_edges_split_embeds"),
        alternatives={k: edges(v.get("edges"), f"alternative_ground_truths.{k}.edges")
                      for k, v in data.get("alternative_ground_truths", {}).items()},
        raw=data)
