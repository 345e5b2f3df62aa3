"""Run tracking: a JSONL of every step's metrics, and W&B (offline unless a key is set)."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from tip_ray.config import LoggerConfig


def truncate_after(path: Path, step: int) -> int:
    """Drop the lines of the metrics JSONL ``path`` whose step is above ``step`` (rewritten
    atomically); returns how many were dropped. A resumed run continues the file from there."""
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    keep = []
    for line in lines:
        try:
            row_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by the crash
        if row_step <= step:
            keep.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)
    return len(lines) - len(keep)


class Tracker:
    """Writes each step's metrics to ``<run_dir>/metrics.jsonl`` and, if enabled, to W&B.

    ``resume_step``: continue a run from that step (later JSONL lines, from the step in flight
    when the run stopped, are dropped), under the W&B run id ``run_id``. A fresh run never
    appends to an older run's log: that file is kept as ``metrics.<mtime>.jsonl``.
    """

    def __init__(self, cfg: LoggerConfig, run_dir: Path, config: dict[str, Any], resume_step: int | None = None,
                 run_id: str | None = None) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            truncate_after(self.path, resume_step)
        elif self.path.exists() and self.path.stat().st_size:
            # A fresh run in a directory with an older run's log: keep that log, under another name.
            self.path.rename(self.path.with_name(f"metrics.{int(self.path.stat().st_mtime)}.jsonl"))
        self._file = self.path.open("a")
        self.wandb_run = None
        self.run_id = run_id
        if cfg.wandb and cfg.mode != "disabled":
            import wandb

            mode = cfg.mode if cfg.mode != "auto" else ("online" if os.environ.get("WANDB_API_KEY") else "offline")
            self.run_id = run_id or uuid.uuid4().hex[:12]
            self.wandb_run = wandb.init(project=cfg.project, name=cfg.run_name, dir=str(run_dir), mode=mode,
                                        config=config, id=self.run_id, resume="allow", reinit="finish_previous")

    def rewind(self, step: int) -> None:
        """Drop the JSONL lines after ``step`` (a run that went back to an earlier checkpoint);
        W&B keeps its history and ignores the re-run steps' values."""
        self._file.close()
        truncate_after(self.path, step)
        self._file = self.path.open("a")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record ``metrics`` (flat name -> number) for ``step``."""
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def close(self) -> None:
        """Flush and close the JSONL and finish the W&B run."""
        self._file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
