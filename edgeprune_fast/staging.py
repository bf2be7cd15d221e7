"""Outputs that appear only when complete: a folder or a file is written under a temporary
name beside its destination and renamed into place on success, removed on failure.

``check_out_folder`` says whether a destination can take a run's outputs; the staged
results get the modes plain ``mkdir``/``open`` would give under the umask (not mkdtemp's
0700 or mkstemp's 0600). ``write_atomically`` replaces one file in one rename (checkpoints,
masks).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import UsageError


def _looks_like_ours(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("circuit.json", "sweep.json", "summary.json"))


def check_out_folder(out: Path, *, replace_previous: bool = False) -> bool:
    """UsageError unless ``out`` can take a run's outputs; True when an earlier run's are there."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: expected a folder, got {str(out)!r}, which is a file")
    old = out.exists() and any(out.iterdir())
    if old and not (replace_previous and _looks_like_ours(out)):
        raise UsageError(f"--out: expected a new or empty folder, got {str(out)!r} which has files in it")
    return old


def _umask() -> int:
    """This process's umask (reading it means setting it; set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def staged_output(out: Path, *, replace_previous: bool = False):
    """Write into a temporary sibling folder; move it to ``out`` only on success.

    ``out`` must be new or empty; with ``replace_previous`` a folder holding an earlier
    run's outputs (circuit.json, sweep.json or summary.json) is replaced, only once the new
    one is complete."""
    out = Path(out)
    old = check_out_folder(out, replace_previous=replace_previous)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700 is for the stage, not the result
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old:
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        out.rename(trash / out.name)
        tmp.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        if out.exists():
            out.rmdir()
        tmp.rename(out)


@contextmanager
def staged_file(out: Path):
    """Yield a temporary path beside ``out``; rename it to ``out`` only on success."""
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"--out: expected a file name, got {str(out)!r}, which is a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=out.suffix, dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.chmod(0o666 & ~_umask())  # mkstemp's 0600 is for the stage, not the result
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)


def write_atomically(path: Path, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` to a temporary name beside ``path``, flush it to disk, rename it over
    ``path``: readers (and a resume after a kill) see the old file or the new one, whole."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        tmp.chmod(0o666 & ~_umask())  # the mode plain open() gives (some writers, e.g. safetensors, use 0600)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # the rename itself, durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path
