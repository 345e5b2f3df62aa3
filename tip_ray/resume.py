"""Deciding where a run starts: fresh, or from the newest complete checkpoint of its directory.

Runs before any actor starts, so a wrong choice (a directory holding another run's checkpoints,
an explicit checkpoint path that is not complete) is a clear error that costs nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tip_ray.checkpoint_store import CheckpointStore, SavedCheckpoint

# What makes two runs the same run: a resumed run may change how it is executed and logged
# (cluster, pools' sizes except the learner's, logging, checkpoint cadence, step count), not what
# it trains.
IDENTITY_KEYS = (
    "student", "teacher.model", "teacher.top_k", "data.path", "data.split", "data.seed", "data.shuffle",
    "data.limit", "rollout.n", "rollout.temperature", "rollout.top_p", "rollout.max_new_tokens", "rollout.seed",
    "data.format", "data.prompt_field", "data.answer_field", "data.prompt_template", "data.system_prompt",
    "data.apply_chat_template", "data.max_prompt_tokens", "data.on_overlong", "rollout.engine",
    "teacher.backend", "teacher.values_dtype",
    "learner.world_size", "learner.zero_stage", "learner.dtype", "learner.optimizer", "learner.lr",
    "learner.weight_decay", "learner.betas", "learner.lr_schedule", "learner.warmup_steps", "learner.total_steps",
    "learner.min_lr_ratio", "learner.grad_clip", "learner.global_batch_size", "learner.micro_batch_size",
    "learner.seed", "selection", "loss", "trainer.prompts_per_step", "trainer.sync_every", "trainer.mode",
)


def _lookup(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: saved -> current`` for every identity key whose value differs between two resolved configs."""
    out = []
    for key in IDENTITY_KEYS:
        a, b = _lookup(saved, key), _lookup(current, key)
        if a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


class ResumeError(ValueError):
    """The run directory and the ``checkpoint.resume`` setting do not go together."""


def find_resume_point(resume: str, store: CheckpointStore, run_dir: Path,
                      current_config: dict[str, Any]) -> SavedCheckpoint | None:
    """The checkpoint to continue from, or None for a fresh start.

    ``resume`` is ``auto`` (the newest complete checkpoint of ``store``, if any), ``never`` (a
    fresh start; an error if ``store`` already holds a checkpoint, which would otherwise be mixed
    with or overwritten by the new run) or a checkpoint directory. Resuming needs the config saved
    with the checkpoint (else the run's ``config.json`` in ``run_dir``) to agree with
    ``current_config`` on ``IDENTITY_KEYS``.
    """
    if resume == "never":
        found = store.latest()
        if found is not None:
            raise ResumeError(
                f"checkpoint.resume=never but {store.root} already holds checkpoints (newest: step {found.step}); "
                "use another trainer.output_dir, or checkpoint.resume=auto to continue that run")
        return None
    if resume == "auto":
        point = store.latest()
    else:
        try:
            point = store.load(resume)
        except (OSError, ValueError) as exc:
            raise ResumeError(f"checkpoint.resume={resume}: {exc}") from None
    if point is None:
        return None
    saved_config = run_dir / "config.json"
    saved = point.driver.get("config")  # the checkpoint's own run, wherever it was written
    if saved is None and saved_config.exists():
        saved = json.loads(saved_config.read_text())
    if saved is not None:
        differences = config_differences(saved, current_config)
        if differences:
            raise ResumeError(
                f"{run_dir} holds a run with other settings than this one ({'; '.join(differences)}); resuming it "
                "would mix two runs. Use another trainer.output_dir, or the saved settings to continue it")
    return point
