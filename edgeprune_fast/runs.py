"""The folder of a pruning run: where its checkpoints and its staged outputs live until the
run is complete, so that a run killed at any point (SIGKILL included) can be resumed, and
the final outputs still appear only when every target is done.

Layout while the run is going on (``OUT`` was new or empty)::

    OUT/checkpoint/run.json                   the whole configuration, the targets, the finished ones
    OUT/checkpoint/train-<target>/checkpoint.safetensors   the trainer's state (train.py), every N steps
    OUT/checkpoint/outputs/...                the outputs of finished targets (a sweep: sparsity_<t>/)

When the last target is done, run.json is marked finished, every entry of ``outputs/`` is
renamed into ``OUT`` and ``checkpoint/`` is removed; a resume of a run killed in the middle
of that finishes it. Nothing is hidden: a killed run leaves ``OUT/checkpoint`` (the resume
point, shown in every message), and a resume reuses it. run.json is replaced atomically
(staging.write_atomically), as are the trainer's checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from .staging import write_atomically

RUN_FORMAT = "edgeprune_fast.run"
CHECKPOINT_DIR = "checkpoint"
RESULT_FILES = ("circuit.json", "sweep.json")  # what a finished run's folder holds


def target_key(target: float) -> str:
    """The name of a target in folders and run.json, e.g. 'sparsity_0.9800'."""
    return f"sparsity_{target:.4f}"


class RunFolder:
    """``OUT/checkpoint``: settings, per-target trainer checkpoints, staged outputs (module docstring)."""

    def __init__(self, out: Path, state: dict[str, Any]) -> None:
        self.out = Path(out)
        self.state = state

    # -- opening ------------------------------------------------------------------------------------
    @property
    def root(self) -> Path:
        return self.out / CHECKPOINT_DIR

    @classmethod
    def create(cls, out: Path, settings: dict[str, Any], targets: list[float]) -> RunFolder:
        """Start a run in ``out`` (checked new or empty by the caller): writes run.json."""
        folder = cls(out, {"format": RUN_FORMAT, "version": 1, "settings": settings, "targets": targets,
                           "done": {}, "finished": False, "made_out": not Path(out).exists()})
        folder.root.mkdir(parents=True, exist_ok=True)
        folder._save()
        return folder

    @classmethod
    def open(cls, out: Path) -> RunFolder:
        """The unfinished run in ``out``; ValueError naming what is there instead."""
        path = Path(out) / CHECKPOINT_DIR / "run.json"
        if not path.is_file():
            raise ValueError(f"--resume: expected the folder of an interrupted `edgeprune prune` run (with "
                             f"{CHECKPOINT_DIR}/run.json), got {str(out)!r}, "
                             + ("which does not exist" if not Path(out).exists() else "which has no checkpoint"))
        try:
            state = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"--resume: {str(path)!r} is not readable ({exc})") from None
        if not isinstance(state, dict) or state.get("format") != RUN_FORMAT:
            raise ValueError(f"--resume: {str(path)!r} is not a run file (format {state.get('format')!r})")
        return cls(out, state)

    @staticmethod
    def is_finished_run(out: Path) -> bool:
        """A run that completed: its results are in ``out`` and no checkpoint is left."""
        out = Path(out)
        return any((out / f).is_file() for f in RESULT_FILES) and not (out / CHECKPOINT_DIR).exists()

    # -- state --------------------------------------------------------------------------------------
    @property
    def settings(self) -> dict[str, Any]:
        return self.state["settings"]

    @property
    def targets(self) -> list[float]:
        return list(self.state["targets"])

    def done(self, target: float) -> dict | None:
        """The summary row of a finished target, or None."""
        return self.state["done"].get(target_key(target))

    def mark_done(self, target: float, row: dict[str, Any]) -> None:
        self.state["done"][target_key(target)] = row
        self._save()

    def _save(self) -> None:
        text = json.dumps(self.state, indent=1) + "\n"
        write_atomically(self.root / "run.json", lambda tmp: tmp.write_text(text))

    # -- paths ----------------------------------------------------------------------------------------
    def trainer_dir(self, target: float) -> Path:
        return self.root / f"train-{target_key(target)}"

    def outputs(self) -> Path:
        return self.root / "outputs"

    def stage(self, target: float) -> Path:
        """Where a target's outputs are written: outputs/ itself, or outputs/sparsity_<t>/ in a sweep."""
        folder = self.outputs() if len(self.targets) == 1 else self.outputs() / target_key(target)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def has_progress(self) -> bool:
        """Whether anything beyond the settings was written: a trainer checkpoint, a finished target."""
        return bool(self.state.get("done")) or any(self.root.glob("train-*/*.safetensors"))

    def discard(self) -> None:
        """Remove a run that learned nothing yet (``OUT`` too, when the run made it)."""
        shutil.rmtree(self.root, ignore_errors=True)
        if self.out.is_dir() and not any(self.out.iterdir()) and self.state.get("made_out"):
            self.out.rmdir()

    # -- the end ------------------------------------------------------------------------------------
    def finish(self) -> None:
        """Mark the run finished, move its outputs into place and remove the checkpoint."""
        if not self.state["finished"]:
            self.state["finished"] = True
            self._save()
        outputs = self.outputs()
        if outputs.is_dir():
            for entry in sorted(outputs.iterdir()):
                os.replace(entry, self.out / entry.name)  # a rename: atomic per entry, and repeatable
        shutil.rmtree(self.root)
