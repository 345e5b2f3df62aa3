"""Run tracking: a JSONL of every step's metrics, and W&B (offline unless a key is set).

A run that goes back to step k (resumed from the checkpoint of step k, or its learner group
rebuilt from it) logs steps k + 1, ... again. The JSONL drops its lines after k. W&B refuses a
step below the last one a run logged, and a plain resume would keep the abandoned steps next to
the new ones, so when W&B holds steps after k the run is rewound there: ``wandb.init`` with
``resume_from="<id>?_step=k"`` (W&B keeps history up to k, archives the rest, and the run goes
on at k + 1; offline, the rewind is applied when the run is synced). A W&B server without
rewinding (a preview feature; self-managed servers lack it) fails that call: the run then goes
on as a new W&B run whose config names the run and step it continues (``resumed_from``), so no
step is refused or logged twice.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

from tip_ray.config import LoggerConfig

log = logging.getLogger(__name__)


def _row_steps(lines: list[str]) -> list[int | None]:
    """The step of each metrics JSONL line (None for a line cut short by a crash)."""
    steps: list[int | None] = []
    for line in lines:
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
            steps.append(None)
    return steps


def last_step(path: Path) -> int | None:
    """The highest step of the metrics JSONL ``path``, or None when it holds none."""
    if not path.exists():
        return None
    steps = [s for s in _row_steps(path.read_text().splitlines()) if s is not None]
    return max(steps, default=None)


def truncate_after(path: Path, step: int) -> int:
    """Drop the lines of the metrics JSONL ``path`` whose step is above ``step`` (rewritten
    atomically); returns how many were dropped. A resumed run continues the file from there."""
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    keep = [line for line, s in zip(lines, _row_steps(lines)) if s is not None and s <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)
    return len(lines) - len(keep)


class Tracker:
    """Writes each step's metrics to ``<run_dir>/metrics.jsonl`` and, if enabled, to W&B.

    ``resume_step``: continue a run from that step (later JSONL lines, from the step in flight
    when the run stopped, are dropped), under the W&B run id ``run_id``, rewound to
    ``resume_step`` when it logged later steps (module docstring). A fresh run never appends to
    an older run's log: that file is kept as ``metrics.<mtime>.jsonl``. ``run_id`` (after
    construction): the W&B run the metrics go to, which a checkpoint records.
    """

    def __init__(self, cfg: LoggerConfig, run_dir: Path, config: dict[str, Any], resume_step: int | None = None,
                 run_id: str | None = None) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        logged = None
        if resume_step is not None:
            logged = last_step(self.path)
            truncate_after(self.path, resume_step)
        elif self.path.exists() and self.path.stat().st_size:
            # A fresh run in a directory with an older run's log: keep that log, under another name.
            self.path.rename(self.path.with_name(f"metrics.{int(self.path.stat().st_mtime)}.jsonl"))
        self._file = self.path.open("a")
        self._cfg, self._run_dir, self._config = cfg, run_dir, config
        self.wandb_run = None
        self.run_id = run_id
        self._last_logged = -1  # the highest step the W&B run holds, as far as this process knows
        if cfg.wandb and cfg.mode != "disabled":
            rewind = run_id is not None and resume_step is not None and logged is not None and logged > resume_step
            self._start_wandb(run_id, resume_step if rewind else None)
            if not rewind and run_id is not None and logged is not None:
                self._last_logged = logged

    @property
    def _mode(self) -> str:
        cfg = self._cfg
        return cfg.mode if cfg.mode != "auto" else ("online" if os.environ.get("WANDB_API_KEY") else "offline")

    def _start_wandb(self, run_id: str | None, rewind_to: int | None) -> None:
        """Start (or continue) the W&B run ``run_id`` (None: a new one); ``rewind_to``: rewind it
        to that step first, or, where the server cannot, continue in a new run."""
        import wandb

        common = {"project": self._cfg.project, "name": self._cfg.run_name, "dir": str(self._run_dir),
                  "mode": self._mode, "reinit": "finish_previous"}
        if rewind_to is None:
            self.run_id = run_id or uuid.uuid4().hex[:12]
            self.wandb_run = wandb.init(**common, config=self._config, id=self.run_id, resume="allow")
            return
        try:
            self.wandb_run = wandb.init(**common, config=self._config, resume_from=f"{run_id}?_step={rewind_to}")
            self.run_id = self.wandb_run.id
        except Exception as exc:  # wandb raises its CommError/UsageError, or what the server answered
            self.run_id = uuid.uuid4().hex[:12]
            log.warning("W&B could not rewind run %s to step %d (%s); logging to a new run %s that continues it",
                        run_id, rewind_to, exc, self.run_id)
            config = {**self._config, "resumed_from": {"wandb_run_id": run_id, "step": rewind_to}}
            self.wandb_run = wandb.init(**common, config=config, id=self.run_id)
        self._last_logged = rewind_to

    def rewind(self, step: int) -> None:
        """Go back to ``step`` (a run that reloaded an earlier checkpoint): drop the JSONL lines
        after it, and rewind the W&B run there when it holds later steps (module docstring)."""
        self._file.close()
        truncate_after(self.path, step)
        self._file = self.path.open("a")
        if self.wandb_run is not None and self._last_logged > step:
            self.wandb_run.finish()
            self._start_wandb(self.run_id, step)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record ``metrics`` (flat name -> number) for ``step``."""
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
            self._last_logged = max(self._last_logged, step)

    def close(self) -> None:
        """Flush and close the JSONL and finish the W&B run."""
        self._file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
