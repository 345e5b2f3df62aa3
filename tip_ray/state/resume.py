"""Deciding where a run starts: fresh, or from the newest complete checkpoint of its directory.

Runs before any actor starts, so a wrong choice (a directory holding another run's checkpoints,
an explicit checkpoint path that is not complete) is a clear error that costs nothing.

A run's identity is what a resumed run must not change: the fields declared with
``tip_ray.config.identity`` on the config dataclasses, as dotted keys (``IDENTITY_KEYS``, derived
from the declarations, so a renamed or new field carries its mark with it). A resumed run may
change how it is executed, evaluated and logged, not what it trains. In the identity: the student
and teacher checkpoints; the training data and how it becomes token ids (files, split, fields,
templates, ``chat_template_kwargs``, ``null_answer``, limits, shuffling); the sampling (rollout
engine and dtype, n, temperature, top_p, max_new_tokens); the teacher's signal (backend, compute
dtype, ``top_k``, ``values_dtype``); the selection rule and every setting of it; the loss; the
optimisation (learner world size and ZeRO stage, which also fix the checkpoint's shard layout,
dtype, optimizer, schedule, batch sizes, ``ta_k``); the step's shape (``prompts_per_step``,
``sync_every``, ``mode``); every seed. Not in it: ``trainer.steps`` (a run may be extended),
evaluation (``eval_data``, cadence; ``grader`` too, unless the run trains on task rewards,
``loss.reward``, where it decides the rewards), checkpointing, logging, cluster placement, pool
and engine sizes, the weight-sync transport, fault handling, and settings that give the same
numbers another way (``chunk_rows``, ``vocab_chunk``, ``single_forward``,
``gradient_checkpointing``, teacher and rollout batching); ``learner.model`` always equals
``student``.

A checkpoint stores the whole resolved config of its run (``driver.json``; else the run's
``config.json``), and two configs are compared on the identity keys both of them hold. A key the
saved config lacks is a setting added to tip_ray after the checkpoint was written
(``data.chat_template_kwargs`` and ``data.null_answer`` were) or renamed since: it is not compared,
so a run written by an older tip_ray still resumes (a new setting's default is meant to keep the
behaviour from before it; resuming such a run with another value goes unchecked). A key only the
saved config holds is a setting tip_ray no longer has (``trainer.seed``, which nothing read): not
compared either. Settings an older config holds but the older, hand-written identity did not
compare (``learner.ta_k``, ``teacher.dtype``, ``rollout.dtype``) are compared like the rest.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import typing
from pathlib import Path
from typing import Any

from tip_ray.config import TrainConfig, is_identity
from tip_ray.state.checkpoint_store import CheckpointStore, SavedCheckpoint

log = logging.getLogger(__name__)
_ABSENT = object()  # a key a config does not hold (None is a value: teacher.top_k=null)


def _config_class(annotation: Any) -> type | None:
    """The config dataclass a field holds (``X`` or ``X | None``), or None for a plain value (a
    dict of config dataclasses, such as ``teachers``, is compared as one value)."""
    if typing.get_origin(annotation) in (dict, list):
        return None
    candidates = (annotation, *typing.get_args(annotation))
    return next((c for c in candidates if isinstance(c, type) and dataclasses.is_dataclass(c)), None)


def identity_keys(cls: type = TrainConfig, prefix: str = "") -> tuple[str, ...]:
    """The dotted keys of ``cls``'s identity fields (``tip_ray.config.identity``), in declaration
    order, with the identity fields of the config dataclasses its identity fields hold."""
    hints = typing.get_type_hints(cls)
    keys: list[str] = []
    for f in dataclasses.fields(cls):
        if is_identity(f):
            nested = _config_class(hints[f.name])
            keys.extend(identity_keys(nested, f"{prefix}{f.name}.") if nested else [prefix + f.name])
    return tuple(keys)


IDENTITY_KEYS = identity_keys()
# ``grader`` joins the identity of a run that trains on task rewards (``loss.reward.enabled``).
REWARDED = "loss.reward.enabled"


def _lookup(config: dict[str, Any], dotted: str) -> Any:
    """The value at ``dotted`` in a nested dict, or ``_ABSENT``."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def unresolved_keys(config: dict[str, Any], keys: typing.Iterable[str] = IDENTITY_KEYS) -> list[str]:
    """The ``keys`` that name no value of the resolved config ``config``."""
    return [key for key in keys if _lookup(config, key) is _ABSENT]


def config_differences(saved: dict[str, Any], current: dict[str, Any],
                       keys: typing.Iterable[str] = IDENTITY_KEYS) -> list[str]:
    """``key: saved -> current`` for every identity key both resolved configs hold with different
    values (a key one of them lacks is not compared: see the module docstring)."""
    keys = list(keys)
    if REWARDED in keys and any(_lookup(c, REWARDED) is True for c in (saved, current)):
        keys.append("grader")  # with task rewards the grader decides what is trained
    out = []
    for key in keys:
        a, b = _lookup(saved, key), _lookup(current, key)
        if a is not _ABSENT and b is not _ABSENT and a != b:
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
    ``current_config`` on the ``IDENTITY_KEYS`` both hold; ``ResumeError`` names every key that differs.

    A checkpoint directory older than checkpoints ``store`` holds (the run goes back to step k
    while steps after k were saved) would have the new run's checkpoints replace, interleave with
    and be pruned against those others, and ``auto`` later pick whichever is newest: they are
    moved aside first (``CheckpointStore.set_aside``, with a copy of ``run_dir``'s metrics JSONL),
    never deleted; the returned checkpoint's ``set_aside`` says where, and a warning names both.
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
    later = store.later_than(point) if resume != "auto" else []
    if later:
        dest = store.set_aside(later, point, run_dir / "metrics.jsonl")
        log.warning("checkpoint.resume=%s goes back to step %d, but %s held later checkpoints (%s): moved to %s so "
                    "that this run's checkpoints do not mix with them", resume, point.step, store.root,
                    ", ".join(str(p.relative_to(store.root)) for p in later), dest)
        point = dataclasses.replace(point, set_aside=dest)
    return point
