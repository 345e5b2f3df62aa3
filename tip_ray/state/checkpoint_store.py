"""Atomic, versioned checkpoints of a training run on disk (no Ray, no DeepSpeed here).

Layout under the checkpoint root::

    step_00000040/            one complete checkpoint
      learner/                DeepSpeed engine state (ZeRO shards, optimizer, schedule), per-rank RNG
      driver.json             step, weight version, data cursor, W&B run id, counters
      manifest.json           written last: every file with its size; marks the checkpoint complete
    hf/step_00000040/         Hugging Face export of the student (safetensors + config + tokenizer)
    .tmp-step_00000044-<pid>/ a save in progress (or one a crash interrupted): never read
    superseded/<time>-from-step_00000020/   checkpoints and exports set aside when a run was
                              resumed from an earlier checkpoint (``set_aside``): kept, never read

A checkpoint is written into a temporary directory and renamed into place once its manifest is
on disk, so a reader sees either no checkpoint or a complete one. ``latest`` additionally checks
every file of the manifest, so a directory damaged after the fact (a truncated copy) is skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
DRIVER_STATE = "driver.json"
SUPERSEDED = "superseded"
_PREFIX = "step_"
_TMP = ".tmp-"

RUN_CHECKPOINTS = "checkpoints"  # a run's checkpoint folder under its output_dir when checkpoint.dir is null


def step_name(step: int) -> str:
    """The directory name of the checkpoint of ``step``."""
    return f"{_PREFIX}{step:08d}"


@dataclass(frozen=True)
class SavedCheckpoint:
    """A complete checkpoint: its directory, step and the driver's state saved with it."""

    path: Path
    step: int
    driver: dict[str, Any]
    set_aside: Path | None = None  # where a resume moved the store's later checkpoints (``set_aside``)

    @property
    def learner_dir(self) -> Path:
        """Where the learner group's DeepSpeed state lives."""
        return self.path / "learner"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, value: dict[str, Any]) -> None:
    with path.open("w") as f:
        json.dump(value, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def verify(path: Path) -> dict[str, Any] | None:
    """The manifest of checkpoint directory ``path`` if it is complete and intact, else None."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        for name, size in files.items():
            if (path / name).stat().st_size != size:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest if manifest.get("complete") is True else None


def commit(tmp: Path, final: Path, meta: dict[str, Any]) -> None:
    """Seal the fully written directory ``tmp`` with a manifest and rename it to ``final``.

    An existing ``final`` (a checkpoint of the same step saved again) is replaced only after the
    new one is complete on disk.
    """
    manifest = {**meta, "complete": True, "created": time.time(), "files": _files(tmp)}
    _write_json(tmp / MANIFEST, manifest)
    _fsync_dir(tmp)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        old = final.with_name(f"{_TMP}replaced-{final.name}-{uuid.uuid4().hex}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync_dir(final.parent)


class CheckpointStore:
    """The checkpoints of one run directory: find the newest complete one, write new ones atomically."""

    def __init__(self, root: str | Path, keep_last: int = 2) -> None:
        self.root = Path(root)
        self.keep_last = keep_last

    def _complete(self, parent: Path) -> list[tuple[int, Path]]:
        found = []
        if parent.is_dir():
            for path in parent.iterdir():
                if path.is_dir() and path.name.startswith(_PREFIX) and path.name[len(_PREFIX):].isdigit():
                    if verify(path) is not None:
                        found.append((int(path.name[len(_PREFIX):]), path))
        return sorted(found)

    def incomplete(self) -> list[Path]:
        """Directories that look like checkpoints but are not complete (interrupted or damaged saves)."""
        out = []
        for parent in (self.root, self.root / "hf"):
            if parent.is_dir():
                for path in sorted(parent.iterdir()):
                    is_step = path.name.startswith(_PREFIX) and verify(path) is None
                    if path.is_dir() and (path.name.startswith(_TMP) or is_step):
                        out.append(path)
        return out

    def latest(self) -> SavedCheckpoint | None:
        """The newest complete checkpoint, or None."""
        complete = self._complete(self.root)
        if not complete:
            return None
        return self.load(complete[-1][1])

    @staticmethod
    def load(path: str | Path) -> SavedCheckpoint:
        """The checkpoint at ``path``; ``ValueError`` if it is not a complete checkpoint."""
        path = Path(path)
        manifest = verify(path)
        if manifest is None:
            raise ValueError(f"{path} is not a complete tip_ray checkpoint (no valid {MANIFEST}, or files missing "
                             f"or truncated)")
        driver = json.loads((path / DRIVER_STATE).read_text())
        return SavedCheckpoint(path, int(manifest["step"]), driver)

    def later_than(self, point: SavedCheckpoint) -> list[Path]:
        """The complete checkpoints of this store a run resumed from ``point`` would mix with its
        own: those of ``point``'s step or later (but ``point``), and the exports after it."""
        training = [path for step, path in self._complete(self.root)
                    if step >= point.step and path.resolve() != point.path.resolve()]
        return training + [path for step, path in self._complete(self.root / "hf") if step > point.step]

    def set_aside(self, paths: list[Path], point: SavedCheckpoint, metrics: Path | None = None) -> Path:
        """Move ``paths`` (checkpoints of this store, ``later_than(point)``) into a new
        ``<root>/superseded/<time>-from-<point's step>/`` (exports under ``hf/``), with a copy of the
        run's ``metrics`` JSONL when given (the resumed run cuts its lines after the step); returns
        that directory. Nothing is deleted."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        dest = self.root / SUPERSEDED / f"{stamp}-from-{step_name(point.step)}"
        while dest.exists():
            dest = dest.with_name(dest.name + "-" + uuid.uuid4().hex[:4])
        dest.mkdir(parents=True)
        for path in paths:
            target = dest / "hf" / path.name if path.parent.resolve() == (self.root / "hf").resolve() else dest / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            path.rename(target)
        if metrics is not None and metrics.exists():
            shutil.copy2(metrics, dest / metrics.name)
        _fsync_dir(self.root)
        return dest

    def begin(self, step: int, hf: bool = False) -> Path:
        """A fresh temporary directory to write the checkpoint of ``step`` into."""
        parent = self.root / "hf" if hf else self.root
        tmp = parent / f"{_TMP}{step_name(step)}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def finish(self, tmp: Path, step: int, driver: dict[str, Any]) -> SavedCheckpoint:
        """Write the driver state into ``tmp``, seal it as the checkpoint of ``step``, drop old ones."""
        _write_json(tmp / DRIVER_STATE, driver)
        final = self.root / step_name(step)
        commit(tmp, final, {"step": step, "kind": "training_state"})
        self._prune(self.root)
        return SavedCheckpoint(final, step, driver)

    def finish_hf(self, tmp: Path, step: int) -> Path:
        """Seal a Hugging Face export of ``step``; keeps the newest ``keep_last`` exports."""
        final = self.root / "hf" / step_name(step)
        commit(tmp, final, {"step": step, "kind": "huggingface"})
        self._prune(self.root / "hf")
        return final

    def _prune(self, parent: Path) -> None:
        complete = self._complete(parent)
        for _, path in complete[: max(0, len(complete) - self.keep_last)]:
            shutil.rmtree(path)
        # Interrupted saves of this process's predecessors: never complete, never read.
        for path in parent.iterdir():
            if path.is_dir() and path.name.startswith(_TMP) and not path.name.endswith(f"-{os.getpid()}"):
                shutil.rmtree(path, ignore_errors=True)
