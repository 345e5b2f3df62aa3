"""Run tracking: a JSONL of every step's metrics, and W&B (offline unless a key is set)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tip_ray.config import LoggerConfig


class Tracker:
    """Writes each step's metrics to ``<run_dir>/metrics.jsonl`` and, if enabled, to W&B."""

    def __init__(self, cfg: LoggerConfig, run_dir: Path, config: dict[str, Any]) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")
        self.wandb_run = None
        self.wandb_dir = None
        if cfg.wandb and cfg.mode != "disabled":
            import wandb

            mode = cfg.mode if cfg.mode != "auto" else ("online" if os.environ.get("WANDB_API_KEY") else "offline")
            self.wandb_dir = run_dir
            self.wandb_run = wandb.init(project=cfg.project, name=cfg.run_name, dir=str(run_dir), mode=mode,
                                        config=config, reinit="finish_previous")

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
